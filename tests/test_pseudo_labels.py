"""Pseudo-labels read from run folders (datamodules.pseudo_labels): labels and their filters on
synthetic shifted pairs whose true match is known everywhere (the pair's shift), the counts of what
each filter drops, and the hygiene checks (test splits refused, differing runs flagged, a changed
dataset, malformed folders)."""

import logging

import pytest
import torch
from label_runs import teacher_run

from datamodules.pseudo_labels import SPairPseudoLabels
from datamodules.synthetic_correspondence import write_synthetic_spair
from sdzero.config import compose, save_config
from sdzero.errors import ConfigError, MissingFileError
from sdzero.records import RecordWriter

GRID = 3


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spair")
    return write_synthetic_spair(
        folder, 2, 64, seed=1, kind="shift", num_train_pairs=5, num_val_pairs=2
    )


def shift_of(sample):
    """The pair's true displacement (every point of a shifted pair moves by it)."""
    known = ~torch.isnan(sample["trg_kps"]).any(1)
    return (sample["trg_kps"][known] - sample["src_kps"][known])[0]


def truth(sample):
    return sample["src_kps"] + shift_of(sample)


def teacher(out, root, predict=truth, grid=GRID, **keys):
    return teacher_run(out, root, predict, grid=grid, **keys)


def labels(root, runs, **keys):
    datamodule = SPairPseudoLabels(root=str(root), runs=[str(r) for r in runs], **keys)
    datamodule.setup("fit")
    return datamodule


def test_grid_predictions_label_the_pairs_and_the_keypoints_are_counted_out(root, tmp_path):
    run = teacher(tmp_path / "run", root)
    dm = labels(root, [run])
    pairs, counts = dm.train_set, dm.label_counts
    assert len(pairs) == 5 and counts["kept"] == 5 * GRID * GRID and counts["pairs"] == 5
    annotated = sum(len(dm.build_split("trn")[i]["src_kps"]) for i in range(5))
    assert counts["annotated"] == annotated and counts.summary().endswith(f"annotated {annotated}")
    sample = pairs[2]
    raw = dm.build_split("trn")[2]
    assert torch.equal(sample["src_img"], raw["src_img"]) and sample["extra"] == {}
    assert torch.allclose(sample["trg_kps"], sample["src_kps"] + shift_of(raw))  # the run's labels
    assert len(dm.val_set) == 2 and len(dm.dataset) == 2  # ground-truth val, the test split


def test_ground_truth_labels_are_the_annotated_targets(root, tmp_path):
    run = teacher(tmp_path / "run", root, predict=lambda s: torch.zeros_like(s["src_kps"]))
    dm = labels(root, [run], labels="ground_truth")
    raw = dm.build_split("trn")
    for i in range(5):
        assert torch.equal(dm.train_set[i]["src_kps"], raw[i]["src_kps"])
        assert torch.equal(dm.train_set[i]["trg_kps"], raw[i]["trg_kps"])
    assert dm.label_counts["no_label"] == 5 * GRID * GRID  # the grid has no ground truth


def test_cycle_consistency_drops_exactly_the_corrupted_labels(root, tmp_path):
    def corrupted(sample):
        pred = truth(sample)
        x1, y1, x2, y2 = sample["src_bbox"].tolist()
        k = len(pred) - GRID * GRID  # the first grid point goes one cell down and right
        pred[k] += torch.tensor([(x2 - x1) / GRID, (y2 - y1) / GRID])
        return pred

    forward = teacher(tmp_path / "fwd", root, predict=corrupted)
    backward = teacher(tmp_path / "bwd", root, reverse=True)
    dm = labels(root, [forward, backward], cycle_alpha=0.02)
    counts = dm.label_counts
    # each corrupted forward label fails, and so does the reverse label at its target: the round
    # trip through the corrupted prediction cannot tell which direction was wrong
    assert counts["cycle"] == 2 * 5 and counts["kept"] == 2 * 5 * GRID * GRID - 2 * 5
    pairs = [dm.train_set[i] for i in range(10)]
    assert all(torch.allclose(s["trg_kps"], s["src_kps"] + shift_of(s)) for s in pairs)
    reversed_pair = dm.train_set[5]
    raw = dm.build_split("trn")[0]
    assert torch.equal(reversed_pair["src_img"], raw["trg_img"])  # the reverse run's direction
    with pytest.raises(ConfigError, match="other direction"):
        labels(root, [forward], cycle_alpha=0.02)


