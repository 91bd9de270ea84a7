"""data.query_points=grid:N and data.reverse: the grid over the source box (known answers), the
reversed pair, PCK skipping points without ground truth, and a run whose records hold the grid
(null targets) while its metrics equal the keypoints-only run's."""

import json
import math

import pytest
import torch

from datamodules.query_points import PairView, grid_points, parse_query_points
from datamodules.spair import SPairDataset
from datamodules.synthetic_correspondence import write_synthetic_spair
from sdzero.config import compose
from sdzero.errors import ConfigError
from sdzero.metrics.pck_breakdown import PCKBreakdown
from sdzero.records import read_records
from sdzero.runs import recompute_metrics, run_eval

NAN = float("nan")


def test_grid_is_the_cell_centres_of_the_box_or_of_the_image():
    box = torch.tensor([10.0, 20.0, 30.0, 60.0])
    assert grid_points(2, box, (100, 100)).tolist() == [
        [15.0, 30.0],
        [25.0, 30.0],
        [15.0, 50.0],
        [25.0, 50.0],
    ]
    whole = grid_points(3, torch.full((4,), NAN), (30, 60))
    assert whole[:, 0].unique().tolist() == [5.0, 15.0, 25.0]
    assert whole[:, 1].unique().tolist() == [10.0, 30.0, 50.0]
    clipped = grid_points(1, torch.tensor([-10.0, -10.0, 50.0, 30.0]), (40, 40))
    assert clipped.tolist() == [[20.0, 15.0]]  # the box clipped to the 40 x 40 image


@pytest.mark.parametrize("spec", ["grid", "grid:0", "grid:-2", "dense:4", "grid:a", ""])
def test_bad_query_points_name_the_key(spec):
    with pytest.raises(ConfigError, match="data.query_points"):
        parse_query_points(spec)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("spair")
    return write_synthetic_spair(root, 2, 64, seed=3, num_train_pairs=4)


def test_view_appends_the_grid_without_targets_and_reverses(synthetic):
    plain = SPairDataset(synthetic, "trn")
    grid = PairView(plain, "grid:4")[1]
    base = plain[1]
    k = len(base["src_kps"])
    assert grid["src_kps"].shape == (k + 16, 2)
    assert torch.equal(grid["src_kps"][:k], base["src_kps"])
    assert torch.isnan(grid["trg_kps"][k:]).all() and torch.equal(
        grid["trg_kps"][:k], base["trg_kps"]
    )
    x1, y1, x2, y2 = base["src_bbox"].tolist()
    inside = grid["src_kps"][k:]
    assert (inside[:, 0] > x1).all() and (inside[:, 0] < x2).all() and (inside[:, 1] > y1).all()
    back = PairView(plain, reverse=True)[1]
    assert torch.equal(back["src_img"], base["trg_img"]) and torch.equal(
        back["trg_kps"], base["src_kps"]
    )
    assert (back["src_name"], back["src_size"]) == (base["trg_name"], base["trg_size"])
    assert back["id"] == base["id"] and back["index"] == base["index"]


def test_pck_skips_points_without_ground_truth():
    pred = torch.tensor([[0.0, 0.0], [50.0, 0.0], [7.0, 7.0], [3.0, 3.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 0.0], [NAN, NAN], [NAN, NAN]])
    with_grid, without = PCKBreakdown(["cat"], alphas=(0.1,)), PCKBreakdown(["cat"], alphas=(0.1,))
    with_grid.update(pred, target, category="cat", threshold_size=100.0, kps_ids=[4, 9])
    without.update(pred[:2], target[:2], category="cat", threshold_size=100.0, kps_ids=[4, 9])
    got, ref = with_grid.compute(), without.compute()
    assert got.pop("num_unlabelled_points") == 2 and "num_unlabelled_points" not in ref
    assert got == ref and got["pck"]["0.1"] == 50.0 and got["num_points"] == 2
    only_grid = PCKBreakdown(["cat"], alphas=(0.1,))
    only_grid.update(pred[2:], target[2:], category="cat")  # no threshold needed: nothing scored
    only_grid.update(pred[:2], target[:2], category="cat", threshold_size=100.0)
    assert only_grid.compute()["num_empty_pairs"] == 1
    half = torch.tensor([[NAN, 0.0]] * 4)
    with pytest.raises(ValueError, match="NaN"):  # one missing coordinate is not "no label"
        PCKBreakdown(["cat"]).update(pred, half, category="cat", threshold_size=1.0)


def _run(out, root, query_points):
    overrides = [
        "method=conv_matcher",
        "data=spair",
        "backbone=tiny",
        "trainer=cpu",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"data.root={root}",
        "data.split=trn",
        f"data.query_points={query_points}",
        "method.image_size=64",
        f"output_dir={out}",
        "visuals=1",
    ]
    return run_eval(compose(None, overrides))


def test_grid_run_records_the_grid_and_scores_the_keypoints_only(synthetic, tmp_path):
    ref = _run(tmp_path / "kps", synthetic, "keypoints")
    got = _run(tmp_path / "grid", synthetic, "grid:3")
    assert got.pop("num_unlabelled_points") == 4 * 9 and "note" in got
    assert "not scored" in got.pop("note")
    timing = ("seconds_per_pair",)
    assert {k: v for k, v in got.items() if k not in timing} == {
        k: v for k, v in ref.items() if k not in timing
    }
    records = {
        r["index"]: r for r in read_records(tmp_path / "grid" / "predictions" / "rank0.jsonl")
    }
    kps = {r["index"]: r for r in read_records(tmp_path / "kps" / "predictions" / "rank0.jsonl")}
    for index, record in records.items():
        k = len(kps[index]["src_kps"])
        assert len(record["src_kps"]) == len(record["pred_kps"]) == k + 9
        assert record["pred_kps"][:k] == kps[index]["pred_kps"]  # each point matched on its own
        assert all(math.isnan(v) for p in record["trg_kps"][k:] for v in p)
    line = (tmp_path / "grid" / "predictions" / "rank0.jsonl").read_text().splitlines()[0]
    assert "[null,null]" in line and "NaN" not in line  # strict JSON
    json.loads(line)
    recomputed = recompute_metrics(tmp_path / "grid")
    metrics = json.loads((tmp_path / "grid" / "metrics.json").read_text())
    assert recomputed == {k: v for k, v in metrics.items() if k not in (*timing, "warning")}
