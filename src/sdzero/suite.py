"""``sdzero suite NAME [key=value ...]``: several benchmarks in turn, resumable as a whole, one table.

A suite is a YAML file (``configs/suite/NAME.yaml`` or any path)::

    task: segmentation            # what the benchmarks measure (the table's kind)
    metric: miou                  # the headline metric of the table and chart (report's names)
    prototype_cache: null         # null: the method's own folder ("run" becomes <suite>/prototypes)
                                  # | suite: <suite>/prototypes; shared by every benchmark
    overrides: []                 # key=value items applied to every benchmark
    benchmarks:                   # name -> experiment and its own overrides, in order
      voc21: {experiment: voc_ovdiff}
      voc20: {experiment: voc20_ovdiff, overrides: [...]}

Command-line items: ``output_dir=DIR`` (the suite folder; default ``runs/suite-NAME/<timestamp>``),
``resume=DIR`` (continue a suite folder: finished benchmarks are skipped, a cut one resumes from its
records), ``only=[a,b]`` (these benchmarks), ``<benchmark>.KEY=VALUE`` (one benchmark only, e.g.
``voc21.data.root=/data/VOCdevkit``) and ``KEY=VALUE`` (every benchmark). Every benchmark's config
and dataset files are checked before the first one runs.

The suite folder holds one run folder per benchmark (``<name>/``, the ``eval`` contract),
``suite.json`` (each benchmark's ``metrics.json`` object, status and prototype-cache counts),
``suite.md`` (the markdown table, published numbers beside sdzero's) and ``suite.png`` (the
bar chart of :func:`sdzero.report.to_chart`). Methods with a prototype cache share one folder, so a
class name that several benchmarks use is built once; ``suite.json`` counts, per benchmark, the
prototype sets it needed and how many it built (cache files written during its run). Under
torchrun / several devices each benchmark runs sharded as ``eval`` does; rank 0 writes the suite's
files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sdzero.config import GROUPS, available, compose, config_dir
from sdzero.errors import ConfigError

SUITE_KEYS = ("output_dir", "resume", "only")
EPILOG = """\
items: output_dir=DIR (the suite folder), resume=DIR (continue it: finished benchmarks are skipped,
a cut one resumes), only=[a,b] (these benchmarks), <benchmark>.KEY=VALUE (that benchmark only, e.g.
voc21.data.root=/data/VOCdevkit), KEY=VALUE (every benchmark, e.g. data.root=/data holding them all).
Writes DIR/<benchmark>/ run folders, DIR/suite.json, DIR/suite.md and DIR/suite.png."""
DEFINITION_KEYS = ("task", "metric", "prototype_cache", "overrides", "benchmarks")
RESERVED = (*GROUPS, *SUITE_KEYS, "seed", "protocol", "visuals", "experiment", "choices")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of a suite: its run folder's name, experiment and own overrides."""

    name: str
    experiment: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    """A parsed suite file (see the module docstring)."""

    name: str
    task: str
    metric: str
    benchmarks: tuple[Benchmark, ...]
    overrides: tuple[str, ...] = ()
    prototype_cache: str | None = None


def _string_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{where} must be a list of 'key=value' strings, got {value!r}")
    return tuple(value)


