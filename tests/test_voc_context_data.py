"""The VOC2012 and PASCAL-Context datamodules on fixtures in the official on-disk formats, and the
errors a malformed VOC folder raises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segmentation_files import VOC_LABELS, label_rows, read_samples, write_voc_like

from datamodules.context import ContextDataModule
from datamodules.files import DatasetFormatError
from datamodules.voc import VOCDataModule


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    write_voc_like(tmp_path / "VOCdevkit" / "VOC2012", VOC_LABELS)
    return tmp_path


# ------------------------------------------------------------------------------------------ VOC


def test_voc21_reads_palette_indices_and_keeps_split_order(voc_root: Path) -> None:
    dm = VOCDataModule(str(voc_root))
    samples = read_samples(dm)
    assert [s["id"] for s in samples] == list(VOC_LABELS)  # val.txt order, not sorted
    assert [s["index"] for s in samples] == [0, 1, 2]
    for s, label in zip(samples, VOC_LABELS.values(), strict=True):
        assert s["image"].shape == (3, *label.shape) and s["image"].dtype == torch.uint8
        assert torch.equal(s["label"], torch.from_numpy(label.astype(np.int64)))
    assert (dm.dataset_name, dm.split_size, dm.ignore_index) == ("voc2012", 3, 255)
    assert (dm.background_index, dm.stuff) == (0, {0})


def test_voc_root_may_be_any_level_and_skips_other_years(voc_root: Path) -> None:
    # VOC2010 also has SegmentationClass and a Segmentation val.txt: it must not be picked.
    write_voc_like(voc_root / "VOCdevkit" / "VOC2010", {"2010_000001": label_rows(8, 8, [1])})
    for root in (voc_root, voc_root / "VOCdevkit", voc_root / "VOCdevkit" / "VOC2012"):
        dm = VOCDataModule(str(root))
        assert [s["id"] for s in read_samples(dm)] == list(VOC_LABELS)


def test_voc20_reduces_zero_label(voc_root: Path) -> None:
    dm = VOCDataModule(str(voc_root), background=False)
    first = read_samples(dm)[0]["label"]
    # rows cycle 0, 1, 15, 20, 255 -> 255, 0, 14, 19, 255
    assert first[:5, 0].tolist() == [255, 0, 14, 19, 255]
    assert dm.dataset_name == "voc2012-20"
    assert len(dm.class_names) == 20 and dm.class_names[0] == "aeroplane"
    assert (dm.background_index, dm.stuff) == (None, set())


def test_limit_takes_the_first_samples_in_split_order(voc_root: Path) -> None:
    dm = VOCDataModule(str(voc_root), limit=2)
    assert [s["id"] for s in read_samples(dm)] == list(VOC_LABELS)[:2]
    assert dm.split_size == 3
    with pytest.raises(ValueError, match="data.limit"):
        VOCDataModule(str(voc_root), limit=0)


# -------------------------------------------------------------------------------------- Context


def test_context60_and_59_read_mmseg_labels(tmp_path: Path) -> None:
    label = np.arange(60, dtype=np.uint8).reshape(6, 10)
    top = tmp_path / "data" / "VOCdevkit" / "VOC2010"
    write_voc_like(
        top,
        {"2008_000008": label},
        label_dir="SegmentationClassContext",
        split_file="ImageSets/SegmentationContext/val.txt",
        palette=False,
    )
    # A VOC2012 beside it must not be taken for Context.
    write_voc_like(tmp_path / "data" / "VOCdevkit" / "VOC2012", {"x": label_rows(4, 4, [1])})
    c60 = ContextDataModule(str(tmp_path / "data"))
    (sample,) = read_samples(c60)
    assert torch.equal(sample["label"], torch.from_numpy(label.astype(np.int64)))
    assert c60.dataset_name == "context60"
    c59 = ContextDataModule(str(top), background=False)
    (sample,) = read_samples(c59)
    expected = label.astype(np.int64) - 1
    expected[0, 0] = 255
    assert torch.equal(sample["label"], torch.from_numpy(expected))
    assert c59.dataset_name == "context59"


# ------------------------------------------------------------------------------------ bad input


def test_split_id_without_image_is_named(voc_root: Path) -> None:
    split = voc_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text(split.read_text() + "2011_999999\n")
    with pytest.raises(DatasetFormatError, match=r"2011_999999\.jpg"):
        VOCDataModule(str(voc_root)).setup()
    split.write_text("2008_000002 1\n")
    with pytest.raises(DatasetFormatError, match="line 1: expected one image id"):
        VOCDataModule(str(voc_root)).setup()


@pytest.mark.parametrize(
    ("label", "match"),
    [
        (np.zeros((15, 20, 3), np.uint8), r"2009_000001\.png.*mode 'RGB'"),  # RGB rendering
        (np.zeros((11, 10), np.uint8), r"2009_000001\.png.*10x11"),  # wrong size
        (np.full((10, 10), 21, np.uint8), r"2009_000001\.png.*\[21\].*0\.\.20"),  # not a class
    ],
)
def test_bad_label_png_is_named(voc_root: Path, label: np.ndarray, match: str) -> None:
    path = voc_root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2009_000001.png"
    Image.fromarray(label).save(path)
    dm = VOCDataModule(str(voc_root))
    dm.setup()
    with pytest.raises(DatasetFormatError, match=match):
        dm.dataset[2]
