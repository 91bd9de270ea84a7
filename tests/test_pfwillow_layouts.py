"""PF-Willow in the layout the official Hedlin/CATs code reads (PF-WILLOW/ holding the CSV and the
<subclass>/ folders; the CSV's PF-dataset/ prefix dropped) gives the same pairs as the archive's."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.files import DatasetNotFoundError
from datamodules.pfwillow import PFWillowDataset

IMAGES = {"car(G)": ("a", "b"), "duck(S)": ("c", "d")}


def points(offset: float) -> np.ndarray:
    return np.stack([np.arange(10) * 4.0 + offset, np.arange(10) * 3.0 + offset], axis=1)


def write(folder: Path, hedlin: bool, csv_name: str = "test_pairs.csv") -> Path:
    """The two images of each subclass and a 2-row CSV (paths always start with PF-dataset/)."""
    images = folder if hedlin else folder / "PF-dataset"
    for sub, stems in IMAGES.items():
        for k, stem in enumerate(stems):
            (images / sub).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (60 + k, 50)).save(images / sub / f"{stem}.png")
    header = ["imageA", "imageB"] + [f"{a}{s}{k}" for s in "AB" for a in "XY" for k in range(1, 11)]
    rows = [",".join(header)]
    for i, (sub, (src, trg)) in enumerate(IMAGES.items()):
        s, t = points(i), points(i + 0.5)
        cells = [f"PF-dataset/{sub}/{src}.png", f"PF-dataset/{sub}/{trg}.png"]
        cells += [*s[:, 0], *s[:, 1], *t[:, 0], *t[:, 1]]
        rows.append(",".join(str(c) for c in cells))
    (folder / csv_name).write_text("\n".join(rows) + "\n")
    return folder


def summary(ds: PFWillowDataset) -> list:
    return [(p.id, p.category, p.src_kps.tolist(), p.trg_kps.tolist()) for p in ds.pairs]


@pytest.mark.parametrize("csv_name", ["test_pairs.csv", "test_pairs_pf.csv"])
def test_hedlin_layout_gives_the_archive_layouts_pairs(tmp_path, csv_name):
    archive = PFWillowDataset(write(tmp_path / "archive", hedlin=False, csv_name=csv_name))
    top = write(tmp_path / "data" / "PF-WILLOW", hedlin=True, csv_name=csv_name)
    for root in (top, top.parent):  # the folder itself or one above it
        ds = PFWillowDataset(root)
        assert summary(ds) == summary(archive)
        assert ds.pairs[1].src_path == top / "duck(S)" / "c.png"
        assert ds[0]["trg_size"] == (61, 50)


def test_hedlin_layout_with_an_absolute_pairs_file(tmp_path):
    top = write(tmp_path / "PF-WILLOW", hedlin=True)
    moved = tmp_path / "lists" / "mine.csv"
    moved.parent.mkdir()
    shutil.move(top / "test_pairs.csv", moved)
    ds = PFWillowDataset(tmp_path, pairs_file=str(moved))
    assert [p.category for p in ds.pairs] == ["car", "duck"]
    assert ds.pairs[0].src_path == top / "car(G)" / "a.png"


def test_neither_layout_names_both(tmp_path):
    top = write(tmp_path / "PF-WILLOW", hedlin=True)
    shutil.rmtree(top / "car(G)")  # the CSV's first image is nowhere
    with pytest.raises(DatasetNotFoundError, match=r"(?s)PF-dataset/.*PF-WILLOW/\n  <subclass>"):
        PFWillowDataset(tmp_path)
