"""Correspondence datamodules: the SPair-71k, PF-Willow and CUB-200-2011 loaders on fixtures in the
official on-disk formats, and the known answers of the synthetic SPair-layout writer."""

from __future__ import annotations

import gc
import importlib
import inspect
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import datamodules.synthetic_correspondence as synth
from datamodules.cub import CUBDataModule, CUBDataset
from datamodules.files import DatasetFormatError, DatasetNotFoundError
from datamodules.pfwillow import PFWillowDataModule, PFWillowDataset
from datamodules.spair import SPairDataModule, SPairDataset
from datamodules.synthetic_correspondence import (
    PART_COLOURS,
    SyntheticCorrespondenceDataModule,
    write_synthetic_spair,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


def _image(path: Path, size: tuple[int, int], fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 80, 40)).save(path, format=fmt)


# ---------------------------------------------------------------------------------------- SPair

SPAIR_IMAGES = {  # (category, name): (w, h)
    ("cat", "2008_000001"): (40, 30),
    ("cat", "2008_000002"): (36, 28),
    ("dog", "2009_000001"): (32, 32),
    ("dog", "2009_000002"): (30, 34),
}
SPAIR_PAIRS = {  # name: (src, trg, src_kps, trg_kps, src_box, trg_box)
    "000001-2008_000001-2008_000002:cat": (
        "2008_000001",
        "2008_000002",
        [[0, 5], [39, 29], [10, 12]],  # left border, bottom-right corner pixel
        [[35, 0], [0, 27], [20, 14]],
        [0, 2, 39, 29],
        [0, 0, 35, 27],
    ),
    "000002-2009_000001-2009_000002:dog": (
        "2009_000001",
        "2009_000002",
        [[3, 4]],
        [[5, 6]],
        [1, 1, 20, 20],
        [2, 2, 25, 30],
    ),
    "000003-2008_000002-2008_000001:cat": (
        "2008_000002",
        "2008_000001",
        [[1, 2], [3, 4]],
        [[5, 6], [7, 8]],
        [0, 0, 10, 10],
        [0, 0, 12, 12],
    ),
}
SPAIR_ORDER = [  # Layout order, deliberately not sorted
    "000003-2008_000002-2008_000001:cat",
    "000002-2009_000001-2009_000002:dog",
    "000001-2008_000001-2008_000002:cat",
]


def _write_spair(parent: Path) -> Path:
    top = parent / "SPair-71k"
    for (cat, name), size in SPAIR_IMAGES.items():
        _image(top / "JPEGImages" / cat / f"{name}.jpg", size)
        ann = top / "ImageAnnotation" / cat / f"{name}.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(json.dumps({"filename": f"{name}.jpg", "image_width": size[0]}))
    for split, names in (("test", SPAIR_ORDER), ("val", SPAIR_ORDER[:1])):
        folder = top / "PairAnnotation" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            src, trg, skps, tkps, sbox, tbox = SPAIR_PAIRS[name]
            cat = name.split(":")[1]
            record = {
                "pair_id": i + 1,
                "filename": name,
                "src_imname": f"{src}.jpg",
                "trg_imname": f"{trg}.jpg",
                "src_imsize": [*SPAIR_IMAGES[cat, src], 3],
                "trg_imsize": [*SPAIR_IMAGES[cat, trg], 3],
                "src_bndbox": sbox,
                "trg_bndbox": tbox,
                "category": cat,
                "src_pose": "Unspecified",
                "trg_pose": "Unspecified",
                "src_kps": skps,
                "trg_kps": tkps,
                "kps_ids": [str(k) for k in range(len(skps))],
                "mirror": 0,
                "viewpoint_variation": 0,
                "scale_variation": 0,
                "truncation": 0,
                "occlusion": 0,
            }
            (folder / f"{name}.json").write_text(json.dumps(record))
        layout = top / "Layout" / "large" / f"{split}.txt"
        layout.parent.mkdir(parents=True, exist_ok=True)
        layout.write_text("".join(f"{n}\n" for n in names))
    return top


