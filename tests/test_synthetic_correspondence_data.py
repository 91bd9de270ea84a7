"""The known answers of the synthetic SPair-layout writer and its datamodule."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import datamodules.synthetic_correspondence as synth
from datamodules.spair import SPairDataset
from datamodules.synthetic_correspondence import (
    PART_COLOURS,
    SyntheticCorrespondenceDataModule,
    write_synthetic_spair,
)


def _slot_colours(ds: SPairDataset, index: int) -> list[tuple[int, int, int]]:
    pair = ds.pairs[index]
    path = ds.pairs[index].src_path.parents[2] / "PairAnnotation" / "test" / f"{pair.id}.json"
    return [PART_COLOURS[int(k)] for k in json.loads(path.read_text())["kps_ids"]]


@pytest.mark.parametrize("kind", ["transform", "shift", "identical"])
def test_synthetic_keypoints_sit_on_their_part_colour(tmp_path, kind):
    write_synthetic_spair(tmp_path, num_pairs=6, image_size=64, seed=1, kind=kind)
    ds = SPairDataset(tmp_path)
    assert len(ds) == 6 and {p.category for p in ds.pairs} == {"discs", "squares"}
    palette = torch.tensor(PART_COLOURS, dtype=torch.float32)
    for i in range(len(ds)):
        sample, colours = ds[i], _slot_colours(ds, i)
        assert 3 <= len(colours) <= 6 and len(set(colours)) == len(colours)
        for img, kps, box in (
            (sample["src_img"], sample["src_kps"], sample["src_bbox"]),
            (sample["trg_img"], sample["trg_kps"], sample["trg_bbox"]),
        ):
            for (x, y), colour in zip(kps.long().tolist(), colours, strict=True):
                pixel = img[:, y, x].float()
                # JPEG q95 moves part centres by a few levels; the palette is >= 90 levels apart.
                assert (pixel - torch.tensor(colour)).abs().max() <= 24
                nearest = (palette - pixel).norm(dim=1).argmin()
                assert PART_COLOURS[int(nearest)] == colour
            assert (kps >= box[:2]).all() and (kps <= box[2:]).all()
        expected_trg = (80, 64) if kind == "transform" else (64, 64)
        assert sample["src_size"] == (64, 64) and sample["trg_size"] == expected_trg


def test_synthetic_shift_is_whole_latent_cells_and_exact_pixels(tmp_path):
    write_synthetic_spair(tmp_path, num_pairs=5, image_size=128, seed=2, kind="shift")
    ds = SPairDataset(tmp_path)
    for i in range(len(ds)):
        s = ds[i]
        shifts = (s["trg_kps"] - s["src_kps"]).long()
        dx, dy = shifts[0].tolist()
        assert (shifts == shifts[0]).all() and (dx, dy) != (0, 0)
        assert dx % 16 == 0 and dy % 16 == 0 and abs(dx) <= 32 and abs(dy) <= 32  # S/8 = 16 px
        # Whole 8x8 JPEG blocks on a flat background: the target decodes to the shifted source.
        src, trg = s["src_img"], s["trg_img"]
        h, w = src.shape[1:]
        src_win = src[:, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
        trg_win = trg[:, max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
        assert torch.equal(src_win, trg_win)


def test_synthetic_identical_and_transform_answers(tmp_path):
    ident = write_synthetic_spair(tmp_path / "i", num_pairs=2, image_size=64, kind="identical")
    ds = SPairDataset(ident)
    for pair in ds.pairs:
        assert pair.src_path.read_bytes() == pair.trg_path.read_bytes()
        np.testing.assert_array_equal(pair.src_kps, pair.trg_kps)
    trans = write_synthetic_spair(tmp_path / "t", num_pairs=4, image_size=64, kind="transform")
    ds = SPairDataset(trans)
    for i, pair in enumerate(ds.pairs):
        # trg = round(offset + s * (src - src_offset)): scale + shift, no rotation, up to rounding
        a = np.zeros((2 * len(pair.src_kps), 3))
        a[:, 0] = pair.src_kps.reshape(-1)
        a[0::2, 1] = a[1::2, 2] = 1
        coef, *_ = np.linalg.lstsq(a, pair.trg_kps.reshape(-1), rcond=None)
        assert 0.65 <= coef[0] <= 1.25
        assert np.abs(a @ coef - pair.trg_kps.reshape(-1)).max() <= 1.0
        sample = ds[i]
        assert not torch.equal(sample["src_img"][:, 0, 0], sample["trg_img"][:, 0, 0])


def test_synthetic_writer_is_deterministic(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    a = files(write_synthetic_spair(tmp_path / "a", num_pairs=3, image_size=64, seed=5))
    b = files(write_synthetic_spair(tmp_path / "b", num_pairs=3, image_size=64, seed=5))
    c = files(write_synthetic_spair(tmp_path / "c", num_pairs=3, image_size=64, seed=6))
    short = files(write_synthetic_spair(tmp_path / "d", num_pairs=2, image_size=64, seed=5))
    assert a == b and a != c
    assert all(a[k] == v for k, v in short.items() if not k.startswith("Layout"))
    record = json.loads(a["PairAnnotation/test/000001-2000_000000-2000_000001:discs.json"])
    assert record["src_imsize"] == [64, 64, 3] and record["trg_imsize"] == [80, 64, 3]
    assert set(record) >= {"pair_id", "kps_ids", "src_bndbox", "trg_bndbox", "src_pose", "mirror"}
    with pytest.raises(FileExistsError):
        write_synthetic_spair(tmp_path / "a")
    with pytest.raises(ValueError, match="multiple of 64"):
        write_synthetic_spair(tmp_path / "e", image_size=100)
    with pytest.raises(ValueError, match="kind must be one of"):
        SyntheticCorrespondenceDataModule(kind="rotate")


def test_synthetic_datamodule_writes_once_and_reuses(tmp_path, monkeypatch):
    dm = SyntheticCorrespondenceDataModule(str(tmp_path), num_pairs=3, image_size=64, limit=2)
    assert dm.split_size == 3 and len(dm.dataset) == 2 and dm.dataset_name == "synthetic-spair"
    assert [p.name for p in tmp_path.iterdir()] == [dm.data_dir.name]  # no staging left
    assert [b["index"] for b in dm.test_dataloader()] == [0, 1]
    dm.setup()  # idempotent

    def fail(*args, **kwargs):
        raise AssertionError("the existing dataset should have been reused")

    monkeypatch.setattr(synth, "write_synthetic_spair", fail)
    again = SyntheticCorrespondenceDataModule(str(tmp_path), num_pairs=3, image_size=64)
    assert again.split_size == 3 and again.data_dir == dm.data_dir


def test_synthetic_datamodule_survives_a_concurrent_writer(tmp_path, monkeypatch):
    real_writer = synth.write_synthetic_spair

    def racing_writer(root, *args):
        # Another process finishes and renames its copy while this one is still writing.
        real_writer(tmp_path / "other", *args)
        os.rename(tmp_path / "other", tmp_path / "synthetic-spair-v1-shift-n2-px64-seed0")
        return real_writer(root, *args)

    monkeypatch.setattr(synth, "write_synthetic_spair", racing_writer)
    dm = SyntheticCorrespondenceDataModule(str(tmp_path), num_pairs=2, kind="shift", image_size=64)
    assert dm.split_size == 2
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic-spair-v1-shift-n2-px64-seed0"]


def test_synthetic_datamodule_temp_folder_is_removed():
    dm = SyntheticCorrespondenceDataModule(num_pairs=1, image_size=64)
    dm.setup()
    base = dm.data_dir.parent
    assert (dm.data_dir / "Layout" / "large" / "test.txt").is_file()
    del dm
    gc.collect()
    assert not base.exists()
