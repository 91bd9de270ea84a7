"""The suite's outputs: ``suite.json``, the markdown table ``suite.md`` and the chart ``suite.png``.

One row per benchmark: its headline metric (the suite's ``metric``, read from the run folder as
``sdzero report`` reads it), then one column per published method of ``published.yaml`` that
reports that metric on any of the suite's datasets, then seconds per sample and the prototype sets
the benchmark built against those it needed. The chart is ``sdzero report``'s, restricted to the
suite's metric.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdzero.errors import InputError
from sdzero.records import write_bytes_atomic, write_json_atomic
from sdzero.report import RANDOM_MARK, Row, build_rows, load_published, read_run, to_chart


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """A finished run folder's ``metrics.json`` object."""
    path = Path(run_dir) / "metrics.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable metrics.json ({err})") from None


def _headline(folder: Path, entry: dict[str, Any], metric: str) -> Row | None:
    if "metrics" not in entry:
        return None
    rows = [r for r in read_run(folder / entry["run_dir"]) if r.metric == metric]
    return rows[0] if rows else None


def summarise(folder: Path, suite: Any, entries: dict[str, dict[str, Any]], plans: list) -> dict:
    """The ``suite.json`` object."""
    sets = [s for p in plans for s in p.sets]
    datasets = {e["metrics"].get("dataset") for e in entries.values() if "metrics" in e} - {None}
    published = [
        {"method": r.method, "dataset": r.dataset, "value": r.value, "source": r.source}
        for r in load_published()
        if r.dataset in datasets and r.metric == suite.metric
    ]
    built = sum(e["prototype_sets"].get("built", 0) for e in entries.values())
    return {
        "suite": suite.name,
        "task": suite.task,
        "metric": suite.metric,
        "folder": str(folder),
        "benchmarks": entries,
        "prototype_sets": {
            "needed": len(sets),
            "distinct": len(set(sets)),
            "distinct_names": len({name for name, _ in sets}),
            "built": built,
            "from_cache": max(len(sets) - built, 0),
        },
        "published": published,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The suite's markdown table (values to one decimal; ``-``: not measured / not published)."""
    folder, metric = Path(summary["folder"]), summary["metric"]
    methods = list(dict.fromkeys(p["method"] for p in summary["published"]))
    published = {(p["method"], p["dataset"]): p["value"] for p in summary["published"]}
    header = ["benchmark", "dataset", "status", "samples", f"sdzero {metric}", *methods]
    header += ["s/sample", "prototype sets built/needed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    random = False
    for name, entry in summary["benchmarks"].items():
        metrics = entry.get("metrics") or {}
        row = _headline(folder, entry, metric)
        value = "-" if row is None or row.value is None else f"{row.value:.1f}"
        if row is not None and row.note == RANDOM_MARK:
            value, random = f"{value} (random weights)", True
        dataset = metrics.get("dataset", "-")
        samples = metrics.get("num_images", metrics.get("num_pairs", "-"))
        seconds = metrics.get("seconds_per_image", metrics.get("seconds_per_pair"))
        counts = entry["prototype_sets"]
        cells = [name, dataset, entry["status"], str(samples), value]
        cells += [_fmt(published.get((m, dataset))) for m in methods]
        cells += [_fmt(seconds, 2), f"{counts.get('built', 0)}/{counts.get('needed', 0)}"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    totals = summary["prototype_sets"]
    lines += [
        "",
        f"Prototype sets: {totals['needed']} needed over the benchmarks, {totals['distinct']} "
        f"distinct ({totals['distinct_names']} class names); {totals['built']} built, "
        f"{totals['from_cache']} from the cache.",
    ]
    if random:
        lines.append(f"{RANDOM_MARK}: such numbers are meaningless and must not be reported.")
    return "\n".join(lines) + "\n"


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def write_outputs(
    folder: Path, suite: Any, entries: dict[str, dict[str, Any]], plans: list
) -> dict[str, Any]:
    """Write ``suite.json``, ``suite.md`` and (once a benchmark finished) ``suite.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarise(folder, suite, entries, plans)
    write_json_atomic(folder / "suite.json", summary)
    write_bytes_atomic(folder / "suite.md", format_table(summary).encode())
    finished = [folder / e["run_dir"] for e in entries.values() if "metrics" in e]
    if finished:
        rows = [r for r in build_rows(finished) if r.metric == suite.metric]
        to_chart(rows).save(folder / "suite.png")
    return summary
