"""PASCAL VOC 2012 segmentation, val split (1,449 images), and what every segmentation benchmark shares.

Layout (the unpacked official VOCtrainval archive, as mmsegmentation reads it)::

    VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png          palette PNG: palette index = class 0..20, 255 = void
        ImageSets/Segmentation/val.txt      one <id> a line

Two benchmarks: VOC21 (``background=True``: 21 classes, class 0 = background) and VOC20
(``background=False``: mmseg's ``reduce_zero_label``, background becomes ignored, the others shift down).

Shared with the other segmentation benchmarks: :class:`LabelSpace` (what label values mean, how each
class is prompted), :class:`LabeledSegmentationDataset` (checks every label map against it) and
:class:`SegmentationDataModule` (exposes the label space without reading any data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from datamodules.base import (
    BenchmarkDataModule,
    DatasetFormatError,
    SegmentationDataset,
    SegmentationItem,
    find_dataset_root,
)

# OVDiff's renames of dataset labels into words a text encoder knows (its ``mmdata.py``).
PROMPT_RENAMES = {
    "aeroplane": "airplane",
    "diningtable": "table",
    "tvmonitor": "monitor",
    "pottedplant": "potted plant",
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


def find_year_folder(
    root: str | Path, year_dir: str, markers: Sequence[str], layout: str, name: str
) -> Path:
    """The VOC year folder (``year_dir``, e.g. ``VOC2012``) holding every marker path.

    ``root`` may be that folder, ``VOCdevkit`` or up to two levels above it. The year is part of the
    search because VOC2010 and VOC2012 both hold ``JPEGImages`` and ``SegmentationClass``.
    """
    root = Path(root).expanduser()
    if all((root / m).exists() for m in markers):
        return root
    markers = [f"{year_dir}/{m}" for m in markers]
    return find_dataset_root(root, markers, layout, name) / year_dir


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


VOC_LAYOUT = """\
VOCdevkit/VOC2012/
    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png          palette PNG: index = class 0..20, 255 = void
    ImageSets/Segmentation/val.txt      one <id> a line (1,449 ids)"""


@cache
def voc_labels() -> LabelSpace:
    """VOC's 21 classes; background (0) is the only stuff."""
    return LabelSpace.with_background(read_class_names("voc.txt"))


class VOCDataset(LabeledSegmentationDataset):
    """A val split in the VOC layout: ``<year>/JPEGImages/<id>.jpg`` + one label PNG per listed id.

    :param root: the year folder, ``VOCdevkit``, or a folder up to two levels above ``VOCdevkit``.
    :param background: keep class 0 (VOC21) or drop it with :func:`reduce_zero_label` (VOC20).
    :param labels: the label space with background; by default VOC's (:meth:`default_labels`), another
        for datasets written in the VOC layout with their own classes (the synthetic one).
    """

    year_dir = "VOC2012"
    label_dir = "SegmentationClass"
    split_file = "ImageSets/Segmentation/val.txt"
    layout = VOC_LAYOUT
    names = ("voc2012", "voc2012-20")  # dataset name with / without background

    def __init__(
        self, root: str | Path, background: bool = True, labels: LabelSpace | None = None
    ) -> None:
        self.reduce_zero_label = not background
        self.name = self.names[0] if background else self.names[1]
        super().__init__(root, self.label_space(background, labels))

    @classmethod
    def default_labels(cls) -> LabelSpace:
        return voc_labels()

    @classmethod
    def label_space(cls, background: bool = True, labels: LabelSpace | None = None) -> LabelSpace:
        """The label space the dataset's maps use, known without reading any file."""
        full = cls.default_labels() if labels is None else labels
        return full if background else full.without_background()

    def convert_label(self, raw: torch.Tensor) -> torch.Tensor:
        return reduce_zero_label(raw, self.ignore_index) if self.reduce_zero_label else raw

    def _load_items(self) -> list[SegmentationItem]:
        markers = ["JPEGImages", self.label_dir, self.split_file]
        top = find_year_folder(self.root, self.year_dir, markers, self.layout, self.name)
        split = top / self.split_file
        items = []
        for lineno, line in enumerate(split.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 1:
                raise DatasetFormatError(
                    f"{str(split)!r} line {lineno}: expected one image id, got {line.strip()!r}"
                )
            image_id = fields[0]
            items.append(
                SegmentationItem(
                    image_id,
                    top / "JPEGImages" / f"{image_id}.jpg",
                    top / self.label_dir / f"{image_id}.png",
                )
            )
        check_files_exist(items, split)
        return items


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


class VOCDataModule(SegmentationDataModule):
    """PASCAL VOC 2012 val: VOC21 (``background=True``) or VOC20 (``background=False``).

    :param root: ``VOCdevkit/VOC2012``, ``VOCdevkit`` or a folder up to two levels above it.
    :param background: keep class 0 (21 classes) or ignore it and shift the others down (20).
    """

    dataset_class: type[VOCDataset] = VOCDataset

    def __init__(
        self,
        root: str,
        background: bool = True,
        limit: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(root, limit, num_workers)
        self.background = background

    @property
    def labels(self) -> LabelSpace:
        return self.dataset_class.label_space(self.background)

    def build_dataset(self) -> VOCDataset:
        return self.dataset_class(self.root, self.background)