def load_suite(name: str) -> Suite:
    """The suite ``configs/suite/<name>.yaml``, or the YAML file ``name``, checked key by key."""
    path = Path(name)
    if not (path.suffix in {".yaml", ".yml"} and path.is_file()):
        names = available("suite")
        if name not in names:
            raise ConfigError(
                f"unknown suite {name!r}: not a YAML file and not one of {', '.join(names)}"
            )
        path = config_dir() / "suite" / f"{name}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"suite file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"suite file {str(path)!r} must hold a mapping")
    unknown = sorted(set(data) - set(DEFINITION_KEYS))
    if unknown or not isinstance(data.get("benchmarks"), dict) or not data["benchmarks"]:
        raise ConfigError(
            f"suite file {str(path)!r}: expected the keys {list(DEFINITION_KEYS)} with a non-empty "
            f"'benchmarks' mapping (name: {{experiment, overrides}}); unknown keys {unknown}"
        )
    benchmarks = []
    for bench, spec in data["benchmarks"].items():
        where = f"suite file {str(path)!r}, benchmark {bench!r}"
        if not isinstance(spec, dict) or not isinstance(spec.get("experiment"), str):
            raise ConfigError(f"{where}: expected {{experiment: NAME, overrides: [...]}}")
        if set(spec) - {"experiment", "overrides"}:
            raise ConfigError(f"{where}: unknown keys {sorted(set(spec) - {'experiment'})}")
        if not str(bench).isidentifier() or bench in RESERVED:
            raise ConfigError(f"{where}: a benchmark name must be an identifier, not {RESERVED}")
        overrides = _string_list(spec.get("overrides"), f"{where} overrides")
        benchmarks.append(Benchmark(str(bench), spec["experiment"], overrides))
    cache = data.get("prototype_cache")
    if cache not in (None, "suite"):
        raise ConfigError(f"suite file {str(path)!r}: prototype_cache must be null or 'suite'")
    return Suite(
        name=path.stem,
        task=str(data.get("task", "segmentation")),
        metric=str(data.get("metric", "miou")),
        benchmarks=tuple(benchmarks),
        overrides=_string_list(data.get("overrides"), f"suite file {str(path)!r} overrides"),
        prototype_cache=cache,
    )


@dataclass
class Plan:
    """One benchmark as it will run: its composed config, folder and what is there already."""

    benchmark: Benchmark
    folder: Path
    status: str  # finished | resume | fresh
    cfg: Any
    cache: Path | None  # the shared prototype cache folder (None: the method has none)
    sets: list[tuple[str, str]]  # the (prompt name, extractor) prototype sets it needs


def split_items(suite: Suite, items: Sequence[str]) -> tuple[dict[str, str], list, dict]:
    """Command-line items -> (suite keys, items for every benchmark, {benchmark: its items})."""
    names = {b.name for b in suite.benchmarks}
    keys: dict[str, str] = {}
    common: list[str] = []
    own: dict[str, list[str]] = {n: [] for n in names}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        head, _, rest = key.partition(".")
        if key in SUITE_KEYS:
            keys[key] = value
        elif head in names and rest:
            own[head].append(f"{rest}={value}")
        else:
            common.append(item)
    return keys, common, own


def _only(value: str | None, suite: Suite) -> list[Benchmark]:
    if value is None:
        return list(suite.benchmarks)
    wanted = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    names = [b.name for b in suite.benchmarks]
    unknown = [w for w in wanted if w not in names]
    if unknown or not wanted:
        raise ConfigError(f"only={value}: expected a list of benchmarks among {names}")
    return [b for b in suite.benchmarks if b.name in wanted]


