"""Fixtures of the correspondence datamodules' tests in the official on-disk formats: SPair-71k,
PF-Willow and CUB-200-2011 folders with hand-chosen images, pairs and keypoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size: tuple[int, int], fmt: str = "JPEG") -> None:
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


def write_spair(parent: Path) -> Path:
    top = parent / "SPair-71k"
    for (cat, name), size in SPAIR_IMAGES.items():
        write_image(top / "JPEGImages" / cat / f"{name}.jpg", size)
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


# ------------------------------------------------------------------------------------ PF-Willow

PF_HEADER = ["imageA", "imageB"] + [
    f"{axis}{side}{k}" for side in "AB" for axis in "XY" for k in range(1, 11)
]


def pf_row(src: str, trg: str, src_xy: np.ndarray, trg_xy: np.ndarray) -> str:
    """One CSV row: 10 source x, 10 source y, 10 target x, 10 target y."""
    cells = [src, trg, *src_xy[:, 0], *src_xy[:, 1], *trg_xy[:, 0], *trg_xy[:, 1]]
    return ",".join(str(c) for c in cells)


def pf_points(offset: float) -> np.ndarray:
    return np.stack([np.arange(10) * 3.0 + offset, np.arange(10) * 2.0 + offset + 0.5], axis=1)


def write_pfwillow(parent: Path, csv_name: str = "test_pairs.csv") -> Path:
    top = parent / "PF-WILLOW"
    for sub, stems in (("car(G)", "ab"), ("duck(S)", "cd"), ("winebottle(woC)", "ef")):
        for stem in stems:
            write_image(top / "PF-dataset" / sub / f"{stem}.png", (50, 40), fmt="PNG")
    duck_src, duck_trg = pf_points(1), pf_points(2)
    duck_src[8:] = -1  # the -1 padding of missing keypoints
    duck_trg[3, 0] = -1
    rows = [
        ",".join(PF_HEADER),
        pf_row("PF-dataset/car(G)/a.png", "PF-dataset/car(G)/b.png", pf_points(0), pf_points(4)),
        pf_row("PF-dataset/duck(S)/c.png", "PF-dataset/duck(S)/d.png", duck_src, duck_trg),
        pf_row(
            "PF-dataset/winebottle(woC)/e.png",
            "PF-dataset/winebottle(woC)/f.png",
            pf_points(5),
            pf_points(6),
        ),
    ]
    (top / csv_name).write_text("\n".join(rows) + "\n")
    return top


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


def cub_part(image_id: int, part_id: int) -> tuple[float, float, int]:
    """Hand-chosen annotation: x, y, and visibility (invisible when (image + part) % 3 == 0)."""
    return (
        10.0 * part_id + image_id,
        5.0 * part_id + 2 * image_id,
        int((image_id + part_id) % 3 != 0),
    )


def write_cub(parent: Path) -> Path:
    top = parent / "CUB_200_2011"
    (top / "parts").mkdir(parents=True)
    paths = {i: f"{CUB_CLASSES[c - 1]}/img_{i:04d}.jpg" for i, (c, _) in CUB_IMAGES.items()}
    for rel in paths.values():
        write_image(top / "images" / rel, (60, 50))
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
            x, y, v = cub_part(i, p)
            rows.append(f"{i} {p} {x if v else 0.0} {y if v else 0.0} {v}\n")
    (top / "parts" / "part_locs.txt").write_text("".join(rows))
    return top
