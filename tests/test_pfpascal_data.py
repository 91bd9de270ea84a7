"""The PF-PASCAL loader on a fixture in the official formats: the Proposal Flow archive's
PF-dataset-PASCAL/{JPEGImages, Annotations/<class>/<image>.mat} and CNNGeometric's
test_pairs_pf_pascal.csv (class ids 1..20, ';'-separated coordinates)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from datamodules.files import DatasetFormatError, DatasetNotFoundError
from datamodules.pfpascal import CLASSES, PFPascalDataModule, PFPascalDataset
from sdzero.config import compose, instantiate

HEADER = "source_image,target_image,class,XA,YA,XB,YB"
# (class id, source, target, source x/y, target x/y)
ROWS = [
    (1, "2011_001407", "2010_004184", ([10.5, 20.25, 30.0], [5.0, 6.0, 7.0]),
     ([11.0, 21.0, 31.0], [8.0, 9.0, 10.5])),
    (12, "2009_002432", "2008_004165", ([1.0, 2.0], [3.0, 4.0]), ([5.0, 6.0], [7.0, 8.0])),
    (1, "2010_004184", "2011_001407", ([11.0], [8.0]), ([10.5], [5.0])),
]  # fmt: skip
SIZES = {"2011_001407": (60, 40), "2010_004184": (50, 45), "2009_002432": (40, 40),
         "2008_004165": (33, 44)}  # fmt: skip
BOXES = {"2011_001407": [2, 3, 50, 30], "2010_004184": [1, 1, 40, 44], "2009_002432": [0, 0, 9, 9],
         "2008_004165": [5, 6, 30, 40]}  # fmt: skip


def row(class_id, src, trg, xy_a, xy_b) -> str:
    lists = [";".join(str(v) for v in values) for values in (*xy_a, *xy_b)]
    return ",".join([f"PF-dataset-PASCAL/JPEGImages/{src}.jpg",
                     f"PF-dataset-PASCAL/JPEGImages/{trg}.jpg", str(class_id), *lists])  # fmt: skip


def write_pfpascal(parent: Path, csv_beside: bool = False, annotations: bool = True) -> Path:
    top = parent / "PF-dataset-PASCAL"
    (top / "JPEGImages").mkdir(parents=True)
    for name, size in SIZES.items():
        Image.new("RGB", size, (90, 60, 30)).save(top / "JPEGImages" / f"{name}.jpg")
    if annotations:
        for class_id, src, trg, *_ in ROWS:
            folder = top / "Annotations" / CLASSES[class_id - 1]
            folder.mkdir(parents=True, exist_ok=True)
            for name in (src, trg):
                kps = np.full((12, 2), np.nan)
                savemat(folder / f"{name}.mat", {"kps": kps, "bbox": np.array([BOXES[name]])})
    csv_path = (parent if csv_beside else top) / "test_pairs_pf_pascal.csv"
    csv_path.write_text("\n".join([HEADER, *(row(*r) for r in ROWS)]) + "\n")
    return top


def test_reads_pairs_keypoints_classes_and_boxes(tmp_path):
    write_pfpascal(tmp_path)
    ds = PFPascalDataset(tmp_path)
    assert ds.name == "pfpascal"
    assert [p.category for p in ds.pairs] == ["aeroplane", "dog", "aeroplane"]
    assert ds.category_names == ["aeroplane", "dog"]
    assert [p.id for p in ds.pairs][0] == "000-2011_001407-2010_004184"
    np.testing.assert_array_equal(ds.pairs[0].src_kps, [[10.5, 5.0], [20.25, 6.0], [30.0, 7.0]])
    np.testing.assert_array_equal(ds.pairs[0].trg_kps, [[11.0, 8.0], [21.0, 9.0], [31.0, 10.5]])
    sample = ds[1]
    assert sample["src_size"] == (40, 40) and sample["trg_size"] == (33, 44)
    assert sample["src_bbox"].tolist() == BOXES["2009_002432"]
    assert sample["trg_bbox"].tolist() == BOXES["2008_004165"]
    assert sample["src_name"] == "PF-dataset-PASCAL/JPEGImages/2009_002432.jpg"
    assert sample["extra"] == {}


@pytest.mark.parametrize("where", ["inside", "beside"])
def test_the_csv_inside_or_beside_and_every_root(tmp_path, where):
    top = write_pfpascal(tmp_path / "data", csv_beside=where == "beside")
    for root in (tmp_path, tmp_path / "data", top):
        assert len(PFPascalDataset(root)) == 3


def test_without_boxes_the_annotations_are_not_needed(tmp_path):
    write_pfpascal(tmp_path, annotations=False)
    with pytest.raises(DatasetFormatError, match=r"Annotations.*aeroplane.*data\.boxes=false"):
        PFPascalDataset(tmp_path)
    sample = PFPascalDataset(tmp_path, boxes=False)[0]
    assert torch.isnan(sample["trg_bbox"]).all()


def test_datamodule_limit_pairs_file_and_config(tmp_path):
    top = write_pfpascal(tmp_path)
    (top / "test_pairs_pf_pascal.csv").rename(top / "val_pairs_pf_pascal.csv")
    with pytest.raises(DatasetNotFoundError, match="test_pairs_pf_pascal.csv"):
        PFPascalDataset(tmp_path)
    dm = PFPascalDataModule(str(tmp_path), pairs_file="val_pairs_pf_pascal.csv", limit=2)
    assert dm.split_size == 3 and dm.dataset_name == "pfpascal"
    assert [b["category"] for b in dm.test_dataloader()] == ["aeroplane", "dog"]
    absolute = PFPascalDataset(tmp_path, pairs_file=str(top / "val_pairs_pf_pascal.csv"))
    assert len(absolute) == 3
    cfg = compose(None, ["data=pfpascal", f"data.root={tmp_path}"])
    assert cfg.data.boxes is True and cfg.data.pairs_file is None
    assert isinstance(instantiate(cfg.data, key="data"), PFPascalDataModule)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda lines: ["source,target,class,XA,YA,XB,YB", *lines[1:]], "expected the header row"),
        (lambda lines: [lines[0], lines[1].replace(",1,", ",21,", 1)], r"line 2: class .*'21'"),
        (lambda lines: [lines[0], lines[1].replace(",1,", ",0,", 1)], r"class id 1\.\.20"),
        (lambda lines: [lines[0], lines[1].rsplit(";", 1)[0]], r"line 2: XA, YA, XB, YB must"),
        (lambda lines: [lines[0], lines[1].replace("10.5;", "x;", 1)], "column XA must be"),
        (lambda lines: [lines[0], lines[1] + ",1"], "expected 7 columns"),
        (lambda lines: [lines[0], lines[1].replace("2011_001407", "9999")], r"9999\.jpg"),
    ],
)
def test_malformed_files_name_the_file_and_the_fault(tmp_path, edit, match):
    top = write_pfpascal(tmp_path)
    csv_path = top / "test_pairs_pf_pascal.csv"
    csv_path.write_text("\n".join(edit(csv_path.read_text().splitlines())) + "\n")
    with pytest.raises(DatasetFormatError, match=match):
        PFPascalDataset(tmp_path, boxes=False)


def test_annotation_without_a_box_is_named(tmp_path):
    top = write_pfpascal(tmp_path)
    savemat(top / "Annotations" / "dog" / "2009_002432.mat", {"kps": np.zeros((2, 2))})
    with pytest.raises(DatasetFormatError, match=r"2009_002432\.mat.*field 'bbox'"):
        PFPascalDataset(tmp_path)
