"""PASCAL VOC 2012 segmentation, val split (1,449 images), and what every segmentation benchmark shares.

Layout (the unpacked official VOCtrainval archive, as mmsegmentation reads it)::

    VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png          palette PNG: palette index = class 0..20, 255 = void
        ImageSets/Segmentation/val.txt      one <id> a line

Two benchmarks: VOC21 (``background=True``: 21 classes, class 0 = background) and VOC20
(``background=False``: mmseg's ``reduce_zero_label``, background becomes ignored, the others shift down).

The label-space machinery every segmentation benchmark shares (:class:`~datamodules.base.LabelSpace`,
:class:`~datamodules.base.LabeledSegmentationDataset`, :class:`~datamodules.base.SegmentationDataModule`)
lives in :mod:`datamodules.base`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch

from datamodules.base import (
    LabeledSegmentationDataset,
    SegmentationDataModule,
    SegmentationItem,
    check_files_exist,
)
from datamodules.files import DatasetFormatError, find_dataset_root
from datamodules.labels import LabelSpace, read_class_names, reduce_zero_label


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


VOC_LAYOUT = """\
VOCdevkit/VOC2012/
    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png          palette PNG: index = class 0..20, 255 = void
    ImageSets/Segmentation/val.txt      one <id> a line (1,449 ids)"""


@cache
def voc_labels() -> LabelSpace:
    """VOC's 21 classes; background (0) is the only stuff. Synonyms: SCLIP's (``voc.synonyms.txt``)."""
    return LabelSpace.with_background(read_class_names("voc.txt")).with_synonyms("voc.synonyms.txt")


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
        on_bad_sample: str = "error",
    ) -> None:
        super().__init__(root, limit, num_workers, on_bad_sample=on_bad_sample)
        self.background = background

    @property
    def labels(self) -> LabelSpace:
        return self.dataset_class.label_space(self.background)

    def build_dataset(self) -> VOCDataset:
        return self.dataset_class(self.root, self.background)
