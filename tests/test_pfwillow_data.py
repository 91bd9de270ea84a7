"""The PF-Willow loader on a fixture in the official on-disk format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from correspondence_files import pf_points, write_pfwillow

from datamodules.files import DatasetFormatError, DatasetNotFoundError
from datamodules.pfwillow import PFWillowDataModule, PFWillowDataset


@pytest.mark.parametrize("csv_name", ["test_pairs.csv", "test_pairs_pf.csv"])
def test_pfwillow_reads_csv_and_drops_padding(tmp_path, csv_name):
    write_pfwillow(tmp_path, csv_name)
    ds = PFWillowDataset(tmp_path)
    assert ds.name == "pfwillow"
    assert [p.category for p in ds.pairs] == ["car", "duck", "winebottle"]
    assert [p.id for p in ds.pairs] == ["000-a-b", "001-c-d", "002-e-f"]
    np.testing.assert_array_equal(ds.pairs[0].src_kps, pf_points(0))
    np.testing.assert_array_equal(ds.pairs[0].trg_kps, pf_points(4))
    # Duck: keypoints 8, 9 padded in the source and 3 invalid in the target are dropped in both.
    keep = [0, 1, 2, 4, 5, 6, 7]
    np.testing.assert_array_equal(ds.pairs[1].src_kps, pf_points(1)[keep])
    np.testing.assert_array_equal(ds.pairs[1].trg_kps, pf_points(2)[keep])
    sample = ds[1]
    assert sample["src_kps"].shape == (7, 2) and sample["src_size"] == (50, 40)
    assert torch.isnan(sample["src_bbox"]).all() and torch.isnan(sample["trg_bbox"]).all()


def test_pfwillow_pairs_file_argument_and_limit(tmp_path):
    top = write_pfwillow(tmp_path, "my_pairs.csv")
    with pytest.raises(DatasetNotFoundError, match="test_pairs_pf.csv"):
        PFWillowDataset(tmp_path)
    assert len(PFWillowDataset(tmp_path, pairs_file="my_pairs.csv")) == 3
    assert len(PFWillowDataset(tmp_path, pairs_file=str(top / "my_pairs.csv"))) == 3
    dm = PFWillowDataModule(str(top), pairs_file="my_pairs.csv", limit=1)
    assert dm.split_size == 3 and [b["id"] for b in dm.test_dataloader()] == ["000-a-b"]


def test_pfwillow_malformed_csv(tmp_path):
    top = write_pfwillow(tmp_path)
    csv_path = top / "test_pairs.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(["source,target" + lines[0][13:], *lines[1:]]))
    with pytest.raises(
        DatasetFormatError, match=r"test_pairs\.csv.*header row starting 'imageA,imageB'"
    ):
        PFWillowDataset(top)
    csv_path.write_text("\n".join([lines[0], lines[1], lines[2].rsplit(",", 1)[0]]))
    with pytest.raises(DatasetFormatError, match=r"test_pairs\.csv' line 3: expected 42 columns"):
        PFWillowDataset(top)
    csv_path.write_text("\n".join([lines[0], lines[1].replace(",0.0,", ",abc,", 1)]))
    with pytest.raises(DatasetFormatError, match="line 2: coordinates must be numbers"):
        PFWillowDataset(top)
    csv_path.write_text("\n".join([lines[0], lines[1].replace("a.png", "zz.png")]))
    with pytest.raises(DatasetFormatError, match=r"car\(G\)/zz\.png"):
        PFWillowDataset(top)
