"""Shared shape of every benchmark: samples carry their dataset index, datamodules only read files.

Two kinds of benchmark:

* keypoint pairs (correspondence): :class:`KeypointPairDataset` yields dicts with the ORIGINAL images
  and keypoints as ``(x, y)`` pixels of the original image files;
* segmentation images: :class:`SegmentationDataset` yields an image and its label map of class
  indices (``ignore_index`` marks void pixels).

Adding a dataset is one subclass that lists its samples (``_load_pairs`` / ``_load_items``) plus one YAML
under ``configs/data/``; everything else (limit, loaders, errors, collation) lives here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from sdzero.errors import ConfigError, UserError


class DatasetFormatError(UserError, ValueError):
    """A dataset file is missing or malformed; the message names the file and what was expected."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset's top folder could not be found under ``data.root``."""


# --------------------------------------------------------------------------------------- files


def find_dataset_root(root: str | Path, markers: Sequence[str], layout: str, name: str) -> Path:
    """Return the folder under ``root`` (itself, or up to two levels down) holding every marker path.

    :param root: what the user gave as ``data.root``.
    :param markers: relative paths that must all exist in the dataset's top folder.
    :param layout: a short drawing of the expected layout, shown when nothing is found.
    :param name: the dataset's name for the message.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"{name}: data.root={str(root)!r} is not a folder. Expected the unpacked official "
            f"dataset, laid out as:\n{layout}"
        )
    candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    candidates += sorted(p for c in candidates[1:] for p in c.iterdir() if p.is_dir())
    for cand in candidates:
        if all((cand / m).exists() for m in markers):
            return cand
    raise DatasetNotFoundError(
        f"{name}: no folder under {str(root)!r} (searched it and two levels below) holds "
        f"{', '.join(markers)}. Expected the unpacked official dataset, laid out as:\n{layout}"
    )


def _open_image(path: Path, what: str) -> Image.Image:
    """The decoded image file; :class:`DatasetFormatError` naming it if it is missing, not an
    image, or truncated. ``what`` names the file's role in the message (``image``, ``label``)."""
    if not path.is_file():
        raise DatasetFormatError(f"{what} file {str(path)!r} does not exist")
    img = None
    try:
        img = Image.open(path)
        img.load()
    except OSError as err:  # PIL's UnidentifiedImageError and truncated data are OSErrors
        if img is not None:
            img.close()
        raise DatasetFormatError(
            f"{what} file {str(path)!r} cannot be read as an image ({err}); expected a PNG or JPEG"
        ) from err
    return img


