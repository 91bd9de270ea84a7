"""The CUB-200-2011 loader (Hedlin's and the sampled pair protocols) on a fixture in the official
on-disk format."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from correspondence_files import CUB_CLASSES, cub_part, write_cub

from datamodules.cub import CUBDataModule, CUBDataset
from datamodules.files import DatasetFormatError, DatasetNotFoundError


def _cub_expected(src: int, trg: int) -> tuple[np.ndarray, np.ndarray]:
    common = [p for p in range(1, 16) if cub_part(src, p)[2] and cub_part(trg, p)[2]]
    return (
        np.array([cub_part(src, p)[:2] for p in common]),
        np.array([cub_part(trg, p)[:2] for p in common]),
    )


def test_cub_hedlin_protocol(tmp_path):
    write_cub(tmp_path)
    ds = CUBDataset(tmp_path)
    assert ds.name == "cub200"
    # sum of C(n, 2) over the first 3 classes' test images: C(3,2) + C(4,2) + C(2,2) = 10
    assert len(ds) == 3 + 6 + 1
    expected_ids = [
        f"{a}-{b}"
        for group in ([1, 2, 3], [5, 6, 7, 8], [10, 11])
        for a, b in itertools.combinations(group, 2)
    ]
    assert [p.id for p in ds.pairs] == expected_ids
    assert [p.category for p in ds.pairs][:3] == [CUB_CLASSES[0]] * 3
    assert ds.pairs[-1].category == CUB_CLASSES[2]
    for pair in ds.pairs:
        src, trg = (int(i) for i in pair.id.split("-"))
        src_kps, trg_kps = _cub_expected(src, trg)
        np.testing.assert_array_equal(pair.src_kps, src_kps)
        np.testing.assert_array_equal(pair.trg_kps, trg_kps)
        assert 0 < len(pair.src_kps) < 15  # some parts are invisible in one image
        np.testing.assert_array_equal(pair.src_bbox, [src, 2 * src, src + 30, 2 * src + 20])
    assert len(CUBDataset(tmp_path, num_classes=2)) == 9
    assert len(CUBDataset(tmp_path, split="train")) == 0  # one train image per class: no pair


def test_cub_sampled_protocol(tmp_path):
    top = write_cub(tmp_path)
    every = {p.id for p in CUBDataset(top, num_classes=4).pairs}
    assert len(every) == 11  # class 4 adds C(2, 2)
    drawn = CUBDataset(top, protocol="sampled", num_pairs=5, seed=0)
    ids = [p.id for p in drawn.pairs]
    assert len(set(ids)) == 5 and set(ids) <= every
    assert [p.id for p in CUBDataset(top, protocol="sampled", num_pairs=5, seed=0).pairs] == ids
    assert [p.id for p in CUBDataset(top, protocol="sampled", num_pairs=8, seed=0).pairs][:5] == ids
    all_drawn = [p.id for p in CUBDataset(top, protocol="sampled", seed=1).pairs]  # 1000 > 11: all
    assert set(all_drawn) == every and all_drawn != sorted(every, key=lambda s: s.split("-"))
    pair = drawn.pairs[0]
    np.testing.assert_array_equal(pair.src_kps, _cub_expected(*map(int, pair.id.split("-")))[0])


def test_cub_bad_arguments_and_files(tmp_path):
    top = write_cub(tmp_path)
    with pytest.raises(ValueError, match="num_pairs applies to protocol 'sampled' only"):
        CUBDataset(top, num_pairs=10)
    with pytest.raises(ValueError, match="protocol must be one of"):
        CUBDataset(top, protocol="asic")
    with pytest.raises(ValueError, match="num_classes"):
        CUBDataset(top, num_classes=0)
    boxes = top / "bounding_boxes.txt"
    boxes.write_text(boxes.read_text().replace("13 13.0 26.0 30.0 20.0", "13 13.0 26.0 30.0"))
    with pytest.raises(
        DatasetFormatError, match=r"bounding_boxes\.txt' line 1: expected 5 columns"
    ):
        CUBDataset(top)
    boxes.write_text("".join(f"{i} 1 2 3 4\n" for i in range(1, 13)))
    with pytest.raises(DatasetFormatError, match=r"bounding_boxes\.txt' has no row for id 13"):
        CUBDataset(top, num_classes=4)
    (top / "parts" / "part_locs.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="parts/part_locs.txt"):
        CUBDataset(top)


def test_cub_datamodule_limit(tmp_path):
    write_cub(tmp_path)
    dm = CUBDataModule(str(tmp_path), limit=4)
    assert dm.split_size == 10 and dm.dataset_name == "cub200"
    batches = list(dm.test_dataloader())
    assert [b["id"] for b in batches] == ["1-2", "1-3", "2-3", "5-6"]
    assert batches[0]["src_bbox"].tolist() == [1, 2, 31, 22]