def suite_folder(suite: Suite, keys: dict[str, str]) -> Path:
    """The suite folder: ``resume`` (must hold a suite.json), else ``output_dir`` (must not hold
    one: continue it with resume=), else ``runs/suite-<name>/<timestamp>``. A rank that rank 0
    started inside one of its benchmarks (Lightning re-runs the command) takes rank 0's folder."""
    from sdzero.run_folder import RUN_DIR_ENV, launched_processes

    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV]).parent
    if launched_processes() > 1 and not (keys.get("output_dir") or keys.get("resume")):
        raise ConfigError(
            "this process is one of several started by torchrun/srun: set output_dir=... (or "
            "resume=...) so that all of them share one suite folder"
        )
    if "resume" in keys:
        path = Path(keys["resume"])
        if not (path / "suite.json").is_file():
            raise ConfigError(f"resume={str(path)!r} is not a suite folder (no suite.json in it)")
        return path.resolve()
    path = Path(keys.get("output_dir") or Path("runs") / f"suite-{suite.name}" / _stamp())
    if (path / "suite.json").is_file():
        raise ConfigError(
            f"output_dir={str(path)!r} already holds a suite; continue it with resume={path} or "
            "choose another output_dir"
        )
    return path.resolve()


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def plan_suite(
    suite: Suite, items: Sequence[str], check_data: bool = True
) -> tuple[Path, list[Plan]]:
    """Compose and check every benchmark's config (and, with ``check_data``, read its dataset's
    annotation files), and find what each run folder holds."""
    from sdzero.config import instantiate
    from sdzero.errors import UserError
    from sdzero.run_folder import check_same_run

    keys, common, own = split_items(suite, items)
    folder = suite_folder(suite, keys)
    plans = []
    for bench in _only(keys.get("only"), suite):
        run_dir = folder / bench.name
        base = [*suite.overrides, *bench.overrides, *common, *own[bench.name]]
        try:
            cfg = compose(bench.experiment, base)
            extra = _cache_override(cfg, suite, base, folder)
            status = _status(run_dir, cfg)
            where = f"resume={run_dir}" if status != "fresh" else f"output_dir={run_dir}"
            cfg = compose(bench.experiment, [*base, *extra, where])
            if status != "fresh":
                check_same_run(cfg, run_dir)
            datamodule = instantiate(cfg.data, key="data")
            if check_data:  # the dataset's files, before any benchmark runs
                datamodule.setup("test")
            cache, sets = _prototype_sets(cfg, datamodule)
        except UserError as err:
            raise ConfigError(f"suite {suite.name}, benchmark {bench.name!r}: {err}") from err
        plans.append(Plan(bench, run_dir, status, cfg, cache, sets))
    return folder, plans


def _status(run_dir: Path, cfg: Any) -> str:
    """``finished`` (metrics.json of the same ``data.limit``), ``resume`` (a started run folder)
    or ``fresh``."""
    from omegaconf import OmegaConf

    if not (run_dir / "config.yaml").is_file():
        return "fresh"
    if (run_dir / "metrics.json").is_file():
        saved = OmegaConf.load(run_dir / "config.yaml")
        if OmegaConf.select(saved, "data.limit") == OmegaConf.select(cfg, "data.limit"):
            return "finished"
    return "resume"


def _cache_override(cfg: Any, suite: Suite, items: Sequence[str], folder: Path) -> list[str]:
    """The item that points every benchmark at one prototype cache (none: the method has no
    ``prototype_cache``, or the items set it; ``run`` would give each benchmark its own)."""
    if "method" not in cfg or "prototype_cache" not in cfg.method:
        return []
    if any(i.split("=", 1)[0].strip() == "method.prototype_cache" for i in items):
        return []
    if suite.prototype_cache == "suite" or cfg.method.prototype_cache == "run":
        return [f"method.prototype_cache={folder / 'prototypes'}"]
    return []


def _prototype_sets(cfg: Any, datamodule: Any) -> tuple[Path | None, list[tuple[str, str]]]:
    """The benchmark's prototype cache folder and the sets it needs, from the method itself
    (no weights are loaded: the method module is only constructed)."""
    if "method" not in cfg or "prototype_cache" not in cfg.method:
        return None, []
    from sdzero.runs import build_method
    from sdzero.segmentation.module import default_cache_root

    module = build_method(cfg)
    if not hasattr(module, "prototype_sets"):
        return None, []
    value = cfg.method.prototype_cache
    cache = default_cache_root() if value is None else Path(value).expanduser()
    return cache.resolve(), module.prototype_sets(datamodule)


def _cache_files(cache: Path | None) -> dict[str, int]:
    """``{file name: mtime_ns}`` of the prototype files in ``cache``."""
    if cache is None or not cache.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")}