def load_rgb(path: str | Path) -> torch.Tensor:
    """Read an image file as ``(3, H, W)`` uint8 RGB in the original pixel grid.

    Grey, palette, CMYK and RGBA files are converted to RGB (several benchmarks contain a few);
    modes that hold no displayable colour (16-bit, float) raise :class:`DatasetFormatError`.
    """
    with _open_image(Path(path), "image") as img:
        if img.mode not in {"RGB", "L", "P", "CMYK", "RGBA", "LA", "YCbCr"}:
            raise DatasetFormatError(
                f"image {str(path)!r} has mode {img.mode!r}; expected an 8-bit colour or grey image"
            )
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_label(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a label PNG of class indices as ``(H, W)`` int64.

    The file must be single-channel (``L`` or palette ``P``; the palette index is the class). ``size``
    is the expected ``(w, h)``: the image's size, so a label of another size is an error.
    """
    path = Path(path)
    with _open_image(path, "label") as img:
        if img.mode not in {"L", "P"}:
            raise DatasetFormatError(
                f"label {str(path)!r} has mode {img.mode!r}; expected a single-channel PNG of class "
                "indices (mode 'L' or 'P')"
            )
        if size is not None and img.size != tuple(size):
            raise DatasetFormatError(
                f"label {str(path)!r} is {img.size[0]}x{img.size[1]} (w x h) but its image is "
                f"{size[0]}x{size[1]}"
            )
        arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.astype(np.int64))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DatasetFormatError(f"annotation file {str(path)!r} does not exist") from err
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"annotation file {str(path)!r} is not valid JSON: {err}") from err


def require(record: dict, field: str, path: str | Path) -> Any:
    """``record[field]``, or a :class:`DatasetFormatError` naming the file and the missing field."""
    if field not in record:
        raise DatasetFormatError(f"{str(path)!r} has no field {field!r}")
    return record[field]


# --------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class KeypointPair:
    """One annotated pair; coordinates are ``(x, y)`` pixels of the ORIGINAL image files.

    ``src_kps``/``trg_kps``: ``(N, 2)`` float arrays of corresponding points (only those annotated in
    both images). ``*_bbox``: ``[x1, y1, x2, y2]`` object box, or ``None`` where the dataset has none.
    """

    id: str
    category: str
    src_path: Path
    trg_path: Path
    src_kps: np.ndarray
    trg_kps: np.ndarray
    src_bbox: np.ndarray | None = None
    trg_bbox: np.ndarray | None = None


class KeypointPairDataset(Dataset):
    """Base of the correspondence benchmarks. Subclasses implement :meth:`_load_pairs`.

    ``__getitem__`` returns ``{"index", "id", "category", "src_img", "trg_img" ((3, H, W) uint8),
    "src_kps", "trg_kps" ((N, 2) float32, x/y in original pixels), "src_bbox", "trg_bbox" ((4,) float32
    x1 y1 x2 y2, NaN when absent), "src_size", "trg_size" ((w, h))}``.
    """

    name = "keypoint-pairs"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.pairs: list[KeypointPair] = self._load_pairs()

    def _load_pairs(self) -> list[KeypointPair]:
        raise NotImplementedError

    @property
    def category_names(self) -> list[str]:
        """The categories of the split's pairs, sorted (the per-category rows of PCK)."""
        return sorted({pair.category for pair in self.pairs})

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        src, trg = load_rgb(pair.src_path), load_rgb(pair.trg_path)
        nan_box = np.full(4, np.nan, dtype=np.float32)
        return {
            "index": index,
            "id": pair.id,
            "category": pair.category,
            "src_img": src,
            "trg_img": trg,
            "src_kps": torch.as_tensor(pair.src_kps, dtype=torch.float32).reshape(-1, 2),
            "trg_kps": torch.as_tensor(pair.trg_kps, dtype=torch.float32).reshape(-1, 2),
            "src_bbox": torch.as_tensor(
                nan_box if pair.src_bbox is None else pair.src_bbox, dtype=torch.float32
            ),
            "trg_bbox": torch.as_tensor(
                nan_box if pair.trg_bbox is None else pair.trg_bbox, dtype=torch.float32
            ),
            "src_size": (int(src.shape[2]), int(src.shape[1])),
            "trg_size": (int(trg.shape[2]), int(trg.shape[1])),
        }


# --------------------------------------------------------------------------------- segmentation


@dataclass(frozen=True)
class SegmentationItem:
    """One evaluation image and its label PNG."""

    id: str
    image_path: Path
    label_path: Path


class SegmentationDataset(Dataset):
    """Base of the segmentation benchmarks. Subclasses implement :meth:`_load_items` and set
    ``class_names`` (index = label value) and ``ignore_index``.

    ``__getitem__`` returns ``{"index", "id", "image" ((3, H, W) uint8), "label" ((H, W) int64)}``;
    labels are produced by :meth:`convert_label` (identity unless the benchmark remaps raw ids).
    """

    name = "segmentation"
    class_names: list[str] = []
    ignore_index: int = 255

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.items: list[SegmentationItem] = self._load_items()

    def _load_items(self) -> list[SegmentationItem]:
        raise NotImplementedError

    def convert_label(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        image = load_rgb(item.image_path)
        label = load_label(item.label_path, size=(int(image.shape[2]), int(image.shape[1])))
        return {"index": index, "id": item.id, "image": image, "label": self.convert_label(label)}


# ---------------------------------------------------------------------------------- datamodule


def unwrap_single(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate for batch size 1: samples differ in size, so the sample itself is the batch."""
    if len(batch) != 1:
        raise ValueError(f"benchmark loaders use batch_size=1, got a batch of {len(batch)}")
    return batch[0]


class LimitedDataset(Dataset):
    """The first ``limit`` samples of ``dataset`` in its fixed order (indices unchanged)."""

    def __init__(self, dataset: Dataset, limit: int | None) -> None:
        self.dataset = dataset
        self.length = len(dataset) if limit is None else min(int(limit), len(dataset))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class BenchmarkDataModule(pl.LightningDataModule):
    """Test-split datamodule: builds the dataset (validating the files first), applies ``limit``.

    :param root: the dataset folder or any folder containing it (``data.root``).
    :param limit: evaluate only the first ``limit`` samples of the split (``data.limit``).
    :param num_workers: DataLoader workers.
    """

    def __init__(self, root: str, limit: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        if limit is not None and int(limit) < 1:
            raise ConfigError(f"data.limit must be a positive integer or null, got {limit!r}")
        self.root = root
        self.limit = limit
        self.num_workers = num_workers
        self._full: Dataset | None = None
        self.dataset: LimitedDataset | None = None

    def build_dataset(self) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self._full = self.build_dataset()
            if len(self._full) == 0:
                raise DatasetFormatError(
                    f"{type(self).__name__}: the split under {self.root!r} is empty"
                )
            self.dataset = LimitedDataset(self._full, self.limit)

    @property
    def split_size(self) -> int:
        """Samples in the split before ``limit``."""
        self.setup()
        return len(self._full)

    @property
    def dataset_name(self) -> str:
        self.setup()
        return self._full.name

    @property
    def category_names(self) -> list[str]:
        """Keypoint-pair benchmarks: the sorted categories of the whole split (before ``limit``),
        the same on every rank."""
        self.setup()
        return list(self._full.category_names)

    def test_dataloader(self) -> DataLoader:
        """Batch size 1, fixed order. Under torch.distributed each rank gets a disjoint share and no
        sample is repeated to even the shares out (unlike the DistributedSampler Lightning would
        insert: the Trainer must run with ``use_distributed_sampler=False``)."""
        self.setup()
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(
                self.dataset,
                num_replicas=torch.distributed.get_world_size(),
                rank=torch.distributed.get_rank(),
                shuffle=False,
            )
        return DataLoader(
            self.dataset,
            batch_size=1,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=unwrap_single,
        )


# ------------------------------------------------------------------ segmentation labels


# OVDiff's renames of dataset labels into words a text encoder knows (its ``mmdata.py``): the VOC
# renames, then its prompt overlay (on by default for support prompts, attribution tokens and the
# CLIP filter), of which only "keyboard" occurs in these label spaces.
PROMPT_RENAMES = {
    "aeroplane": "airplane",
    "diningtable": "table",
    "tvmonitor": "monitor",
    "pottedplant": "potted plant",
    "keyboard": "computer keyboard",
}
# COCO-Stuff tags catch-all and disambiguated labels ("sky-other", "desk-stuff"); the tag means
# nothing to a text encoder.
_LABEL_TAGS = ("-other", "-stuff")


def prompt_name(name: str) -> str:
    """The words used to prompt SD/CLIP for the dataset label ``name`` (official renames applied)."""
    name = PROMPT_RENAMES.get(name, name)
    for tag in _LABEL_TAGS:
        name = name.removesuffix(tag)
    return name.replace("-", " ")


def read_class_names(file_name: str) -> list[str]:
    """Class names shipped in ``datamodules/classnames/<file_name>``: line ``i`` names label value ``i``."""
    text = (resources.files("datamodules") / "classnames" / file_name).read_text()
    names = [line.strip() for line in text.splitlines()]
    if not names or any(not n for n in names):
        raise DatasetFormatError(f"class-name file {file_name!r} has an empty line or no names")
    return names


@dataclass(frozen=True)
class LabelSpace:
    """What the values of a benchmark's label maps mean.

    ``class_names[i]`` is the dataset's name of label value ``i``; ``ignore_index`` marks void pixels;
    ``background_index`` is the catch-all class (0) or ``None``; ``stuff`` holds the class indices
    treated as stuff (amorphous regions: never filtered out by the segmentation method's CLIP filter).
    """

    class_names: tuple[str, ...]
    ignore_index: int = 255
    background_index: int | None = None
    stuff: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        n = len(self.class_names)
        if len(set(self.class_names)) != n:
            raise ValueError(f"class names must be distinct, got {self.class_names}")
        if 0 <= self.ignore_index < n:
            raise ValueError(f"ignore_index {self.ignore_index} collides with a class index")
        indices = set(self.stuff) | ({self.background_index} - {None})
        if any(not 0 <= i < n for i in indices):
            raise ValueError(f"background/stuff indices {sorted(indices)} must lie in [0, {n})")

    @classmethod
    def with_background(cls, names: Sequence[str], stuff_names: Sequence[str] = ()) -> LabelSpace:
        """Class 0 is background and counts as stuff, together with the classes ``stuff_names``."""
        unknown = [s for s in stuff_names if s not in names]
        if unknown:
            raise ValueError(f"stuff classes {unknown} are not among the class names")
        stuff = frozenset({0, *(list(names).index(s) for s in stuff_names)})
        return cls(tuple(names), background_index=0, stuff=stuff)

    @property
    def prompt_names(self) -> tuple[str, ...]:
        return tuple(prompt_name(n) for n in self.class_names)

    def without_background(self) -> LabelSpace:
        """The space after :func:`reduce_zero_label`: class 0 dropped, the others shifted down by one."""
        if self.background_index != 0:
            raise ValueError("only a label space whose class 0 is background can drop it")
        stuff = frozenset(i - 1 for i in self.stuff if i != 0)
        return LabelSpace(self.class_names[1:], self.ignore_index, None, stuff)


def reduce_zero_label(label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """mmseg's ``reduce_zero_label`` on an ``(H, W)`` int64 map: 0 -> ignored, others - 1."""
    out = label - 1
    out[(label == 0) | (label == ignore_index)] = ignore_index
    return out


def check_files_exist(items: Sequence[SegmentationItem], source: str | Path) -> None:
    """Raise :class:`DatasetFormatError` naming up to 3 image/label files of ``items`` that are missing.

    :param source: where the items were listed (the split file or image folder), for the message.
    """
    missing = [str(p) for it in items for p in (it.image_path, it.label_path) if not p.is_file()]
    if missing:
        raise DatasetFormatError(
            f"{len(missing)} file(s) for the samples listed by {str(source)!r} do not exist, "
            f"e.g. {missing[:3]}"
        )


class LabeledSegmentationDataset(SegmentationDataset):
    """A :class:`SegmentationDataset` described by a :class:`LabelSpace`.

    Every label map returned is checked to hold only class indices and ``ignore_index``: a stray
    value would otherwise corrupt the IoU silently.
    """

    def __init__(self, root: str | Path, labels: LabelSpace) -> None:
        self.labels = labels
        self.class_names = list(labels.class_names)
        self.ignore_index = labels.ignore_index
        super().__init__(root)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        label = sample["label"]
        n = len(self.class_names)
        bad = (label < 0) | ((label >= n) & (label != self.ignore_index))
        if bool(bad.any()):
            raise DatasetFormatError(
                f"label {str(self.items[index].label_path)!r} holds values "
                f"{label[bad].unique().tolist()[:10]} (after {self.name}'s label conversion); "
                f"expected class indices 0..{n - 1} or {self.ignore_index} (ignored)"
            )
        return sample


class SegmentationDataModule(BenchmarkDataModule):
    """Base of the segmentation datamodules: the label space is known from the arguments alone.

    Subclasses implement :attr:`labels` and :meth:`build_dataset`.
    """

    @property
    def labels(self) -> LabelSpace:
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        """The dataset's label names; index = label value."""
        return list(self.labels.class_names)

    @property
    def prompt_names(self) -> list[str]:
        """The names used to prompt SD/CLIP, parallel to :attr:`class_names`."""
        return list(self.labels.prompt_names)

    @property
    def ignore_index(self) -> int:
        return self.labels.ignore_index

    @property
    def background_index(self) -> int | None:
        return self.labels.background_index

    @property
    def stuff(self) -> set[int]:
        """Class indices treated as stuff (background included)."""
        return set(self.labels.stuff)
