"""The COCO-Object and COCO-Stuff datamodules on fixtures in the official on-disk format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from segmentation_files import read_samples, save_jpeg, save_label, write_coco

from datamodules.coco import COCOObjectDataModule, COCOStuffDataModule, object_lookup, stuff_lookup
from datamodules.files import DatasetFormatError

# The labels of the columns of RAW_VALUES (segmentation_files.py) after conversion.
OBJECT_EXPECTED = [1, 6, 0, 0, 0, 0, 80, 0]
STUFF_EXPECTED = [0, 5, 84, 255, 255, 255, 79, 170]


def test_coco_object_and_stuff_convert_raw_stuffthingmaps(tmp_path: Path) -> None:
    write_coco(tmp_path / "coco_stuff164k", ["000000000285", "000000000139"])
    obj = COCOObjectDataModule(str(tmp_path))
    samples = read_samples(obj)
    assert [s["id"] for s in samples] == ["000000000139", "000000000285"]  # sorted file names
    assert samples[0]["label"][1].tolist() == OBJECT_EXPECTED
    assert obj.class_names[6] == "bus" and obj.dataset_name == "coco-object"
    stuff = COCOStuffDataModule(str(tmp_path / "coco_stuff164k"))
    assert read_samples(stuff)[0]["label"][1].tolist() == STUFF_EXPECTED
    assert stuff.class_names[5] == "bus" and stuff.class_names[84] == "building-other"


def test_coco_lookup_tables_are_the_official_bijections() -> None:
    stuff, obj = stuff_lookup(), object_lookup()
    used = [v for v in range(256) if stuff[v] != 255]
    assert len(used) == 171 and stuff[used].tolist() == list(range(171))
    assert max(used) == 181 and {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}.isdisjoint(used)
    things = [v for v in range(256) if obj[v] != 0]
    assert len(things) == 80 and obj[things].tolist() == list(range(1, 81))
    assert max(things) == 89 and torch.equal(obj[things], stuff[things] + 1)


def test_coco_reads_preconverted_maps_only_when_all_present(tmp_path: Path) -> None:
    top = tmp_path / "coco_stuff164k"
    raw = write_coco(top, ["a", "b"])
    ann = top / "annotations" / "val2017"
    save_label(ann / "a_instanceTrainIds.png", np.full_like(raw, 7), palette=False)
    # Only one image converted: the raw maps are used for both.
    assert (
        read_samples(COCOObjectDataModule(str(tmp_path)))[0]["label"][1].tolist() == OBJECT_EXPECTED
    )
    save_label(ann / "b_instanceTrainIds.png", np.full_like(raw, 7), palette=False)
    dm = COCOObjectDataModule(str(tmp_path))
    assert all(bool((s["label"] == 7).all()) for s in read_samples(dm))
    assert (
        read_samples(COCOStuffDataModule(str(tmp_path)))[0]["label"][1].tolist() == STUFF_EXPECTED
    )


def test_coco_image_without_annotation_is_named(tmp_path: Path) -> None:
    write_coco(tmp_path, ["a"])
    save_jpeg(tmp_path / "images" / "val2017" / "orphan.jpg", 8, 3)
    with pytest.raises(DatasetFormatError, match=r"orphan\.png"):
        COCOStuffDataModule(str(tmp_path)).setup()
