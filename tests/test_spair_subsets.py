"""data.per_category=N: the first N pairs of each category in the layout file's order, on SPair-71k
and the synthetic SPair; data.limit takes the head of that subset; training splits stay whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from datamodules.spair import SPairDataModule, SPairDataset, first_per_category
from datamodules.synthetic_correspondence import SyntheticCorrespondenceDataModule
from sdzero.config import compose
from sdzero.errors import ConfigError

# layout order: sorted by category as in the real list, with the pair ids out of order in one
LAYOUT = [
    "000003-a1-a2:aeroplane",
    "000001-a3-a4:aeroplane",
    "000002-a5-a6:aeroplane",
    "000004-b1-b2:bicycle",
    "000005-c1-c2:cat",
    "000006-c3-c4:cat",
    "000007-c5-c6:cat",
]


def write_spair(parent: Path, splits: dict[str, list[str]]) -> Path:
    top = parent / "SPair-71k"
    (top / "Layout" / "large").mkdir(parents=True)
    for split, names in splits.items():
        folder = top / "PairAnnotation" / split
        folder.mkdir(parents=True)
        for name in names:
            _, src, trg = name.split(":")[0].split("-")
            cat = name.split(":")[1]
            for image in (src, trg):
                path = top / "JPEGImages" / cat / f"{image}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (20, 20)).save(path)
            record = {
                "category": cat,
                "src_imname": f"{src}.jpg",
                "trg_imname": f"{trg}.jpg",
                "src_bndbox": [0, 0, 10, 10],
                "trg_bndbox": [0, 0, 10, 10],
                "src_kps": [[1, 1]],
                "trg_kps": [[2, 2]],
            }
            (folder / f"{name}.json").write_text(json.dumps(record))
        (top / "Layout" / "large" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return top


def ids(dataset) -> list[str]:
    return [pair.id for pair in dataset.pairs]


def test_first_n_of_each_category_in_layout_order(tmp_path):
    write_spair(tmp_path, {"test": LAYOUT})
    assert ids(SPairDataset(tmp_path, per_category=2)) == [
        "000003-a1-a2:aeroplane",
        "000001-a3-a4:aeroplane",
        "000004-b1-b2:bicycle",
        "000005-c1-c2:cat",
        "000006-c3-c4:cat",
    ]
    assert ids(SPairDataset(tmp_path, per_category=10)) == LAYOUT
    assert ids(SPairDataset(tmp_path, category="cat", per_category=1)) == ["000005-c1-c2:cat"]
    items = [("x", "b"), ("y", "a"), ("z", "b"), ("w", "b")]  # not grouped: order is kept
    assert first_per_category(items, 2) == [("x", "b"), ("y", "a"), ("z", "b")]


def test_limit_applies_after_the_subset_and_training_splits_stay_whole(tmp_path):
    write_spair(tmp_path, {"test": LAYOUT, "trn": LAYOUT[:3], "val": LAYOUT[3:]})
    dm = SPairDataModule(str(tmp_path), per_category=1, limit=2)
    assert dm.split_size == 3  # the evaluated split is the subset (before limit)
    assert dm.category_names == ["aeroplane", "bicycle", "cat"]
    assert [s["id"] for s in dm.test_dataloader()] == [LAYOUT[0], LAYOUT[3]]
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 4


@pytest.mark.parametrize("value", [0, -2, True])
def test_per_category_must_be_a_positive_integer(tmp_path, value):
    with pytest.raises(ConfigError, match="data.per_category must be a positive integer"):
        SPairDataModule(str(tmp_path), per_category=value)
    with pytest.raises(ConfigError, match="data.per_category"):
        SyntheticCorrespondenceDataModule(per_category=value)


def test_synthetic_spair_takes_the_first_pairs_of_each_shape(tmp_path):
    dm = SyntheticCorrespondenceDataModule(str(tmp_path), num_pairs=5, image_size=64)
    subset = SyntheticCorrespondenceDataModule(
        str(tmp_path), num_pairs=5, image_size=64, per_category=2
    )
    everything = [s["id"] for s in dm.test_dataloader()]  # discs, squares, discs, ...
    assert (dm.split_size, subset.split_size) == (5, 4)
    assert [s["id"] for s in subset.test_dataloader()] == everything[:4]
    assert [s["category"] for s in subset.test_dataloader()] == ["discs", "squares"] * 2


def test_the_key_composes_for_both_data_options(tmp_path):
    for data in ("spair", "synthetic_correspondence"):
        cfg = compose(None, [f"data={data}", f"data.root={tmp_path}", "data.per_category=20"])
        assert cfg.data.per_category == 20