def test_spair_pairs_in_layout_order_with_border_keypoints(tmp_path):
    _write_spair(tmp_path)
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
    top = _write_spair(tmp_path)
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
    _write_spair(tmp_path)
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
    top = _write_spair(tmp_path)
    path = top / "PairAnnotation" / "test" / f"{SPAIR_ORDER[1]}.json"
    record = json.loads(path.read_text())
    del record[field]
    path.write_text(json.dumps(record))
    with pytest.raises(
        DatasetFormatError, match=rf"000002-2009_000001-2009_000002:dog\.json.*'{field}'"
    ):
        SPairDataset(top)


def test_spair_malformed_pairs_are_errors(tmp_path):
    top = _write_spair(tmp_path)
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


# ------------------------------------------------------------------------------------ PF-Willow

PF_HEADER = ["imageA", "imageB"] + [
    f"{axis}{side}{k}" for side in "AB" for axis in "XY" for k in range(1, 11)
]


def _pf_row(src: str, trg: str, src_xy: np.ndarray, trg_xy: np.ndarray) -> str:
    """One CSV row: 10 source x, 10 source y, 10 target x, 10 target y."""
    cells = [src, trg, *src_xy[:, 0], *src_xy[:, 1], *trg_xy[:, 0], *trg_xy[:, 1]]
    return ",".join(str(c) for c in cells)


def _pf_points(offset: float) -> np.ndarray:
    return np.stack([np.arange(10) * 3.0 + offset, np.arange(10) * 2.0 + offset + 0.5], axis=1)


def _write_pfwillow(parent: Path, csv_name: str = "test_pairs.csv") -> Path:
    top = parent / "PF-WILLOW"
    for sub, stems in (("car(G)", "ab"), ("duck(S)", "cd"), ("winebottle(woC)", "ef")):
        for stem in stems:
            _image(top / "PF-dataset" / sub / f"{stem}.png", (50, 40), fmt="PNG")
    duck_src, duck_trg = _pf_points(1), _pf_points(2)
    duck_src[8:] = -1  # the -1 padding of missing keypoints
    duck_trg[3, 0] = -1
    rows = [
        ",".join(PF_HEADER),
        _pf_row("PF-dataset/car(G)/a.png", "PF-dataset/car(G)/b.png", _pf_points(0), _pf_points(4)),
        _pf_row("PF-dataset/duck(S)/c.png", "PF-dataset/duck(S)/d.png", duck_src, duck_trg),
        _pf_row(
            "PF-dataset/winebottle(woC)/e.png",
            "PF-dataset/winebottle(woC)/f.png",
            _pf_points(5),
            _pf_points(6),
        ),
    ]
    (top / csv_name).write_text("\n".join(rows) + "\n")
    return top


@pytest.mark.parametrize("csv_name", ["test_pairs.csv", "test_pairs_pf.csv"])
def test_pfwillow_reads_csv_and_drops_padding(tmp_path, csv_name):
    _write_pfwillow(tmp_path, csv_name)
    ds = PFWillowDataset(tmp_path)
    assert ds.name == "pfwillow"
    assert [p.category for p in ds.pairs] == ["car", "duck", "winebottle"]
    assert [p.id for p in ds.pairs] == ["000-a-b", "001-c-d", "002-e-f"]
    np.testing.assert_array_equal(ds.pairs[0].src_kps, _pf_points(0))
    np.testing.assert_array_equal(ds.pairs[0].trg_kps, _pf_points(4))
    # Duck: keypoints 8, 9 padded in the source and 3 invalid in the target are dropped in both.
    keep = [0, 1, 2, 4, 5, 6, 7]
    np.testing.assert_array_equal(ds.pairs[1].src_kps, _pf_points(1)[keep])
    np.testing.assert_array_equal(ds.pairs[1].trg_kps, _pf_points(2)[keep])
    sample = ds[1]
    assert sample["src_kps"].shape == (7, 2) and sample["src_size"] == (50, 40)
    assert torch.isnan(sample["src_bbox"]).all() and torch.isnan(sample["trg_bbox"]).all()


def test_pfwillow_pairs_file_argument_and_limit(tmp_path):
    top = _write_pfwillow(tmp_path, "my_pairs.csv")
    with pytest.raises(DatasetNotFoundError, match="test_pairs_pf.csv"):
        PFWillowDataset(tmp_path)
    assert len(PFWillowDataset(tmp_path, pairs_file="my_pairs.csv")) == 3
    assert len(PFWillowDataset(tmp_path, pairs_file=str(top / "my_pairs.csv"))) == 3
    dm = PFWillowDataModule(str(top), pairs_file="my_pairs.csv", limit=1)
    assert dm.split_size == 3 and [b["id"] for b in dm.test_dataloader()] == ["000-a-b"]


