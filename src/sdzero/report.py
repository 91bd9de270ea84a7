"""``sdzero report RUN_DIR [RUN_DIR ...] [--out PREFIX] [--per-category]``: one table of runs.

Each run folder's ``metrics.json`` (and ``config.yaml``, for the method and scoring keys) gives one
row per headline metric: correspondence ``pck@0.1`` (mean over pairs) and ``pck_point@0.1`` (pooled
over points), segmentation ``miou``; all in %. Beside them go the published numbers of the same
benchmarks from ``published.yaml`` (shipped in the package). Written: ``PREFIX.md`` (also
printed), ``PREFIX.csv`` and ``PREFIX.png`` (horizontal bars, drawn with PIL).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw, ImageFont

from sdzero.errors import InputError

HEADLINE_ALPHA = "0.1"
RANDOM_MARK = "RANDOM WEIGHTS"
COLUMNS = ("source", "method", "dataset", "protocol", "metric", "value", "note")
PUBLISHED_KEYS = ("method", "benchmark", "metric", "value", "protocol", "source")


@dataclass(frozen=True)
class Row:
    """One number of the table: a run's headline metric or a published reference (``value`` in
    %, None when the run did not measure it); ``per_category``: name -> % (runs only)."""

    source: str
    method: str
    dataset: str
    protocol: str
    metric: str
    value: float | None
    note: str = ""
    per_category: dict[str, float | None] = field(default_factory=dict)

    @property
    def published(self) -> bool:
        return self.source.startswith("published")


def load_published() -> list[Row]:
    """The reference numbers of ``sdzero/published.yaml``, one :class:`Row` each."""
    text = resources.files("sdzero").joinpath("published.yaml").read_text(encoding="utf-8")
    rows = []
    for i, entry in enumerate(yaml.safe_load(text)):
        missing = [k for k in PUBLISHED_KEYS if k not in entry]
        if missing or not isinstance(entry["value"], int | float):
            raise ValueError(f"published.yaml entry {i}: needs {PUBLISHED_KEYS}, got {entry}")
        rows.append(
            Row(
                source=f"published: {entry['source']}",
                method=str(entry["method"]),
                dataset=str(entry["benchmark"]),
                protocol=str(entry["protocol"]),
                metric=str(entry["metric"]),
                value=float(entry["value"]),
            )
        )
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(
            f"run folder {str(path.parent)!r}: no metrics.json (expected a finished run folder "
            "of `sdzero eval`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(data, dict) or data.get("task") not in ("correspondence", "segmentation"):
        raise InputError(
            f"{path}: expected a metrics.json object with task correspondence or segmentation"
        )
    return data


def _read_config(path: Path) -> dict[str, Any]:
    """The run's resolved config, or {} when the folder has none (a copied metrics.json)."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise InputError(f"{path}: unreadable YAML ({err})") from None
    return data if isinstance(data, dict) else {}


def _method_name(config: dict[str, Any]) -> str:
    """``<choices.method> (<class of method._target_>)``, or what of it the config has."""
    target = str((config.get("method") or {}).get("_target_", "")).rsplit(".", 1)[-1]
    choice = str((config.get("choices") or {}).get("method", ""))
    if choice and target:
        return f"{choice} ({target})"
    return choice or target or "?"


def _protocol(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    """``metrics.json``'s named preset, else the scoring keys (``method.pck_threshold``,
    ``pck_frame``, ``pck_inclusive``; metrics.json's own copies when the config lacks them)."""
    if metrics.get("protocol"):
        return str(metrics["protocol"])
    if metrics["task"] != "correspondence":
        return "-"
    method = config.get("method") or {}
    threshold = method.get("pck_threshold", metrics.get("threshold", "?"))
    frame = method.get("pck_frame", metrics.get("frame", "?"))
    inclusive = method.get("pck_inclusive", metrics.get("inclusive"))
    rule = {True: "<=", False: "<"}.get(inclusive, "?")
    return f"threshold={threshold} frame={frame} {rule}"


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _at(values: Any, alpha: str) -> float | None:
    """``values[alpha]`` of a ``{alpha: %}`` mapping (None when absent)."""
    return _number(values.get(alpha)) if isinstance(values, dict) else None


def read_run(run_dir: str | Path) -> list[Row]:
    """The headline rows of one run folder (:class:`InputError` if it is not one)."""
    run = Path(run_dir)
    if run.is_file():
        raise InputError(f"run folder {str(run)!r} is a file; expected a run folder")
    if not run.is_dir():
        raise InputError(f"run folder {str(run)!r}: no such folder")
    metrics = _read_json(run / "metrics.json")
    config = _read_config(run / "config.yaml")
    common = {
        "source": str(run),
        "method": _method_name(config),
        "dataset": str(metrics.get("dataset") or "?"),
        "protocol": _protocol(metrics, config),
        "note": RANDOM_MARK if metrics.get("warning") else "",
    }
    if metrics["task"] == "segmentation":
        per_class = metrics.get("per_class_iou") or {}
        return [
            Row(
                **common,
                metric="miou",
                value=_number(metrics.get("miou")),
                per_category={k: _number(v) for k, v in per_class.items()},
            )
        ]
    rows = []
    for key, breakdown in (("pck", "per_category"), ("pck_point", "per_category_point")):
        per_category = metrics.get(breakdown) or {}
        rows.append(
            Row(
                **common,
                metric=f"{key}@{HEADLINE_ALPHA}",
                value=_at(metrics.get(key), HEADLINE_ALPHA),
                per_category={k: _at(v, HEADLINE_ALPHA) for k, v in per_category.items()},
            )
        )
    return rows


def build_rows(run_dirs: list[str | Path]) -> list[Row]:
    """Every run's rows, and after each benchmark's runs the published rows of that benchmark
    (in the file's order)."""
    runs = [row for run in run_dirs for row in read_run(run)]
    published = load_published()
    rows: list[Row] = []
    for dataset in dict.fromkeys(r.dataset for r in runs):
        rows += [r for r in runs if r.dataset == dataset]
        rows += [p for p in published if p.dataset == dataset]
    return rows


def category_names(rows: list[Row]) -> list[str]:
    """The per-category columns: every category of the runs, in order of first appearance."""
    return list(dict.fromkeys(name for r in rows for name in r.per_category))


def _cells(row: Row, categories: list[str], fmt: Any) -> list[str]:
    values = [row.source, row.method, row.dataset, row.protocol, row.metric, fmt(row.value)]
    return [*values, row.note, *(fmt(row.per_category.get(c)) for c in categories)]


def to_markdown(rows: list[Row], per_category: bool = False) -> str:
    """The table in GitHub markdown, values to one decimal (``-``: not measured)."""
    categories = category_names(rows) if per_category else []

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        "| " + " | ".join([*COLUMNS, *categories]) + " |",
        "|" + "---|" * (len(COLUMNS) + len(categories)),
    ]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in _cells(row, categories, fmt)]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.note == RANDOM_MARK for r in rows):
        lines += ["", f"{RANDOM_MARK}: the run's backbone had random weights; its numbers are "]
        lines[-1] += "meaningless and must not be reported."
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row], per_category: bool = False) -> str:
    """The table as CSV, values at full precision (empty: not measured)."""
    categories = category_names(rows) if per_category else []
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*COLUMNS, *categories])
    for row in rows:
        writer.writerow(_cells(row, categories, lambda v: "" if v is None else repr(v)))
    return out.getvalue()