def _built(plan: Plan, before: dict[str, int]) -> int:
    """How many of ``plan``'s prototype sets were written since ``before`` (new or rewritten)."""
    from sdzero.segmentation.support import slug

    wanted = {(slug(name), slug(extractor)) for name, extractor in plan.sets}
    after = _cache_files(plan.cache)
    changed = [n for n, t in after.items() if before.get(n) != t]
    return sum(tuple(n.split(".")[:2]) in wanted for n in changed)


def run_suite(suite: Suite, items: Sequence[str]) -> dict[str, Any]:
    """Run (or continue) the suite; returns the ``suite.json`` object (also written, with the
    table and chart, into the suite folder on rank 0)."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    from sdzero.run_folder import RUN_DIR_ENV
    from sdzero.runs import run_eval
    from sdzero.suite_table import read_metrics, write_outputs

    folder, plans = plan_suite(suite, items)
    rank0 = rank_zero_only.rank == 0
    previous = _previous(folder)
    entries: dict[str, dict[str, Any]] = {}
    for plan in plans:
        name = plan.benchmark.name
        counts = dict(previous.get(name, {}).get("prototype_sets") or {"built": 0})
        counts["needed"] = len(plan.sets)
        counts["from_cache"] = max(counts["needed"] - counts["built"], 0)
        entry = {
            "experiment": plan.benchmark.experiment,
            "run_dir": name,
            "status": plan.status,
            "prototype_sets": counts,
        }
        entries[name] = entry
        if plan.status == "finished":
            entry["metrics"] = read_metrics(plan.folder)
            continue
        if not rank0:  # ranks > 0 follow rank 0 into the benchmark's folder
            os.environ[RUN_DIR_ENV] = str(plan.folder)
        before = _cache_files(plan.cache)
        try:
            entry["metrics"] = run_eval(plan.cfg)
            entry["status"] = "finished"
        except BaseException as err:
            entry["status"] = "interrupted"
            if rank0 and isinstance(err, KeyboardInterrupt | SystemExit):
                print(
                    f"\nsdzero: suite interrupted; continue with:\n  {_resume(folder)}",
                    file=sys.stderr,
                )
            raise
        finally:
            counts["built"] += _built(plan, before)
            counts["from_cache"] = max(counts["needed"] - counts["built"], 0)
            if rank0:
                write_outputs(folder, suite, entries, plans)
    summary = write_outputs(folder, suite, entries, plans) if rank0 else {}
    return summary


def _previous(folder: Path) -> dict[str, Any]:
    """The benchmarks of an earlier ``suite.json`` in ``folder`` (their cache counts carry on)."""
    path = folder / "suite.json"
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")).get("benchmarks") or {})
    except (json.JSONDecodeError, AttributeError) as err:
        raise ConfigError(f"{path}: unreadable suite.json ({err}); expected sdzero's") from None


def _resume(folder: Path) -> str:
    args = [a for a in sys.argv[1:] if not a.startswith(("output_dir=", "resume="))]
    return " ".join(["sdzero", *args, f"resume={folder}"])


def _run(args: argparse.Namespace) -> int:
    from sdzero.suite_table import format_table

    summary = run_suite(load_suite(args.suite), args.overrides)
    if summary:
        print(format_table(summary), end="")
        print(f"[suite] wrote {summary['folder']}/suite.json, suite.md, suite.png", file=sys.stderr)
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``sdzero suite``."""
    try:
        names = ", ".join(available("suite"))
    except ConfigError:
        names = ""
    p = sub.add_parser(
        "suite",
        help="several benchmarks in turn (e.g. ovseg8), resumable, one table and chart",
        epilog=f"suites: {names}\n\n{EPILOG}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("suite", help="a name under configs/suite/ or a YAML path")
    p.add_argument(
        "overrides",
        nargs="*",
        help="output_dir=, resume=, only=[...], <benchmark>.key=value, key=value (every benchmark)",
    )
    p.set_defaults(func=_run)
