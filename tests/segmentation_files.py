"""Fixtures of the segmentation datamodules' tests in the official on-disk formats (VOC-layout
year folders, as VOC2012 and Context use, and COCO-Stuff's stuffthingmaps), and ``read_samples``:
a datamodule's test split as a list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.synthetic_segmentation import voc_palette


def save_label(path: Path, label: np.ndarray, palette: bool = True) -> None:
    """A label PNG: palette mode (VOC) or grey 'L' (mmseg's Context / COCO converters)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8))
    if palette:
        img.putpalette(voc_palette())
    img.save(path)


def save_jpeg(path: Path, width: int, height: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def label_rows(width: int, height: int, values: list[int]) -> np.ndarray:
    """``(H, W)`` map whose rows cycle through ``values``."""
    return np.array([[values[y % len(values)]] * width for y in range(height)], dtype=np.uint8)


def write_voc_like(
    top: Path,
    labels: dict[str, np.ndarray],
    label_dir: str = "SegmentationClass",
    split_file: str = "ImageSets/Segmentation/val.txt",
    palette: bool = True,
) -> None:
    """A VOC-layout year folder; ``labels`` in split order, images sized like their labels."""
    for i, (image_id, label) in enumerate(labels.items()):
        save_jpeg(top / "JPEGImages" / f"{image_id}.jpg", label.shape[1], label.shape[0], seed=i)
        save_label(top / label_dir / f"{image_id}.png", label, palette)
    (top / split_file).parent.mkdir(parents=True, exist_ok=True)
    (top / split_file).write_text("".join(f"{i}\n" for i in labels))


VOC_LABELS = {
    "2008_000002": label_rows(20, 15, [0, 1, 15, 20, 255]),
    "2007_000033": label_rows(15, 20, [255, 0, 7]),
    "2009_000001": label_rows(10, 10, [3]),
}


def read_samples(dm) -> list[dict]:
    dm.setup("test")
    return list(dm.test_dataloader())


RAW_VALUES = [0, 5, 95, 255, 11, 90, 89, 181]  # 11 and 90 are ids COCO removed


def write_coco(top: Path, stems: list[str]) -> np.ndarray:
    raw = np.array([RAW_VALUES] * 3, dtype=np.uint8)  # (3, 8): columns are the raw values
    for i, stem in enumerate(stems):
        save_jpeg(top / "images" / "val2017" / f"{stem}.jpg", 8, 3, seed=i)
        save_label(top / "annotations" / "val2017" / f"{stem}.png", raw, palette=False)
    return raw
