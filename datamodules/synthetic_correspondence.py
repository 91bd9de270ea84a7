"""Synthetic keypoint pairs with known answers, written in the exact SPair-71k layout.

Each object is a few (3-6) flat-coloured parts, discs (category ``discs``) or squares (``squares``),
on a flat background. Part slot ``k`` (the SPair ``kps_ids`` entry) always has colour
``PART_COLOURS[k]``, and its keypoint is the pixel at the part's centre: the drawn shape is
symmetric about that pixel, so the true match of a source keypoint is the target keypoint of the
same slot.

Kinds of target (the source is the same in all three):

* ``transform``: the object scaled by s in [0.7, 1.2] and moved, on another background, in a
  ``(5/4 S) x S`` (w x h) image (so methods meet a non-square target); keypoints are rounded to
  whole pixels, and shapes are drawn about the rounded centres.
* ``shift``: the whole source image translated by ``(kx, ky) * S / 8`` px, kx, ky in -2..2, not
  both 0 (a multiple of S/64 px). After stretching to any side S' that is a multiple of 64 the
  shift is ``(kx, ky) * S' / 64`` latent cells of the ``S'/8`` grid: a whole number.
* ``identical``: the target file holds the same bytes as the source.
* ``mirror``: a left/right test (GeoAware-SC's failure case). The object is centred and made of
  twin parts, mirror images of each other about the image's vertical axis and of the same colour
  (slots ``2j`` and ``2j + 1``, both ``PART_COLOURS[2j]``), and one head part (slot 6 or 7, its own
  colour) off the axis, so the object is not left/right symmetric. The target is the source image
  mirrored (``x -> S - 1 - x``) with its keypoints mirrored: twins trade places, so a matcher that
  trusts local appearance and position sends each twin to the other one (an error of at least
  ``S/5`` px), while matching the mirrored source is exact.

Images are square with side ``S = image_size`` (a multiple of 64) and saved as JPEG quality 95
without chroma subsampling. JPEG moves pixel values near colour edges: part centres stay within 15
levels of their colour (the palette is >= 90 levels apart). Since S/8 is a multiple of the 8 px JPEG
block and the background is flat, a ``shift`` target decodes to exactly the shifted source pixels.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.spair import SPairDataset, check_per_category
from datamodules.training import TrainableDataModule

KINDS = ("transform", "shift", "identical", "mirror")
CATEGORIES = ("discs", "squares")
PART_COLOURS = (
    (220, 30, 30),
    (30, 180, 50),
    (30, 60, 220),
    (240, 220, 30),
    (200, 40, 200),
    (40, 200, 210),
    (245, 130, 20),
    (245, 245, 245),
)
BACKGROUNDS = ((60, 60, 60), (110, 90, 70), (70, 90, 110), (90, 110, 80))
GENERATOR_VERSION = 1


def _check_args(num_pairs: int, image_size: int, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"synthetic correspondence kind must be one of {KINDS}, got {kind!r}")
    if int(num_pairs) < 1:
        raise ValueError(f"num_pairs must be a positive integer, got {num_pairs!r}")
    if int(image_size) < 64 or int(image_size) % 64:
        raise ValueError(f"image_size must be a positive multiple of 64, got {image_size!r}")


def _object_layout(rng: np.random.Generator, image_size: int) -> tuple[list[int], np.ndarray, int]:
    """Part slots, part centres ``(K, 2)`` (x, y) in the object's own frame, and the part radius.

    Parts sit in distinct cells of a 3x3 grid with a little jitter, so centres are at least 3 radii
    apart along some axis and no part covers another's centre, at any scale used here.
    """
    radius = max(3, image_size // 20)
    jitter = max(1, radius // 4)
    cell = 3 * radius + 2 * jitter
    num_parts = int(rng.integers(3, 7))
    slots = sorted(int(s) for s in rng.choice(len(PART_COLOURS), num_parts, replace=False))
    cells = rng.choice(9, num_parts, replace=False)
    grid = np.stack([cells % 3, cells // 3], axis=1)
    centres = grid * cell + cell // 2 + rng.integers(-jitter, jitter + 1, size=(num_parts, 2))
    return slots, centres.astype(np.int64), radius


def _mirror_layout(rng: np.random.Generator, image_size: int) -> tuple[list[int], np.ndarray, int]:
    """The ``mirror`` kind's part slots and centres ``(K, 2)`` (x, y) in image pixels, and the part
    radius: 1-2 twin pairs on distinct rows, mirrored about the image's vertical axis
    (``x_left + x_right = S - 1``) at least 4 radii apart, and a head on its own row off the axis."""
    size = image_size
    radius = max(3, size // 20)
    rows = rng.permutation([size // 4, size // 2, 3 * size // 4])
    num_twins = int(rng.integers(1, 3))
    slots, centres = [], []
    for j in range(num_twins):
        half = int(rng.integers(size // 10, size // 4))  # the twins' distance from the axis
        y = int(rows[j])
        centres += [(size // 2 - 1 - half, y), (size // 2 + half, y)]
        slots += [2 * j, 2 * j + 1]
    side = int(rng.choice([-1, 1]))
    head = size // 2 + side * int(rng.integers(size // 10, size // 4))
    centres.append((head, int(rows[2])))
    slots.append(int(rng.choice([6, 7])))
    return slots, np.array(centres, dtype=np.int64), radius


def _colour_slots(slots: list[int], kind: str) -> list[int]:
    """The slot whose ``PART_COLOURS`` entry paints each part (a ``mirror`` twin: the even one)."""
    return [s - s % 2 if kind == "mirror" and s < 6 else s for s in slots]


def _offset(rng: np.random.Generator, extent: float, radius: int, size: int, shift: int = 0) -> int:
    """A random origin along one axis keeping ``[o - radius, o + extent + radius]`` (and the same
    interval moved by ``shift``) at least one pixel inside ``[0, size)``."""
    lo = 1 + radius + max(0, -shift)
    hi = int(np.floor(size - 2 - extent - radius - max(0, shift)))
    if hi < lo:
        raise AssertionError(f"object of extent {extent} does not fit in {size} px")
    return int(rng.integers(lo, hi + 1))


def _render(
    size: tuple[int, int],
    background: tuple[int, int, int],
    centres: np.ndarray,
    slots: list[int],
    radius: int,
    shape: str,
) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image of ``size`` (w, h) with one part per centre ((x, y) pixels)."""
    w, h = size
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = background
    yy, xx = np.mgrid[0:h, 0:w]
    for (cx, cy), slot in zip(centres, slots, strict=True):
        if shape == "discs":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        else:
            mask = (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
        img[mask] = PART_COLOURS[slot]
    return img


def _bbox(centres: np.ndarray, radius: int, size: tuple[int, int]) -> list[int]:
    """Tight ``[x1, y1, x2, y2]`` around the parts, inside the image of ``size`` (w, h)."""
    x1, y1 = np.maximum(centres.min(0) - radius, 0)
    x2, y2 = np.minimum(centres.max(0) + radius, np.array(size) - 1)
    return [int(x1), int(y1), int(x2), int(y2)]


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _image_annotation(
    name: str, category: str, size: tuple[int, int], bbox: list[int], kps: dict[int, list[int]]
) -> dict:
    """The ``ImageAnnotation/<category>/<name>.json`` record (all 8 slots, ``null`` when absent)."""
    return {
        "filename": f"{name}.jpg",
        "src_database": "sdzero-synthetic",
        "annotation": "sdzero-synthetic",
        "image_width": size[0],
        "image_height": size[1],
        "image_depth": 3,
        "category": category,
        "pose": "Unspecified",
        "truncated": 0,
        "occluded": 0,
        "difficult": 0,
        "bndbox": bbox,
        "kps": {str(k): kps.get(k) for k in range(len(PART_COLOURS))},
        "azimuth_id": 0,
    }


SPLIT_STREAMS = {"test": (), "trn": (1,), "val": (2,)}
"""Extra words of each split's random stream (test pairs keep the stream ``(seed, i)``)."""


def write_synthetic_spair(
    root: str | Path,
    num_pairs: int = 4,
    image_size: int = 128,
    seed: int = 0,
    kind: str = "transform",
    num_train_pairs: int = 0,
    num_val_pairs: int = 0,
) -> Path:
    """Write ``num_pairs`` test pairs (and training/validation pairs) in the SPair-71k layout
    under ``root`` and return ``root``.

    Writes ``JPEGImages/<cat>/*.jpg``, ``ImageAnnotation/<cat>/*.json``,
    ``PairAnnotation/<split>/*.json`` (every official field) and ``Layout/large/<split>.txt`` for
    ``test`` and, when asked for, ``trn`` and ``val``. Pair ``i`` of a split depends only on
    ``(seed, i)`` and the split, so a smaller count writes a prefix of a larger one, and the three
    splits hold different pairs. ``root`` must be empty or absent.

    :param kind: ``"transform"``, ``"shift"``, ``"identical"`` or ``"mirror"`` (the module
        docstring).
    :param image_size: side ``S`` of the square source (and shift/identical target), multiple of 64.
    """
    _check_args(num_pairs, image_size, kind)
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"write_synthetic_spair: {str(root)!r} is not empty")
    (root / "Layout" / "large").mkdir(parents=True)
    counts = {"test": int(num_pairs), "trn": int(num_train_pairs), "val": int(num_val_pairs)}
    for number, (split, count) in enumerate(counts.items()):
        if count or split == "test":
            _write_split(root, split, count, 2000 + number, image_size, seed, kind)
    return root


