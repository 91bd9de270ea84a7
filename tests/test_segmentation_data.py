"""Segmentation datamodules (VOC, Context, COCO-Object/Stuff, synthetic) on fixtures written in the
official on-disk formats."""

from __future__ import annotations

import importlib
import inspect
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from datamodules.coco import (
    COCOObjectDataModule,
    COCOStuffDataModule,
    object_lookup,
    stuff_lookup,
)
from datamodules.context import ContextDataModule
from datamodules.files import DatasetFormatError, DatasetNotFoundError
from datamodules.synthetic_segmentation import (
    CATALOGUE,
    SyntheticSegmentationDataModule,
    voc_palette,
    write_synthetic_voc,
)
from datamodules.voc import VOCDataModule

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "data"


# ------------------------------------------------------------------------------------ fixtures


def _save_label(path: Path, label: np.ndarray, palette: bool = True) -> None:
    """A label PNG: palette mode (VOC) or grey 'L' (mmseg's Context / COCO converters)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8))
    if palette:
        img.putpalette(voc_palette())
    img.save(path)


def _save_jpeg(path: Path, width: int, height: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def _label(width: int, height: int, values: list[int]) -> np.ndarray:
    """``(H, W)`` map whose rows cycle through ``values``."""
    return np.array([[values[y % len(values)]] * width for y in range(height)], dtype=np.uint8)


def _write_voc_like(
    top: Path,
    labels: dict[str, np.ndarray],
    label_dir: str = "SegmentationClass",
    split_file: str = "ImageSets/Segmentation/val.txt",
    palette: bool = True,
) -> None:
    """A VOC-layout year folder; ``labels`` in split order, images sized like their labels."""
    for i, (image_id, label) in enumerate(labels.items()):
        _save_jpeg(top / "JPEGImages" / f"{image_id}.jpg", label.shape[1], label.shape[0], seed=i)
        _save_label(top / label_dir / f"{image_id}.png", label, palette)
    (top / split_file).parent.mkdir(parents=True, exist_ok=True)
    (top / split_file).write_text("".join(f"{i}\n" for i in labels))


VOC_LABELS = {
    "2008_000002": _label(20, 15, [0, 1, 15, 20, 255]),
    "2007_000033": _label(15, 20, [255, 0, 7]),
    "2009_000001": _label(10, 10, [3]),
}


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    _write_voc_like(tmp_path / "VOCdevkit" / "VOC2012", VOC_LABELS)
    return tmp_path


def _samples(dm) -> list[dict]:
    dm.setup("test")
    return list(dm.test_dataloader())


# ------------------------------------------------------------------------------------------ VOC


def test_voc21_reads_palette_indices_and_keeps_split_order(voc_root: Path) -> None:
    dm = VOCDataModule(str(voc_root))
    samples = _samples(dm)
    assert [s["id"] for s in samples] == list(VOC_LABELS)  # val.txt order, not sorted
    assert [s["index"] for s in samples] == [0, 1, 2]
    for s, label in zip(samples, VOC_LABELS.values(), strict=True):
        assert s["image"].shape == (3, *label.shape) and s["image"].dtype == torch.uint8
        assert torch.equal(s["label"], torch.from_numpy(label.astype(np.int64)))
    assert (dm.dataset_name, dm.split_size, dm.ignore_index) == ("voc2012", 3, 255)
    assert (dm.background_index, dm.stuff) == (0, {0})


def test_voc_root_may_be_any_level_and_skips_other_years(voc_root: Path) -> None:
    # VOC2010 also has SegmentationClass and a Segmentation val.txt: it must not be picked.
    _write_voc_like(voc_root / "VOCdevkit" / "VOC2010", {"2010_000001": _label(8, 8, [1])})
    for root in (voc_root, voc_root / "VOCdevkit", voc_root / "VOCdevkit" / "VOC2012"):
        dm = VOCDataModule(str(root))
        assert [s["id"] for s in _samples(dm)] == list(VOC_LABELS)


def test_voc20_reduces_zero_label(voc_root: Path) -> None:
    dm = VOCDataModule(str(voc_root), background=False)
    first = _samples(dm)[0]["label"]
    # rows cycle 0, 1, 15, 20, 255 -> 255, 0, 14, 19, 255
    assert first[:5, 0].tolist() == [255, 0, 14, 19, 255]
    assert dm.dataset_name == "voc2012-20"
    assert len(dm.class_names) == 20 and dm.class_names[0] == "aeroplane"
    assert (dm.background_index, dm.stuff) == (None, set())


def test_limit_takes_the_first_samples_in_split_order(voc_root: Path) -> None:
    dm = VOCDataModule(str(voc_root), limit=2)
    assert [s["id"] for s in _samples(dm)] == list(VOC_LABELS)[:2]
    assert dm.split_size == 3
    with pytest.raises(ValueError, match="data.limit"):
        VOCDataModule(str(voc_root), limit=0)


# ------------------------------------------------------------------------------------ names


def test_class_name_counts_renames_and_stuff() -> None:
    voc21, voc20 = VOCDataModule("x"), VOCDataModule("x", background=False)
    c60, c59 = ContextDataModule("x"), ContextDataModule("x", background=False)
    obj, stuff = COCOObjectDataModule("x"), COCOStuffDataModule("x")
    counts = [len(dm.class_names) for dm in (voc21, voc20, c60, c59, obj, stuff)]
    assert counts == [21, 20, 60, 59, 81, 171]
    for dm in (voc21, voc20, c60, c59, obj, stuff):
        assert len(dm.prompt_names) == len(dm.class_names) == len(set(dm.prompt_names))

    renames = {"aeroplane": "airplane", "diningtable": "table", "tvmonitor": "monitor"}
    renames["pottedplant"] = "potted plant"
    for old, new in renames.items():
        assert voc21.prompt_names[voc21.class_names.index(old)] == new
    assert voc21.class_names[0] == voc21.prompt_names[0] == "background"
    assert voc21.class_names[20] == "tvmonitor" and voc20.prompt_names[19] == "monitor"

    assert c60.class_names[0] == "background" and c60.class_names[-1] == "wood"
    assert c60.prompt_names[c60.class_names.index("pottedplant")] == "potted plant"
    # The official IS_STUFF (sdov mmdata.py) on the Context-60 names, background included.
    official = [0, 4, 16, 18, 22, 25, 26, 29, 30, 35, 39, 41, 42, 45, 47, 48, 51, 56, 57, 59]
    assert sorted(c60.stuff) == official
    stuff60 = {c60.class_names[i] for i in c60.stuff}
    assert {"bedclothes", "cloth", "sky", "wall", "wood"} <= stuff60
    assert not {"building", "tree", "person", "cat", "aeroplane"} & stuff60
    assert {c59.class_names[i] for i in c59.stuff} == stuff60 - {"background"}
    assert (c60.background_index, c59.background_index) == (0, None)

    assert obj.class_names[:3] == ["background", "person", "bicycle"]
    assert obj.class_names[80] == "toothbrush" and obj.stuff == {0}
    # The official prompt overlay: keyboard -> "computer keyboard" (Context and COCO).
    for dm in (c60, obj):
        assert dm.prompt_names[dm.class_names.index("keyboard")] == "computer keyboard"
    assert stuff.class_names[79:81] == ["toothbrush", "banner"] and stuff.class_names[-1] == "wood"
    assert stuff.stuff == set(range(80, 171)) and stuff.background_index is None
    assert stuff.prompt_names[stuff.class_names.index("sky-other")] == "sky"
    assert stuff.prompt_names[stuff.class_names.index("desk-stuff")] == "desk"
    assert stuff.prompt_names[stuff.class_names.index("wall-brick")] == "wall brick"


# -------------------------------------------------------------------------------------- Context


def test_context60_and_59_read_mmseg_labels(tmp_path: Path) -> None:
    label = np.arange(60, dtype=np.uint8).reshape(6, 10)
    top = tmp_path / "data" / "VOCdevkit" / "VOC2010"
    _write_voc_like(
        top,
        {"2008_000008": label},
        label_dir="SegmentationClassContext",
        split_file="ImageSets/SegmentationContext/val.txt",
        palette=False,
    )
    # A VOC2012 beside it must not be taken for Context.
    _write_voc_like(tmp_path / "data" / "VOCdevkit" / "VOC2012", {"x": _label(4, 4, [1])})
    c60 = ContextDataModule(str(tmp_path / "data"))
    (sample,) = _samples(c60)
    assert torch.equal(sample["label"], torch.from_numpy(label.astype(np.int64)))
    assert c60.dataset_name == "context60"
    c59 = ContextDataModule(str(top), background=False)
    (sample,) = _samples(c59)
    expected = label.astype(np.int64) - 1
    expected[0, 0] = 255
    assert torch.equal(sample["label"], torch.from_numpy(expected))
    assert c59.dataset_name == "context59"


# ----------------------------------------------------------------------------------------- COCO

RAW_VALUES = [0, 5, 95, 255, 11, 90, 89, 181]  # 11 and 90 are ids COCO removed
OBJECT_EXPECTED = [1, 6, 0, 0, 0, 0, 80, 0]
STUFF_EXPECTED = [0, 5, 84, 255, 255, 255, 79, 170]


def _write_coco(top: Path, stems: list[str]) -> np.ndarray:
    raw = np.array([RAW_VALUES] * 3, dtype=np.uint8)  # (3, 8): columns are the raw values
    for i, stem in enumerate(stems):
        _save_jpeg(top / "images" / "val2017" / f"{stem}.jpg", 8, 3, seed=i)
        _save_label(top / "annotations" / "val2017" / f"{stem}.png", raw, palette=False)
    return raw


def test_coco_object_and_stuff_convert_raw_stuffthingmaps(tmp_path: Path) -> None:
    _write_coco(tmp_path / "coco_stuff164k", ["000000000285", "000000000139"])
    obj = COCOObjectDataModule(str(tmp_path))
    samples = _samples(obj)
    assert [s["id"] for s in samples] == ["000000000139", "000000000285"]  # sorted file names
    assert samples[0]["label"][1].tolist() == OBJECT_EXPECTED
    assert obj.class_names[6] == "bus" and obj.dataset_name == "coco-object"
    stuff = COCOStuffDataModule(str(tmp_path / "coco_stuff164k"))
    assert _samples(stuff)[0]["label"][1].tolist() == STUFF_EXPECTED
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
    raw = _write_coco(top, ["a", "b"])
    ann = top / "annotations" / "val2017"
    _save_label(ann / "a_instanceTrainIds.png", np.full_like(raw, 7), palette=False)
    # Only one image converted: the raw maps are used for both.
    assert _samples(COCOObjectDataModule(str(tmp_path)))[0]["label"][1].tolist() == OBJECT_EXPECTED
    _save_label(ann / "b_instanceTrainIds.png", np.full_like(raw, 7), palette=False)
    dm = COCOObjectDataModule(str(tmp_path))
    assert all(bool((s["label"] == 7).all()) for s in _samples(dm))
    assert _samples(COCOStuffDataModule(str(tmp_path)))[0]["label"][1].tolist() == STUFF_EXPECTED


# ------------------------------------------------------------------------------------ bad input


def test_missing_dataset_folder_lists_expected_layout(tmp_path: Path) -> None:
    for dm in (VOCDataModule(str(tmp_path / "nope")), VOCDataModule(str(tmp_path))):
        with pytest.raises(DatasetNotFoundError, match=r"(?s)VOC2012.*SegmentationClass/<id>\.png"):
            dm.setup()
    with pytest.raises(DatasetNotFoundError, match=r"(?s)coco_stuff164k.*annotations/val2017"):
        COCOObjectDataModule(str(tmp_path)).setup()
    with pytest.raises(DatasetNotFoundError, match=r"SegmentationClassContext"):
        ContextDataModule(str(tmp_path)).setup()


def test_split_id_without_image_is_named(voc_root: Path) -> None:
    split = voc_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text(split.read_text() + "2011_999999\n")
    with pytest.raises(DatasetFormatError, match=r"2011_999999\.jpg"):
        VOCDataModule(str(voc_root)).setup()
    split.write_text("2008_000002 1\n")
    with pytest.raises(DatasetFormatError, match="line 1: expected one image id"):
        VOCDataModule(str(voc_root)).setup()


def test_coco_image_without_annotation_is_named(tmp_path: Path) -> None:
    _write_coco(tmp_path, ["a"])
    _save_jpeg(tmp_path / "images" / "val2017" / "orphan.jpg", 8, 3)
    with pytest.raises(DatasetFormatError, match=r"orphan\.png"):
        COCOStuffDataModule(str(tmp_path)).setup()


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


# ------------------------------------------------------------------------------------ synthetic


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_voc_palette_is_the_standard_colour_map() -> None:
    palette = voc_palette()
    colour = [tuple(palette[3 * i : 3 * i + 3]) for i in (0, 1, 2, 15, 255)]
    assert colour == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (192, 128, 128), (224, 224, 192)]


def test_synthetic_writer_is_deterministic_idempotent_and_guarded(tmp_path: Path) -> None:
    a = write_synthetic_voc(tmp_path / "a", num_images=2, image_size=48, num_support=1)
    b = write_synthetic_voc(tmp_path / "b", num_images=2, image_size=48, num_support=1)
    assert _files(a) == _files(b) and len(_files(a)) == 2 * 2 + 1 + 3 + 1
    before = {p: p.stat().st_mtime_ns for p in a.rglob("*")}
    write_synthetic_voc(a, num_images=2, image_size=48, num_support=1)
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*")} == before
    c = write_synthetic_voc(tmp_path / "c", num_images=2, image_size=48, num_support=1, seed=1)
    assert _files(c) != _files(a)
    with pytest.raises(FileExistsError, match="sdzero_synthetic.json"):
        write_synthetic_voc(a, num_images=3, image_size=48, num_support=1)
    with pytest.raises(ValueError, match="classes"):
        write_synthetic_voc(tmp_path / "d", classes=7)
    with pytest.raises(ValueError, match="distinct names"):
        write_synthetic_voc(tmp_path / "d", classes=["ball", "unicorn"])


def test_synthetic_writers_racing_on_one_root_both_succeed(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(write_synthetic_voc, root, num_images=2, image_size=48, num_support=1)
            for _ in range(2)
        ]
        assert [f.result() for f in futures] == [root, root]
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no temporary folder left
    assert _files(root) == _files(write_synthetic_voc(tmp_path / "x", 2, 3, 48, 0, 1))


def _cosine(u: np.ndarray, v: np.ndarray) -> float:
    return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))


def test_synthetic_known_answers_read_by_the_voc_loader(tmp_path: Path) -> None:
    dm = SyntheticSegmentationDataModule(str(tmp_path / "syn"), num_images=6, classes=3)
    assert dm.class_names == dm.prompt_names == ["background", "ball", "box", "kite"]
    assert (dm.background_index, dm.stuff, dm.ignore_index) == (0, {0}, 255)
    samples = _samples(dm)
    assert dm.dataset_name == "synthetic-voc" and len(samples) == 6
    colours = np.array([c.colour for c in CATALOGUE[:3]], dtype=float)
    for i, s in enumerate(samples):
        label, image = s["label"].numpy(), s["image"].permute(1, 2, 0).numpy().astype(float)
        assert max(label.shape) == 128 and (label.shape[0] > label.shape[1]) == (i % 2 == 1)
        assert set(np.unique(label)) <= {0, 1, 2, 3, 255} and (label == 255).any()
        assert (label == i % 3 + 1).sum() > 0.02 * label.size  # the guaranteed, unoccluded class
        for k in np.unique(label):
            if k in (0, 255):
                continue
            mean = image[label == k].mean(axis=0)
            similarity = [_cosine(mean, c) for c in colours]
            assert int(np.argmax(similarity)) == k - 1 and similarity[k - 1] > 0.99
        background = image[label == 0]
        assert (background.max(axis=1) - background.min(axis=1)).mean() < 60  # greyish

    support = sorted(p.name for p in dm.support_root.iterdir())
    assert support == ["ball", "box", "kite"]
    for k, name in enumerate(["ball", "box", "kite"]):
        files = sorted((dm.support_root / name).glob("*.png"))
        assert len(files) == 4
        for f in files:
            img = np.asarray(Image.open(f).convert("RGB"), dtype=float)
            assert img.shape == (128, 128, 3)
            # The class colour (either texture shade) is the dominant region.
            direction = img / np.linalg.norm(img, axis=2, keepdims=True).clip(1e-6)
            unit = colours / np.linalg.norm(colours, axis=1, keepdims=True)
            share = ((direction @ unit.T) > 0.99).mean(axis=(0, 1))
            assert share[k] > 0.3 and share[k] == share.max()


def test_synthetic_datamodule_default_root_and_named_classes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # root=None writes to the temp dir
    dm = SyntheticSegmentationDataModule(num_images=1, classes=["ring", "ball"], image_size=40)
    assert dm.support_root.parent.parent == tmp_path
    assert dm.class_names == ["background", "ring", "ball"]
    assert sorted(p.name for p in dm.support_root.iterdir()) == ["ball", "ring"]
    (sample,) = _samples(dm)
    assert set(np.unique(sample["label"].numpy())) <= {0, 1, 2, 255}
    assert (sample["label"] == 1).any()  # image 0 shows the first class
    with pytest.raises(ValueError, match="image_size"):
        SyntheticSegmentationDataModule(image_size=8)


# -------------------------------------------------------------------------------------- configs

CONFIGS = ["voc", "context", "coco_object", "coco_stuff", "synthetic_segmentation"]


@pytest.mark.parametrize("name", CONFIGS)
def test_data_config_lists_every_constructor_default(name: str) -> None:
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    module, _, cls_name = cfg._target_.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    params = {n: p.default for n, p in inspect.signature(cls).parameters.items()}
    assert set(cfg) - {"_target_"} == set(params)
    for key, default in params.items():
        if default is inspect.Parameter.empty:
            assert key == "root" and OmegaConf.is_missing(cfg, "root")
        else:
            assert cfg[key] == default, key