def test_outside_and_max_per_pair_are_counted_and_keyed(root, tmp_path):
    def one_outside(sample):
        pred = truth(sample)
        pred[-1] = torch.tensor([-3.0, 5.0])
        return pred

    run = teacher(tmp_path / "run", root, predict=one_outside)
    dm = labels(root, [run], max_per_pair=4)
    counts = dm.label_counts
    assert counts["outside"] == 5 and counts["kept"] == 5 * 4
    assert counts["max_per_pair"] == 5 * (GRID * GRID - 1 - 4)
    again = labels(root, [run], max_per_pair=4)
    assert all(
        torch.equal(dm.train_set[i]["src_kps"], again.train_set[i]["src_kps"]) for i in range(5)
    )
    assert {len(dm.train_set[i]["src_kps"]) for i in range(5)} == {4}


def test_test_split_records_are_refused(root, tmp_path):
    run = teacher(tmp_path / "test", root, split="test")
    with pytest.raises(ConfigError, match="test-split records is refused"):
        labels(root, [run])
    synthetic = tmp_path / "synthetic"  # a datamodule without a split evaluates its test split
    synthetic.mkdir()
    save_config(compose("demo_train"), synthetic / "config.yaml")
    record = {"index": 0, "id": "x", "src_kps": [], "trg_kps": [], "pred_kps": []}
    with RecordWriter(synthetic / "predictions" / "rank0.jsonl") as writer:
        writer.write({**record, "src_size": [64, 64], "trg_size": [64, 64]})
    with pytest.raises(ConfigError, match="'test' split"):
        labels(root, [synthetic])


def test_runs_that_differ_are_flagged(root, tmp_path, caplog):
    a = teacher(tmp_path / "a", root)
    b = teacher(tmp_path / "b", root, backbone="sd21", method="dift")
    val = teacher(tmp_path / "val", root, split="val")
    with caplog.at_level(logging.WARNING):
        dm = labels(root, [a, b, val])
    text = caplog.text
    assert "another backbone" in text and "another method" in text and "another split" in text
    assert "which data.val_split validates on" in text
    assert dm.label_counts["pairs"] == 5 + 5 + 2
    sd15 = teacher(tmp_path / "sd15", root, backbone="sd15")  # the backbone alone differs
    with pytest.raises(ConfigError, match="another backbone.*mixed_runs=error"):
        labels(root, [a, sd15], mixed_runs="error")


def test_broken_runs_are_one_line_errors(root, tmp_path):
    with pytest.raises(MissingFileError, match="no config.yaml"):
        labels(root, [tmp_path / "nothing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    save_config(
        compose(None, ["data=spair", f"data.root={root}", "data.split=trn"]), empty / "config.yaml"
    )
    with pytest.raises(MissingFileError, match="holds no records"):
        labels(root, [empty])
    run = teacher(tmp_path / "run", root)
    with pytest.raises(ConfigError, match="confidence"):
        labels(root, [run], min_confidence=0.5)
    with pytest.raises(ConfigError, match="at least one run"):
        labels(root, [])
    only_keypoints = teacher(tmp_path / "kps", root, grid=0)
    with pytest.raises(ConfigError, match="no label is left.*grid:N"):
        labels(root, [only_keypoints])
    changed = teacher(tmp_path / "changed", root)
    lines = (changed / "predictions" / "rank0.jsonl").read_text().replace('"000001-', '"000009-')
    (changed / "predictions" / "rank0.jsonl").write_text(lines)
    with pytest.raises(Exception, match="the dataset changed"):
        labels(root, [changed])
    for key, value in (("labels", "teacher"), ("mixed_runs", "ignore"), ("max_per_pair", 0)):
        with pytest.raises(ConfigError, match=f"data.{key}"):
            SPairPseudoLabels(root=str(root), runs=[str(run)], **{key: value})