RUN_COLOUR, RANDOM_COLOUR, PUBLISHED_COLOUR = (52, 101, 164), (186, 189, 182), (245, 121, 0)
LABEL_W, BAR_W, VALUE_W, ROW_H, PAD = 360, 420, 60, 22, 10


def chart_groups(rows: list[Row]) -> list[tuple[str, list[Row]]]:
    """``[(benchmark and metric, rows), ...]``: per benchmark and headline metric of the runs, the
    runs' rows with a value, then the published rows of that benchmark and metric."""
    groups = []
    runs = [r for r in rows if not r.published and r.value is not None]
    for dataset, metric in dict.fromkeys((r.dataset, r.metric) for r in runs):
        members = [r for r in rows if (r.dataset, r.metric) == (dataset, metric)]
        groups.append((f"{dataset}: {metric}", [r for r in members if r.value is not None]))
    return groups


def to_chart(rows: list[Row]) -> Image.Image:
    """Horizontal bars on a 0-100 % scale: runs blue (grey when RANDOM WEIGHTS), published
    numbers orange, each labelled with its method and value."""
    groups = chart_groups(rows)
    height = PAD + sum(ROW_H * (1 + len(members)) + PAD for _, members in groups) + PAD
    image = Image.new("RGB", (LABEL_W + BAR_W + VALUE_W + 2 * PAD, max(height, 3 * PAD)), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    y = PAD
    for title, members in groups:
        draw.text((PAD, y + 4), title, fill="black", font=font)
        y += ROW_H
        for row in members:
            if row.published:
                label, colour = f"{row.method} (published)", PUBLISHED_COLOUR
            elif row.note == RANDOM_MARK:
                label, colour = f"{row.method} [{RANDOM_MARK}]", RANDOM_COLOUR
            else:
                label, colour = f"{row.method} ({Path(row.source).name})", RUN_COLOUR
            draw.text((PAD, y + 4), label[:58], fill="black", font=font)
            width = round(BAR_W * min(max(row.value or 0.0, 0.0), 100.0) / 100.0)
            x0 = PAD + LABEL_W
            draw.rectangle([x0, y + 3, x0 + max(width, 1), y + ROW_H - 3], fill=colour)
            draw.text((x0 + BAR_W + 6, y + 4), f"{row.value:.1f}", fill="black", font=font)
            y += ROW_H
        y += PAD
    return image


def write_report(
    run_dirs: list[str | Path], out: str | Path, per_category: bool = False
) -> tuple[str, list[Path]]:
    """Read the runs, write ``out.md``, ``out.csv`` and ``out.png``; returns the markdown and
    the written paths. Every run folder is read before anything is written."""
    rows = build_rows(run_dirs)
    prefix = Path(out)
    if prefix.parent and not prefix.parent.is_dir():
        raise InputError(f"--out {str(out)!r}: folder {str(prefix.parent)!r} does not exist")
    markdown = to_markdown(rows, per_category)
    paths = [prefix.with_name(prefix.name + ext) for ext in (".md", ".csv", ".png")]
    paths[0].write_text(markdown, encoding="utf-8")
    paths[1].write_text(to_csv(rows, per_category), encoding="utf-8")
    to_chart(rows).save(paths[2])
    return markdown, paths


def _run(args: argparse.Namespace) -> int:
    markdown, paths = write_report(args.run_dirs, args.out, args.per_category)
    print(markdown, end="")
    print(f"[report] wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``sdzero report``."""
    p = sub.add_parser(
        "report", help="one table (markdown, CSV, chart) of runs beside published numbers"
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders of `sdzero eval`")
    p.add_argument(
        "--out", default="report", help="output prefix: PREFIX.md/.csv/.png (default: report)"
    )
    p.add_argument(
        "--per-category", action="store_true", help="add one column per category / class"
    )
    p.set_defaults(func=_run)
