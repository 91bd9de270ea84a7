"""``sdzero report``: two hand-written run folders (no model runs) beside the published numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from sdzero.cli import main
from sdzero.report import (
    PUBLISHED_COLOUR,
    RANDOM_COLOUR,
    RUN_COLOUR,
    build_rows,
    load_published,
)

CORR_METRICS = {
    "task": "correspondence",
    "dataset": "spair71k",
    "split_size": 12234,
    "num_pairs": 2,
    "num_points": 5,
    "pck": {"0.05": 25.0, "0.1": 50.0, "0.15": 75.0},
    "pck_point": {"0.05": 20.0, "0.1": 60.0, "0.15": 80.0},
    "threshold": "bbox-source",
    "frame": "resized",
    "per_category": {"cat": {"0.1": 100.0}, "dog": {"0.1": 0.0}},
    "per_category_point": {"cat": {"0.1": 66.66666666666667}, "dog": {"0.1": 50.0}},
    "seconds_per_pair": 1.5,
    "inclusive": True,
    "warning": "RANDOM WEIGHTS: meaningless",
}
SEG_METRICS = {
    "task": "segmentation",
    "dataset": "voc2012",
    "split_size": 1449,
    "num_images": 3,
    "miou": 41.25,
    "per_class_iou": {"background": 80.0, "cat": 2.5, "dog": None},
    "seconds_per_image": 2.0,
    "protocol": "ovdiff-voc",
}


def _run_folder(root: Path, name: str, metrics: dict, target: str, choice: str, **keys) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {"method": {"_target_": target, **keys}, "choices": {"method": choice}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    corr = _run_folder(
        tmp_path,
        "corr",
        CORR_METRICS,
        "sdzero.correspondence.module.PromptCorrespondenceModule",
        "ldm_corr",
        pck_threshold="bbox-source",
        pck_frame="resized",
        pck_inclusive=True,
    )
    seg = _run_folder(
        tmp_path, "seg", SEG_METRICS, "sdzero.segmentation.module.OVDiffModule", "ovdiff"
    )
    return [corr, seg]


def _published(dataset: str) -> list:
    return [p for p in load_published() if p.dataset == dataset]


def test_csv_rows_are_the_runs_then_the_published_numbers_of_their_benchmarks(runs, tmp_path):
    out = tmp_path / "out" / "table"
    out.parent.mkdir()
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    spair, voc = _published("spair71k"), _published("voc2012")
    assert len(rows) == 3 + len(spair) + len(voc)
    corr_pck, corr_point = rows[0], rows[1]
    assert corr_pck["method"] == "ldm_corr (PromptCorrespondenceModule)"
    assert (corr_pck["metric"], float(corr_pck["value"])) == ("pck@0.1", 50.0)
    assert (corr_point["metric"], float(corr_point["value"])) == ("pck_point@0.1", 60.0)
    assert corr_pck["protocol"] == "threshold=bbox-source frame=resized <="
    assert corr_pck["note"] == "RANDOM WEIGHTS"
    published = rows[2 : 2 + len(spair)]
    assert [(r["method"], float(r["value"])) for r in published] == [
        (p.method, p.value) for p in spair
    ]
    seg = rows[2 + len(spair)]
    assert (seg["method"], seg["dataset"], seg["protocol"]) == (
        "ovdiff (OVDiffModule)",
        "voc2012",
        "ovdiff-voc",
    )
    assert (seg["metric"], float(seg["value"]), seg["note"]) == ("miou", 41.25, "")
    assert {r["dataset"] for r in rows} == {"spair71k", "voc2012"}  # no CUB / PF-Willow rows


def test_published_numbers_of_the_same_benchmark_appear(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "r.md").read_text()
    for method, value in [
        ("Hedlin et al. (LDM-corr)", "45.4"),
        ("DIFT (Tang et al.)", "52.9"),
        ("SD+DINO (Zhang et al.)", "59.9"),
        ("GeoAware-SC zero-shot (Zhang et al.)", "65.4"),
        ("OVDiff (SD+DINO+CLIP)", "67.1"),
        ("SCLIP", "59.6"),
        ("NACLIP", "64.1"),
    ]:
        assert any(method in line and f"| {value} |" in line for line in printed.splitlines())
    assert "| 84.3 |" not in printed  # PF-Willow's number: no PF-Willow run
    assert "| 50.0 | RANDOM WEIGHTS |" in printed
    assert "meaningless" in printed.splitlines()[-1]


def test_per_category_columns(runs, tmp_path):
    out = tmp_path / "r"
    assert main(["report", *map(str, runs), "--out", str(out), "--per-category"]) == 0
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [k for k in rows[0] if k in ("cat", "dog", "background")] == ["cat", "dog", "background"]
    assert (float(rows[0]["cat"]), float(rows[0]["dog"]), rows[0]["background"]) == (100.0, 0.0, "")
    assert float(rows[1]["cat"]) == pytest.approx(66.66666666666667)
    seg = next(r for r in rows if r["metric"] == "miou")
    assert (float(seg["background"]), float(seg["cat"]), seg["dog"]) == (80.0, 2.5, "")
    header = (out.with_suffix(".md")).read_text().splitlines()[0]
    assert header.endswith("| note | cat | dog | background |")


def test_chart_has_one_bar_per_number_in_the_right_colours(runs, tmp_path):
    out = tmp_path / "r"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    image = Image.open(out.with_suffix(".png")).convert("RGB")
    colours = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    assert {RANDOM_COLOUR, PUBLISHED_COLOUR, RUN_COLOUR} <= colours
    spair_pck = [p for p in _published("spair71k") if p.metric == "pck@0.1"]
    bars = 2 + 1 + len(spair_pck) + len(_published("voc2012"))  # run bars + published bars
    assert image.height == 10 + 22 * (3 + bars) + 10 * 3 + 10


def test_a_random_weight_run_is_never_drawn_in_the_run_colour(runs, tmp_path):
    assert main(["report", str(runs[0]), "--out", str(tmp_path / "r")]) == 0
    image = Image.open(tmp_path / "r.png").convert("RGB")
    colours = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    assert RANDOM_COLOUR in colours and RUN_COLOUR not in colours


def test_protocol_key_of_metrics_json_wins_over_the_scoring_keys(runs):
    (runs[0] / "metrics.json").write_text(json.dumps({**CORR_METRICS, "protocol": "hedlin"}))
    assert {r.protocol for r in build_rows([runs[0]]) if not r.published} == {"hedlin"}


def test_published_entries_are_complete():
    rows = load_published()
    assert len(rows) >= 26
    assert all(r.protocol and r.source.removeprefix("published: ") for r in rows)
    by_key = {(r.method.split(" ")[0], r.dataset, r.metric): r.value for r in rows}
    assert by_key[("Hedlin", "pfwillow", "pck@0.1")] == 84.3
    assert by_key[("Hedlin", "cub200", "pck@0.05")] == 61.6
    assert by_key[("NACLIP", "ade20k", "miou")] == 19.1


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda d: d.mkdir(), "no metrics.json"),
        (lambda d: (d.mkdir(), (d / "metrics.json").write_text("{not json")), "unreadable JSON"),
        (lambda d: (d.mkdir(), (d / "metrics.json").write_text("[1]")), "task correspondence"),
        (lambda d: None, "no such folder"),
    ],
)
def test_bad_run_folders_are_one_line_errors(tmp_path, capsys, setup, fragment):
    bad = tmp_path / "bad"
    setup(bad)
    assert main(["report", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdzero: error:") and fragment in err[0]
    assert str(bad) in err[0]
    assert not (tmp_path / "r.md").exists()


def test_a_run_without_config_or_alpha_0_1_reports_what_it_has(tmp_path):
    run = tmp_path / "copied"
    run.mkdir()
    metrics = {**CORR_METRICS, "pck": {"0.05": 25.0}, "inclusive": False}
    (run / "metrics.json").write_text(json.dumps(metrics))
    own = [r for r in build_rows([run]) if not r.published]
    assert [(r.method, r.metric, r.value) for r in own] == [
        ("?", "pck@0.1", None),
        ("?", "pck_point@0.1", 60.0),
    ]
    assert own[0].protocol == "threshold=bbox-source frame=resized <"  # from metrics.json
