"""The SPair-71k loader on a fixture in the official on-disk format."""

from __future__ import annotations

import json

import pytest
import torch
from correspondence_files import SPAIR_ORDER, write_spair

from datamodules.files import DatasetFormatError, DatasetNotFoundError
from datamodules.spair import SPairDataModule, SPairDataset


def test_spair_pairs_in_layout_order_with_border_keypoints(tmp_path):
    write_spair(tmp_path)
    ds = SPairDataset(tmp_path)  # root = a folder containing SPair-71k/
    assert ds.name == "spair71k"
    assert [p.id for p in ds.pairs] == SPAIR_ORDER
    assert [p.category for p in ds.pairs] == ["cat", "dog", "cat"]
    sample = ds[2]
    assert sample["index"] == 2 and sample["id"] == SPAIR_ORDER[2]
    # Keypoints on the border (x = 0, x = w - 1, y = h - 1, y = 0) are kept, unchanged.
    assert sample["src_kps"].tolist() == [[0, 5], [39, 29], [10, 12]]
    assert sample["trg_kps"].tolist() == [[35, 0], [0, 27], [20, 14]]
    assert sample["src_kps"].dtype == torch.float32 and sample["src_kps"].shape == (3, 2)
    assert sample["src_bbox"].tolist() == [0, 2, 39, 29]
    assert sample["trg_bbox"].tolist() == [0, 0, 35, 27]
    assert sample["src_size"] == (40, 30) and sample["trg_size"] == (36, 28)
    assert sample["src_img"].shape == (3, 30, 40) and sample["src_img"].dtype == torch.uint8


def test_spair_category_filter_and_split(tmp_path):
    top = write_spair(tmp_path)
    assert [p.id for p in SPairDataset(top, category="cat").pairs] == [
        SPAIR_ORDER[0],
        SPAIR_ORDER[2],
    ]
    assert [p.id for p in SPairDataset(top, category=["dog"]).pairs] == [SPAIR_ORDER[1]]
    assert len(SPairDataset(top, category=["dog", "cat"])) == 3
    assert [p.id for p in SPairDataset(top, split="val").pairs] == SPAIR_ORDER[:1]
    with pytest.raises(ValueError, match=r"no category \['bird'\]; available: \['cat', 'dog'\]"):
        SPairDataset(top, category="bird")
    with pytest.raises(ValueError, match="split must be one of"):
        SPairDataset(top, split="train")
    with pytest.raises(DatasetFormatError, match=r"trn\.txt"):
        SPairDataset(top, split="trn")


def test_spair_datamodule_limit(tmp_path):
    write_spair(tmp_path)
    dm = SPairDataModule(str(tmp_path), limit=2)
    assert dm.split_size == 3 and len(dm.dataset) == 2 and dm.dataset_name == "spair71k"
    batches = list(dm.test_dataloader())
    assert [b["id"] for b in batches] == SPAIR_ORDER[:2]
    assert [b["index"] for b in batches] == [0, 1]
    with pytest.raises(ValueError, match="data.limit"):
        SPairDataModule(str(tmp_path), limit=0)


def test_spair_missing_folder_lists_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"not a folder(.|\n)*PairAnnotation/"):
        SPairDataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"JPEGImages(.|\n)*Layout/large"):
        SPairDataset(tmp_path / "empty")


@pytest.mark.parametrize("field", ["trg_kps", "src_bndbox", "src_imname", "category"])
def test_spair_pair_file_missing_field_names_file_and_field(tmp_path, field):
    top = write_spair(tmp_path)
    path = top / "PairAnnotation" / "test" / f"{SPAIR_ORDER[1]}.json"
    record = json.loads(path.read_text())
    del record[field]
    path.write_text(json.dumps(record))
    with pytest.raises(
        DatasetFormatError, match=rf"000002-2009_000001-2009_000002:dog\.json.*'{field}'"
    ):
        SPairDataset(top)


def test_spair_malformed_pairs_are_errors(tmp_path):
    top = write_spair(tmp_path)
    path = top / "PairAnnotation" / "test" / f"{SPAIR_ORDER[0]}.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "trg_kps": record["trg_kps"][:1]}))
    with pytest.raises(DatasetFormatError, match="'src_kps' has 2 points but 'trg_kps' has 1"):
        SPairDataset(top)
    path.write_text(json.dumps({**record, "src_kps": [[1, 2, 3], [4, 5, 6]]}))
    with pytest.raises(DatasetFormatError, match=r"'src_kps' must be a list of finite \[x, y\]"):
        SPairDataset(top)
    path.write_text(json.dumps({**record, "src_imname": "missing.jpg"}))
    with pytest.raises(DatasetFormatError, match=r"JPEGImages/cat/missing\.jpg"):
        SPairDataset(top)