def test_pfwillow_malformed_csv(tmp_path):
    top = _write_pfwillow(tmp_path)
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


# ------------------------------------------------------------------------------------------ CUB

# image id: (class id, is_train); test images per class: 3, 4, 2 (classes 1-3) and 2 (class 4).
CUB_IMAGES = {
    1: (1, 0), 2: (1, 0), 3: (1, 0), 4: (1, 1),
    5: (2, 0), 6: (2, 0), 7: (2, 0), 8: (2, 0), 9: (2, 1),
    10: (3, 0), 11: (3, 0),
    12: (4, 0), 13: (4, 0),
}  # fmt: skip
CUB_CLASSES = [
    "001.Black_footed_Albatross",
    "002.Laysan_Albatross",
    "003.Sooty_Albatross",
    "004.Groove_billed_Ani",
]


def _part(image_id: int, part_id: int) -> tuple[float, float, int]:
    """Hand-chosen annotation: x, y, and visibility (invisible when (image + part) % 3 == 0)."""
    return (
        10.0 * part_id + image_id,
        5.0 * part_id + 2 * image_id,
        int((image_id + part_id) % 3 != 0),
    )


def _write_cub(parent: Path) -> Path:
    top = parent / "CUB_200_2011"
    (top / "parts").mkdir(parents=True)
    paths = {i: f"{CUB_CLASSES[c - 1]}/img_{i:04d}.jpg" for i, (c, _) in CUB_IMAGES.items()}
    for rel in paths.values():
        _image(top / "images" / rel, (60, 50))
    ids = sorted(CUB_IMAGES, reverse=True)  # file order must not matter: pairs follow image ids
    (top / "images.txt").write_text("".join(f"{i} {paths[i]}\n" for i in ids))
    (top / "image_class_labels.txt").write_text("".join(f"{i} {CUB_IMAGES[i][0]}\n" for i in ids))
    (top / "train_test_split.txt").write_text("".join(f"{i} {CUB_IMAGES[i][1]}\n" for i in ids))
    (top / "bounding_boxes.txt").write_text(
        "".join(f"{i} {i}.0 {2 * i}.0 30.0 20.0\n" for i in ids)
    )
    (top / "classes.txt").write_text("".join(f"{k} {n}\n" for k, n in enumerate(CUB_CLASSES, 1)))
    rows = []
    for i in sorted(CUB_IMAGES):
        for p in range(1, 16):
            x, y, v = _part(i, p)
            rows.append(f"{i} {p} {x if v else 0.0} {y if v else 0.0} {v}\n")
    (top / "parts" / "part_locs.txt").write_text("".join(rows))
    return top


def _cub_expected(src: int, trg: int) -> tuple[np.ndarray, np.ndarray]:
    common = [p for p in range(1, 16) if _part(src, p)[2] and _part(trg, p)[2]]
    return (
        np.array([_part(src, p)[:2] for p in common]),
        np.array([_part(trg, p)[:2] for p in common]),
    )


def test_cub_hedlin_protocol(tmp_path):
    _write_cub(tmp_path)
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
    top = _write_cub(tmp_path)
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
    top = _write_cub(tmp_path)
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
    _write_cub(tmp_path)
    dm = CUBDataModule(str(tmp_path), limit=4)
    assert dm.split_size == 10 and dm.dataset_name == "cub200"
    batches = list(dm.test_dataloader())
    assert [b["id"] for b in batches] == ["1-2", "1-3", "2-3", "5-6"]
    assert batches[0]["src_bbox"].tolist() == [1, 2, 31, 22]


# ------------------------------------------------------------------------------------ synthetic


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


# -------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["spair", "pfwillow", "cub", "synthetic_correspondence"])
def test_config_lists_every_argument_with_its_default(name):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    module, _, attr = cfg._target_.rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), attr)).parameters
    assert set(cfg) - {"_target_"} == set(params)
    for key, param in params.items():
        if OmegaConf.is_missing(cfg, key):
            assert param.default is inspect.Parameter.empty
        else:
            assert cfg[key] == param.default, key