def _write_split(
    root: Path, split: str, count: int, prefix: int, image_size: int, seed: int, kind: str
) -> None:
    """``count`` pairs of one split; image names start with ``prefix`` (unique per split)."""
    (root / "PairAnnotation" / split).mkdir(parents=True)
    names = []
    for i in range(count):
        rng = np.random.default_rng([seed, i, *SPLIT_STREAMS[split]])
        category = CATEGORIES[i % len(CATEGORIES)]
        layout = _mirror_layout if kind == "mirror" else _object_layout
        slots, parts, radius = layout(rng, image_size)
        colours = _colour_slots(slots, kind)
        extent = float(parts.max())
        src_bg, trg_bg = (BACKGROUNDS[j] for j in rng.choice(len(BACKGROUNDS), 2, replace=False))

        src_size = (image_size, image_size)
        shift = np.zeros(2, dtype=np.int64)
        if kind == "shift":
            steps = rng.choice([(kx, ky) for kx in range(-2, 3) for ky in range(-2, 3) if kx or ky])
            shift = steps * (image_size // 8)
        origin = np.zeros(2, dtype=np.int64)  # a mirror object is laid out in image pixels
        if kind != "mirror":
            origin = np.array([_offset(rng, extent, radius, image_size, int(d)) for d in shift])
        src_kps = parts + origin
        src_pixels = _render(src_size, src_bg, src_kps, colours, radius, category)
        src_bytes = _jpeg(src_pixels)

        if kind == "transform":
            scale = float(rng.uniform(0.7, 1.2))
            trg_size = (image_size * 5 // 4, image_size)
            trg_radius = max(2, round(radius * scale))
            trg_origin = np.array(
                [_offset(rng, extent * scale, trg_radius, side) for side in trg_size]
            )
            trg_kps = np.rint(trg_origin + parts * scale).astype(np.int64)
            trg_bytes = _jpeg(_render(trg_size, trg_bg, trg_kps, slots, trg_radius, category))
        elif kind == "shift":
            trg_size, trg_radius, trg_kps = src_size, radius, src_kps + shift
            trg_bytes = _jpeg(_render(trg_size, src_bg, trg_kps, slots, radius, category))
        elif kind == "mirror":
            trg_size, trg_radius = src_size, radius
            trg_kps = np.stack([image_size - 1 - src_kps[:, 0], src_kps[:, 1]], axis=1)
            trg_bytes = _jpeg(np.ascontiguousarray(src_pixels[:, ::-1]))
        else:
            trg_size, trg_radius, trg_kps, trg_bytes = src_size, radius, src_kps, src_bytes

        src_name, trg_name = f"{prefix}_{2 * i:06d}", f"{prefix}_{2 * i + 1:06d}"
        pair_name = f"{i + 1:06d}-{src_name}-{trg_name}:{category}"
        names.append(pair_name)
        src_box, trg_box = _bbox(src_kps, radius, src_size), _bbox(trg_kps, trg_radius, trg_size)
        for name, size, box, kps, data in (
            (src_name, src_size, src_box, src_kps, src_bytes),
            (trg_name, trg_size, trg_box, trg_kps, trg_bytes),
        ):
            image_dir = root / "JPEGImages" / category
            image_dir.mkdir(parents=True, exist_ok=True)
            (image_dir / f"{name}.jpg").write_bytes(data)
            ann_dir = root / "ImageAnnotation" / category
            ann_dir.mkdir(parents=True, exist_ok=True)
            by_slot = {s: [int(x), int(y)] for s, (x, y) in zip(slots, kps, strict=True)}
            record = _image_annotation(name, category, size, box, by_slot)
            (ann_dir / f"{name}.json").write_text(json.dumps(record))
        pair = {
            "pair_id": i + 1,
            "filename": pair_name,
            "src_imname": f"{src_name}.jpg",
            "trg_imname": f"{trg_name}.jpg",
            "src_imsize": [src_size[0], src_size[1], 3],
            "trg_imsize": [trg_size[0], trg_size[1], 3],
            "src_bndbox": src_box,
            "trg_bndbox": trg_box,
            "category": category,
            "src_pose": "Unspecified",
            "trg_pose": "Unspecified",
            "src_kps": src_kps.tolist(),
            "trg_kps": trg_kps.tolist(),
            "kps_ids": [str(s) for s in slots],
            "mirror": int(kind == "mirror"),
            "viewpoint_variation": 0,
            "scale_variation": 0,
            "truncation": 0,
            "occlusion": 0,
        }
        (root / "PairAnnotation" / split / f"{pair_name}.json").write_text(json.dumps(pair))
    (root / "Layout" / "large" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


class SyntheticSPairDataset(SPairDataset):
    """The synthetic pairs, read by the SPair-71k loader."""

    name = "synthetic-spair"


class SyntheticCorrespondenceDataModule(TrainableDataModule):
    """Writes synthetic SPair-layout pairs in ``setup`` and reads them with the SPair-71k loader.

    The data go to ``root/synthetic-spair-v<version>-<kind>-n<pairs>-px<size>-seed<seed>/`` (a fresh
    temporary folder, removed with the datamodule, when ``root`` is ``None``). An existing folder of
    that name is reused; each writer fills a private temporary folder and renames it into place, so
    concurrent processes never see a half-written dataset.

    :param root: where the dataset folder goes; ``None`` = a temporary folder.
    :param num_pairs: test pairs to write.
    :param num_train_pairs, num_val_pairs: ``trn`` / ``val`` pairs to write (for ``sdzero train``;
        ``train_split``, ``val_split``, ``batch_size``, ``train_limit``: see
        :class:`~datamodules.training.TrainableDataModule`).
    :param kind: ``transform``, ``shift``, ``identical`` or ``mirror`` (see the module docstring).
    :param image_size: source side in pixels (a multiple of 64).
    :param seed: generator seed.
    :param per_category: evaluate the first ``per_category`` test pairs of each category (as
        ``data.per_category`` of SPair-71k).
    """

    def __init__(
        self,
        root: str | None = None,
        num_pairs: int = 4,
        kind: str = "transform",
        image_size: int = 128,
        seed: int = 0,
        per_category: int | None = None,
        limit: int | None = None,
        num_workers: int = 0,
        on_bad_sample: str = "error",
        num_train_pairs: int = 0,
        num_val_pairs: int = 0,
        train_split: str | None = "trn",
        val_split: str | None = "val",
        batch_size: int = 8,
        train_limit: int | None = None,
    ) -> None:
        _check_args(num_pairs, image_size, kind)
        check_per_category(per_category)
        splits = (train_split, val_split, batch_size, train_limit)
        super().__init__(root, limit, num_workers, *splits, on_bad_sample=on_bad_sample)
        self.counts = (int(num_pairs), int(num_train_pairs), int(num_val_pairs))
        self.num_pairs = int(num_pairs)
        self.kind = kind
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.per_category = per_category
        self.data_dir: Path | None = None

    def build_dataset(self) -> SyntheticSPairDataset:
        return SyntheticSPairDataset(self._materialise(), "test", per_category=self.per_category)

    def build_split(self, split: str) -> SyntheticSPairDataset:
        return SyntheticSPairDataset(self._materialise(), split=split)

    def _materialise(self) -> Path:
        """The folder holding the written dataset, writing it first if absent."""
        if self.data_dir is not None:
            return self.data_dir
        if self.root is None:
            base = Path(tempfile.mkdtemp(prefix="sdzero-synthetic-"))
            weakref.finalize(self, shutil.rmtree, base, ignore_errors=True)
        else:
            base = Path(self.root).expanduser()
            base.mkdir(parents=True, exist_ok=True)
        tests, trains, vals = self.counts
        splits = f"-trn{trains}-val{vals}" if trains or vals else ""
        final = base / (
            f"synthetic-spair-v{GENERATOR_VERSION}-{self.kind}-n{tests}{splits}"
            f"-px{self.image_size}-seed{self.seed}"
        )
        if not final.is_dir():
            staging = Path(tempfile.mkdtemp(dir=base, prefix=f".{final.name}."))
            try:
                write_synthetic_spair(
                    staging, tests, self.image_size, self.seed, self.kind, trains, vals
                )
                try:
                    os.rename(staging, final)
                except OSError:
                    # Another process renamed its (identical, deterministic) copy first.
                    if not final.is_dir():
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        self.data_dir = final
        return final
