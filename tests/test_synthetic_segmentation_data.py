"""The synthetic VOC-layout writer, its datamodule's known answers and the VOC palette."""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from segmentation_files import read_samples

from datamodules.synthetic_segmentation import (
    CATALOGUE,
    SyntheticSegmentationDataModule,
    voc_palette,
    write_synthetic_voc,
)


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
    samples = read_samples(dm)
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
    (sample,) = read_samples(dm)
    assert set(np.unique(sample["label"].numpy())) <= {0, 1, 2, 255}
    assert (sample["label"] == 1).any()  # image 0 shows the first class
    with pytest.raises(ValueError, match="image_size"):
        SyntheticSegmentationDataModule(image_size=8)
