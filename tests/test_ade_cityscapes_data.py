"""ADE20K and Cityscapes datamodules on fixtures in the official layouts: ADE's reduce_zero_label,
Cityscapes' train ids and the labelIds -> trainIds conversion checked value by value against the
official table, malformed maps named with file and value; the class-name and synonym files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from segmentation_files import read_samples, save_jpeg, save_label

from datamodules.ade20k import ADE20KDataModule
from datamodules.cityscapes import CityscapesDataModule
from datamodules.files import DatasetFormatError, DatasetNotFoundError
from datamodules.labels import read_class_names
from datamodules.voc import voc_labels
from sdzero.config import compose
from sdzero.errors import ConfigError

# The official cityscapesScripts table (helpers/labels.py), written out id by id: label id ->
# train id for the 34 ids of the gtFine labelIds maps (255: not evaluated).
OFFICIAL = [255] * 7 + [0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9, 10, 11, 12]
OFFICIAL += [13, 14, 15, 255, 255, 16, 17, 18]
CITY_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light"]
CITY_NAMES += ["traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck"]
CITY_NAMES += ["bus", "train", "motorcycle", "bicycle"]


def write_ade(root: Path, labels: dict[str, np.ndarray]) -> Path:
    top = root / "ADEChallengeData2016"
    for i, (stem, label) in enumerate(labels.items()):
        save_jpeg(top / "images" / "validation" / f"{stem}.jpg", label.shape[1], label.shape[0], i)
        save_label(top / "annotations" / "validation" / f"{stem}.png", label, palette=False)
    (top / "images" / "training").mkdir(parents=True)  # the archive's other split: never read
    return top


def test_ade20k_reduces_zero_label_and_sorts_the_split(tmp_path):
    raw = np.array([[0, 1, 150], [2, 149, 0]], dtype=np.uint8)
    write_ade(tmp_path, {"ADE_val_00000002": raw, "ADE_val_00000001": raw[::-1].copy()})
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):
        dm = ADE20KDataModule(str(root))
        samples = read_samples(dm)
        assert [s["id"] for s in samples] == ["ADE_val_00000001", "ADE_val_00000002"]
        assert samples[1]["label"].tolist() == [[255, 0, 149], [1, 148, 255]]
    assert (dm.dataset_name, dm.split_size, dm.background_index) == ("ade20k", 2, None)
    names = dm.class_names
    assert len(names) == 150 and names[:3] == ["wall", "building", "sky"]
    assert names[7] == "bed" and names[44] == "chest of drawers" and names[-1] == "flag"
    stuff = {names[i] for i in dm.stuff}
    assert len(stuff) == 50 and {"wall", "sky", "road"} <= stuff and "person" not in stuff


def test_ade20k_malformed_label_names_file_and_value(tmp_path):
    write_ade(tmp_path, {"ADE_val_00000001": np.array([[3, 151], [0, 7]], dtype=np.uint8)})
    dm = ADE20KDataModule(str(tmp_path))
    dm.setup("test")
    with pytest.raises(DatasetFormatError, match=r"ADE_val_00000001\.png.*\[151\].*1\.\.150"):
        dm.dataset[0]


def test_ade20k_missing_folder_draws_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="annotations/validation"):
        ADE20KDataModule(str(tmp_path)).setup("test")


def write_cityscapes(root: Path, maps: dict[str, np.ndarray], kinds: tuple[str, ...]) -> Path:
    """``maps``: ``<city>/<stem>`` -> a labelIds map; ``kinds`` which label files to write."""
    table = np.array(OFFICIAL + [0] * (256 - len(OFFICIAL)), dtype=np.uint8)
    for i, (name, ids) in enumerate(maps.items()):
        city, stem = name.split("/")
        image = root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        save_jpeg(image.with_suffix(".jpg"), ids.shape[1], ids.shape[0], i)
        image.with_suffix(".jpg").rename(image)  # PIL reads it by content, whatever the suffix
        gt = root / "gtFine" / "val" / city
        if "label_ids" in kinds:
            save_label(gt / f"{stem}_gtFine_labelIds.png", ids, palette=False)
        if "train_ids" in kinds:
            save_label(gt / f"{stem}_gtFine_labelTrainIds.png", table[ids], palette=False)
    return root


ALL_IDS = np.arange(34, dtype=np.uint8).reshape(2, 17)
CITIES = {"munster/munster_000000_000019": ALL_IDS, "frankfurt/frankfurt_000000_000294": ALL_IDS}


def test_cityscapes_converts_label_ids_with_the_official_table_value_by_value(tmp_path, caplog):
    root = write_cityscapes(tmp_path / "cityscapes", CITIES, ("label_ids",))
    with caplog.at_level(logging.WARNING, logger="datamodules.cityscapes"):
        samples = read_samples(CityscapesDataModule(str(tmp_path)))
    assert "converting the *_gtFine_labelIds.png maps" in caplog.text  # never silently
    assert [s["id"] for s in samples] == ["frankfurt_000000_000294", "munster_000000_000019"]
    converted = samples[0]["label"].flatten().tolist()
    assert converted == OFFICIAL  # label id k -> the official train id of k, for k = 0..33
    evaluated = {k: t for k, t in enumerate(OFFICIAL) if t != 255}
    assert len(evaluated) == 19 and sorted(evaluated.values()) == list(range(19))
    # the same maps as train ids (what mmseg reads) give the same labels
    write_cityscapes(root, CITIES, ("train_ids",))
    dm = CityscapesDataModule(str(root))
    caplog.clear()
    assert [s["label"].flatten().tolist() for s in read_samples(dm)] == [OFFICIAL, OFFICIAL]
    assert "converting" not in caplog.text
    forced = CityscapesDataModule(str(root), label_files="label_ids")
    assert read_samples(forced)[1]["label"].flatten().tolist() == OFFICIAL
    assert dm.class_names == CITY_NAMES and read_class_names("cityscapes.txt") == CITY_NAMES
    assert (dm.dataset_name, dm.split_size, dm.background_index) == ("cityscapes", 2, None)
    assert {dm.class_names[i] for i in dm.stuff} == set(CITY_NAMES[:11])


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [("label_ids", 34, "label ids 0..33"), ("train_ids", 19, r"train ids 0..18 or 255")],
)
def test_cityscapes_malformed_label_names_file_and_value(tmp_path, kind, value, expected):
    bad = ALL_IDS.copy()
    bad[0, 0] = value
    write_cityscapes(tmp_path, {"lindau/lindau_000000_000019": bad}, (kind,))
    if kind == "train_ids":  # write_cityscapes converted the map: put the raw value back in
        path = tmp_path / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"
        save_label(path, np.full((2, 17), value, dtype=np.uint8), palette=False)
    dm = CityscapesDataModule(str(tmp_path), label_files=kind)
    dm.setup("test")
    with pytest.raises(DatasetFormatError, match=rf"lindau_000000_000019.*\[{value}\].*{expected}"):
        dm.dataset[0]


def test_cityscapes_mixed_label_files_name_the_missing_train_ids(tmp_path):
    write_cityscapes(tmp_path, {"lindau/lindau_000000_000019": ALL_IDS}, ("train_ids",))
    write_cityscapes(tmp_path, {"lindau/lindau_000001_000019": ALL_IDS}, ("label_ids",))
    with pytest.raises(DatasetFormatError, match="lindau_000001_000019_gtFine_labelTrainIds"):
        CityscapesDataModule(str(tmp_path)).setup("test")
    with pytest.raises(ConfigError, match="data.label_files must be one of"):
        CityscapesDataModule(str(tmp_path), label_files="ids")


def test_synonyms_follow_the_prompt_name_and_survive_reduce_zero_label():
    voc = voc_labels()
    tv = voc.prompt_synonyms[voc.class_names.index("tvmonitor")]
    assert tv == ("monitor", "television monitor", "tv monitor", "television", "screen")
    voc20 = voc.without_background()
    assert voc20.prompt_synonyms[voc20.class_names.index("person")][:2] == (
        "person",
        "person in shirt",
    )
    assert voc20.prompt_synonyms[0] == ("airplane",)  # no synonyms: the prompt name alone


@pytest.mark.parametrize(
    ("experiment", "target"),
    [
        ("ade20k_ovdiff", "ADE20KDataModule"),
        ("cityscapes_ovdiff", "CityscapesDataModule"),
        ("coco_stuff_ovdiff", "COCOStuffDataModule"),
    ],
)
def test_experiments_compose(experiment, target, tmp_path):
    cfg = compose(experiment, [f"data.root={tmp_path}"])
    assert cfg.data._target_.endswith(target) and cfg.method.synonyms == "first"
