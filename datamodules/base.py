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

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.files import DatasetFormatError, load_label, load_rgb
from datamodules.labels import LabelSpace
from datamodules.sharding import Padded, ShardSampler
from sdzero.errors import ConfigError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class KeypointPair:
    """One annotated pair; coordinates are ``(x, y)`` pixels of the ORIGINAL image files.

    ``src_kps``/``trg_kps``: ``(N, 2)`` float arrays of corresponding points (only those annotated in
    both images). ``*_bbox``: ``[x1, y1, x2, y2]`` object box, or ``None`` where the dataset has none.
    ``extra``: the dataset's other per-pair annotations as JSON values (SPair-71k: ``kps_ids``,
    ``mirror`` and the difficulty levels), empty where it has none.
    """

    id: str
    category: str
    src_path: Path
    trg_path: Path
    src_kps: np.ndarray
    trg_kps: np.ndarray
    src_bbox: np.ndarray | None = None
    trg_bbox: np.ndarray | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class KeypointPairDataset(Dataset):
    """Base of the correspondence benchmarks. Subclasses implement :meth:`_load_pairs`.

    ``__getitem__`` returns ``{"index", "id", "category", "src_name", "trg_name" (the image files'
    paths relative to ``root``: they name the images, e.g. for feature caches), "src_img",
    "trg_img" ((3, H, W) uint8),
    "src_kps", "trg_kps" ((N, 2) float32, x/y in original pixels), "src_bbox", "trg_bbox" ((4,) float32
    x1 y1 x2 y2, NaN when absent), "src_size", "trg_size" ((w, h)), "extra" (the pair's other
    annotations, a dict of JSON values, see :class:`KeypointPair`)}``.
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

    def image_name(self, path: Path) -> str:
        """An image file's path relative to ``root`` (the full path if it lies elsewhere)."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def sample_id(self, index: int) -> str:
        """The id of sample ``index`` (read from the annotations, no image decoded)."""
        return self.pairs[index].id

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        src, trg = load_rgb(pair.src_path), load_rgb(pair.trg_path)
        nan_box = np.full(4, np.nan, dtype=np.float32)
        return {
            "index": index,
            "id": pair.id,
            "category": pair.category,
            "src_name": self.image_name(pair.src_path),
            "trg_name": self.image_name(pair.trg_path),
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
            "extra": dict(pair.extra),
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

    def sample_id(self, index: int) -> str:
        """The id of sample ``index`` (no file read)."""
        return self.items[index].id

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


ON_BAD_SAMPLE = ("error", "skip")


class BadSampleGuard(Dataset):
    """``dataset`` (indices unchanged) with ``data.on_bad_sample`` applied to its unreadable
    samples (a :class:`DatasetFormatError` while indexing: a corrupt or truncated image, a label
    value out of range): ``skip`` gives ``{"index", "id", "skipped": the error's message}``
    instead (the run records the skip and ``metrics.json`` counts it); ``error`` re-raises the
    error, naming the key that would skip it."""

    def __init__(self, dataset: Dataset, skip: bool) -> None:
        self.dataset = dataset
        self.skip = skip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self.dataset[index]
        except DatasetFormatError as err:
            if not self.skip:
                raise DatasetFormatError(
                    f"{err} (data.on_bad_sample=skip records such samples as skipped instead)"
                ) from err
            sample_id = getattr(self.dataset, "sample_id", str)(index)
            log.warning(
                "data.on_bad_sample=skip: sample %d (%s) skipped: %s", index, sample_id, err
            )
            return {"index": index, "id": str(sample_id), "skipped": str(err)}


class BenchmarkDataModule(pl.LightningDataModule):
    """Test-split datamodule: builds the dataset (validating the files first), applies ``limit``.

    :param root: the dataset folder or any folder containing it (``data.root``).
    :param limit: evaluate only the first ``limit`` samples of the split (``data.limit``).
    :param num_workers: DataLoader workers.
    :param on_bad_sample: a sample whose files cannot be read: ``error`` (the run stops with a
        message naming the file) or ``skip`` (recorded as skipped, counted in ``metrics.json``).
    """

    def __init__(
        self,
        root: str,
        limit: int | None = None,
        num_workers: int = 0,
        on_bad_sample: str = "error",
    ) -> None:
        super().__init__()
        if limit is not None and int(limit) < 1:
            raise ConfigError(f"data.limit must be a positive integer or null, got {limit!r}")
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ConfigError(
                f"data.on_bad_sample must be one of {list(ON_BAD_SAMPLE)}, got {on_bad_sample!r}"
            )
        self.root = root
        self.limit = limit
        self.num_workers = num_workers
        self.on_bad_sample = on_bad_sample
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
        insert: the Trainer must run with ``use_distributed_sampler=False``); a rank left without
        samples gets one padding sample (:mod:`datamodules.sharding`)."""
        self.setup()
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return DataLoader(
            Padded(BadSampleGuard(self.dataset, skip=self.on_bad_sample == "skip")),
            batch_size=1,
            sampler=ShardSampler(len(self.dataset), rank, world),
            num_workers=self.num_workers,
            collate_fn=unwrap_single,
        )


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
