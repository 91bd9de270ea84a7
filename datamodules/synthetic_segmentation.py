"""A small segmentation dataset with known answers, written in the exact PASCAL VOC layout.

Layout written under ``root`` (read back by :class:`~datamodules.voc.VOCDataset`, the real loader)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png     palette PNG: 0 background, 1..C classes,
                                                     255 on a 2-pixel band along every contour
    VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt
    support/<class name>/<k>.png                     the class's object, large, on other backgrounds
    sdzero_synthetic.json                            the parameters (present = dataset complete)

Each class is a shape with its own saturated colour and texture; backgrounds are greyish gradients
with noise, so colour alone tells the classes apart. Test images alternate landscape and portrait
(long side ``image_size``) and hold 1-3 objects; image ``i`` always shows class ``i % C + 1`` unoccluded.
Everything is drawn from ``numpy.random.default_rng(seed)``, so the files are reproducible.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.base import SegmentationDataModule
from datamodules.labels import LabelSpace
from datamodules.voc import VOCDataset

MARKER = "sdzero_synthetic.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SyntheticClass:
    """How one synthetic class looks: a shape, an RGB colour and a texture (darkened pattern)."""

    name: str
    shape: str
    colour: tuple[int, int, int]
    texture: str


CATALOGUE = (
    SyntheticClass("ball", "disc", (220, 40, 40), "solid"),
    SyntheticClass("box", "square", (40, 190, 60), "checker"),
    SyntheticClass("kite", "diamond", (40, 80, 225), "hstripes"),
    SyntheticClass("pyramid", "triangle", (235, 200, 30), "vstripes"),
    SyntheticClass("ring", "annulus", (160, 50, 190), "dots"),
    SyntheticClass("cross", "plus", (245, 130, 20), "diagonal"),
)


def synthetic_classes(classes: int | Sequence[str]) -> list[SyntheticClass]:
    """The first ``classes`` catalogue entries, or the entries with the given names, in that order."""
    by_name = {c.name: c for c in CATALOGUE}
    if isinstance(classes, int):
        if not 1 <= classes <= len(CATALOGUE):
            raise ValueError(f"classes must be 1..{len(CATALOGUE)}, got {classes}")
        return list(CATALOGUE[:classes])
    names = list(classes)
    unknown = [n for n in names if n not in by_name]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"classes must be distinct names among {sorted(by_name)} (or a count), got {names}"
        )
    return [by_name[n] for n in names]


def synthetic_labels(classes: int | Sequence[str]) -> LabelSpace:
    """Background (0, stuff) then the synthetic classes (1..C)."""
    return LabelSpace.with_background(["background", *(c.name for c in synthetic_classes(classes))])


def voc_palette() -> list[int]:
    """The VOC colour map (768 values): bits of the index spread over R, G, B from the high bit."""
    palette = []
    for index in range(256):
        rgb = [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
        palette += rgb
    return palette


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, r: float) -> np.ndarray:
    """Pixels of ``shape`` of radius ``r`` around 0; ``xx``/``yy`` are pixel offsets from its centre."""
    ax, ay = np.abs(xx), np.abs(yy)
    if shape == "disc":
        return xx**2 + yy**2 <= r**2
    if shape == "square":
        return (ax <= 0.8 * r) & (ay <= 0.8 * r)
    if shape == "diamond":
        return ax + ay <= r
    if shape == "triangle":  # apex up at -r, base at +0.8 r
        return (yy >= -r) & (yy <= 0.8 * r) & (ax <= (yy + r) / 1.8)
    if shape == "annulus":
        return (xx**2 + yy**2 <= r**2) & (xx**2 + yy**2 >= (0.5 * r) ** 2)
    if shape == "plus":
        return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Brightness factor per pixel (1.0 or 0.6); ``xx``/``yy`` are image pixel coordinates."""
    xx, yy = xx.astype(int), yy.astype(int)
    pattern = {
        "solid": np.zeros_like(xx, dtype=bool),
        "checker": (xx // 6 + yy // 6) % 2 == 1,
        "hstripes": (yy // 4) % 2 == 1,
        "vstripes": (xx // 4) % 2 == 1,
        "dots": (xx % 6 < 3) & (yy % 6 < 3),
        "diagonal": ((xx + yy) // 5) % 2 == 1,
    }[texture]
    return np.where(pattern, 0.6, 1.0)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """``(H, W, 3)`` float RGB: a tinted grey gradient with grey noise (low saturation)."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    slope = rng.uniform(-50, 50, size=2)
    grey = rng.uniform(70, 190) + slope[0] * (xx - 0.5) + slope[1] * (yy - 0.5)
    grey = grey + rng.normal(0.0, 6.0, size=(height, width))
    return grey[..., None] + rng.uniform(-20, 20, size=3)


def _paint(image: np.ndarray, spec: SyntheticClass, cx: float, cy: float, r: float) -> np.ndarray:
    """Draw ``spec`` centred at ``(cx, cy)`` (pixels) into ``image`` in place; return its ``(H, W)`` mask."""
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    mask = _shape_mask(spec.shape, xx - cx, yy - cy, r)
    shade = _texture(spec.texture, xx, yy)[mask]
    image[mask] = np.asarray(spec.colour, dtype=float) * shade[:, None]
    return mask


def _mark_contours(label: np.ndarray, ignore_index: int = 255) -> None:
    """Set to ``ignore_index`` both pixels of every 4-neighbour pair with different labels (VOC-style)."""
    edge = np.zeros(label.shape, dtype=bool)
    horizontal = label[:, 1:] != label[:, :-1]
    vertical = label[1:] != label[:-1]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:] |= vertical
    edge[:-1] |= vertical
    label[edge] = ignore_index


def _to_uint8(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))


def _write(
    out: Path,
    specs: Sequence[SyntheticClass],
    num_images: int,
    image_size: int,
    seed: int,
    num_support: int,
) -> None:
    rng = np.random.default_rng(seed)
    voc = out / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    short = round(0.75 * image_size)
    ids = []
    for i in range(num_images):
        width, height = (image_size, short) if i % 2 == 0 else (short, image_size)
        image = _background(rng, width, height)
        label = np.zeros((height, width), dtype=np.uint8)
        extra = rng.integers(0, len(specs), size=int(rng.integers(0, 3))).tolist()
        # The guaranteed class is drawn last so that nothing hides it.
        for k in [*extra, i % len(specs)]:
            r = rng.uniform(0.18, 0.3) * min(width, height)
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            label[_paint(image, specs[k], cx, cy, r)] = k + 1
        _mark_contours(label)
        image_id = f"synthetic_{i:06d}"
        ids.append(image_id)
        _to_uint8(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        png = Image.fromarray(label)
        png.putpalette(voc_palette())
        png.save(voc / "SegmentationClass" / f"{image_id}.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    for spec in specs:
        folder = out / "support" / spec.name
        folder.mkdir(parents=True)
        for j in range(num_support):
            image = _background(rng, image_size, image_size)
            # Radius and offset keep every shape inside and covering >= 30 % of the image.
            cx, cy = image_size * (0.5 + rng.uniform(-0.04, 0.04, size=2))
            _paint(image, spec, cx, cy, rng.uniform(0.42, 0.46) * image_size)
            _to_uint8(image).save(folder / f"{j:03d}.png")


def _check_sizes(num_images: int, image_size: int, num_support: int) -> None:
    if num_images < 1 or num_support < 1:
        raise ValueError(
            f"num_images and num_support must be >= 1, got {num_images}, {num_support}"
        )
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")


def _holds(root: Path, params: dict) -> bool:
    marker = root / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == params


def write_synthetic_voc(
    root: str | Path,
    num_images: int = 6,
    classes: int | Sequence[str] = 3,
    image_size: int = 128,
    seed: int = 0,
    num_support: int = 4,
) -> Path:
    """Write the synthetic dataset into ``root`` (new or empty folder) and return ``root``.

    Idempotent: a ``root`` already holding the same dataset is left as it is. Safe when several
    processes write the same ``root``: each writes a private temporary sibling folder and renames it
    into place, which is atomic; a loser of the race finds the winner's complete dataset.

    :param classes: how many catalogue classes (1..6), or their names (see :data:`CATALOGUE`).
    :param image_size: long side of the test images and side of the square support images (pixels).
    :param num_support: support images per class.
    """
    specs = synthetic_classes(classes)
    _check_sizes(num_images, image_size, num_support)
    params = {
        "format": FORMAT_VERSION,
        "num_images": num_images,
        "classes": [s.name for s in specs],
        "image_size": image_size,
        "seed": seed,
        "num_support": num_support,
    }
    root = Path(root).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if _holds(root, params):
            return root
        raise FileExistsError(
            f"{str(root)!r} is not an empty folder and holds no synthetic dataset written with "
            f"{params} (checked {MARKER}); give a new or empty folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        _write(tmp, specs, num_images, image_size, seed, num_support)
        (tmp / MARKER).write_text(json.dumps(params, indent=1))
        try:
            if root.is_dir():
                root.rmdir()  # an empty folder given as root is replaced
            tmp.rename(root)
        except OSError:
            if not _holds(root, params):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class SyntheticVOCDataset(VOCDataset):
    """The synthetic dataset, read by the VOC loader with the synthetic classes."""

    names = ("synthetic-voc", "synthetic-voc-20")

    def __init__(
        self, root: str | Path, classes: int | Sequence[str] = 3, background: bool = True
    ) -> None:
        super().__init__(root, background=background, labels=synthetic_labels(classes))


class SyntheticSegmentationDataModule(SegmentationDataModule):
    """Writes the synthetic dataset on first ``setup`` and reads it with the VOC loader.

    :param root: where to write it; ``None`` = a fresh temporary folder (one per datamodule).
    :param background: keep class 0 (VOC21-like) or ignore it and shift the classes down
        (``reduce_zero_label``, VOC20-like); the files written are the same either way.
    Other parameters: see :func:`write_synthetic_voc`.
    """

    def __init__(
        self,
        root: str | None = None,
        num_images: int = 6,
        classes: int | list[str] = 3,
        image_size: int = 128,
        seed: int = 0,
        num_support: int = 4,
        limit: int | None = None,
        num_workers: int = 0,
        on_bad_sample: str = "error",
        background: bool = True,
    ) -> None:
        super().__init__(root, limit, num_workers, on_bad_sample=on_bad_sample)
        self.background = background
        synthetic_classes(classes)
        _check_sizes(num_images, image_size, num_support)
        self.num_images = num_images
        self.classes = classes
        self.image_size = image_size
        self.seed = seed
        self.num_support = num_support
        self._written: Path | None = None

    @property
    def labels(self) -> LabelSpace:
        return VOCDataset.label_space(self.background, synthetic_labels(self.classes))

    @property
    def data_root(self) -> Path:
        """The folder holding ``VOCdevkit/`` and ``support/``; the dataset is written on first use."""
        if self._written is None:
            root = self.root or tempfile.mkdtemp(prefix="sdzero-synthetic-segmentation-")
            self._written = write_synthetic_voc(
                root, self.num_images, self.classes, self.image_size, self.seed, self.num_support
            )
        return self._written

    @property
    def support_root(self) -> Path:
        """``support/``: one folder of support images per class, named by the class name."""
        return self.data_root / "support"

    def build_dataset(self) -> SyntheticVOCDataset:
        return SyntheticVOCDataset(self.data_root, self.classes, self.background)
