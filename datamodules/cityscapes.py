"""Cityscapes, val split (500 images of Frankfurt, Lindau and Münster), 19 classes.

Layout (the official ``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``)::

    cityscapes/
        leftImg8bit/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   train ids 0..18, 255 void
        gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png        the archive's label ids

The split is every ``*_leftImg8bit.png`` under ``leftImg8bit/val``, sorted by path. mmseg reads the
``labelTrainIds`` maps that cityscapesScripts' ``createTrainIdLabelImgs`` (or mmseg's converter)
writes. ``data.label_files``: ``train_ids`` reads those, ``label_ids`` converts the archive's
``labelIds`` maps with the official table below, ``auto`` (default) reads train ids when every image
has them and otherwise converts label ids for all images, saying so in the log (never silently, and
never a mix within one run). No background class; 255 is ignored.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

from datamodules.base import SegmentationDataModule, SegmentationItem, check_files_exist
from datamodules.files import DatasetFormatError, find_dataset_root
from datamodules.label_tables import TableLabelDataset, lookup_table
from datamodules.labels import LabelSpace, read_class_names
from sdzero.errors import ConfigError

log = logging.getLogger(__name__)

CITYSCAPES_LAYOUT = """\
cityscapes/
    leftImg8bit/val/<city>/<stem>_leftImg8bit.png            500 images
    gtFine/val/<city>/<stem>_gtFine_labelTrainIds.png        train ids 0..18, 255 = void
    gtFine/val/<city>/<stem>_gtFine_labelIds.png             or the official label ids 0..33"""
IMAGE_SUFFIX = "_leftImg8bit.png"
SUFFIXES = {"train_ids": "_gtFine_labelTrainIds.png", "label_ids": "_gtFine_labelIds.png"}
LABEL_FILES = ("auto", *SUFFIXES)

# The official id -> trainId table (cityscapesScripts, cityscapesscripts/helpers/labels.py): every
# label id a gtFine labelIds PNG holds (0..33). 255 = ignored in evaluation. 'license plate' (id -1)
# is never drawn into the PNGs.
LABEL_ID_TO_TRAIN_ID = {
    0: 255,  # unlabeled
    1: 255,  # ego vehicle
    2: 255,  # rectification border
    3: 255,  # out of roi
    4: 255,  # static
    5: 255,  # dynamic
    6: 255,  # ground
    7: 0,  # road
    8: 1,  # sidewalk
    9: 255,  # parking
    10: 255,  # rail track
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    14: 255,  # guard rail
    15: 255,  # bridge
    16: 255,  # tunnel
    17: 5,  # pole
    18: 255,  # polegroup
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    29: 255,  # caravan
    30: 255,  # trailer
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}
NUM_CLASSES = 19
# Stuff: the 11 classes without instances (Cityscapes panoptic's stuff; the 8 others are things).
CITYSCAPES_STUFF = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
)


@cache
def cityscapes_labels() -> LabelSpace:
    """The 19 evaluated classes in train-id order."""
    names = read_class_names("cityscapes.txt")
    return LabelSpace(tuple(names), stuff=frozenset(names.index(s) for s in CITYSCAPES_STUFF))


def check_label_files(label_files: str) -> str:
    if label_files not in LABEL_FILES:
        raise ConfigError(
            f"data.label_files must be one of {list(LABEL_FILES)}, got {label_files!r}"
        )
    return label_files


def choose_label_files(images: list[Path], label_dir: Path, label_files: str) -> str:
    """``train_ids`` or ``label_ids``: the label files of ``images`` to read (see module doc)."""
    if check_label_files(label_files) != "auto":
        return label_files
    for kind in SUFFIXES:
        if images and all(_label_path(p, label_dir, kind).is_file() for p in images):
            if kind == "label_ids":
                log.warning(
                    "cityscapes: not every image has a *%s under %s; converting the *%s maps "
                    "with the official id -> trainId table instead (data.label_files=label_ids)",
                    SUFFIXES["train_ids"],
                    label_dir,
                    SUFFIXES["label_ids"],
                )
            return kind
    return "train_ids"  # neither complete: check_files_exist names the missing train-id maps


def _label_path(image: Path, label_dir: Path, kind: str) -> Path:
    stem = image.name.removesuffix(IMAGE_SUFFIX)
    return label_dir / image.parent.name / f"{stem}{SUFFIXES[kind]}"


class CityscapesDataset(TableLabelDataset):
    """Cityscapes val in the official layout, train-id labels read or converted from label ids."""

    name = "cityscapes"

    def __init__(self, root: str, label_files: str = "auto") -> None:
        self.label_files = label_files
        super().__init__(root, cityscapes_labels())

    def _load_items(self) -> list[SegmentationItem]:
        top = find_dataset_root(
            self.root, ["leftImg8bit/val", "gtFine/val"], CITYSCAPES_LAYOUT, self.name
        )
        image_dir, label_dir = top / "leftImg8bit" / "val", top / "gtFine" / "val"
        images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise DatasetFormatError(
                f"cityscapes: no <city>/*{IMAGE_SUFFIX} under {str(image_dir)!r}; expected:\n"
                f"{CITYSCAPES_LAYOUT}"
            )
        kind = choose_label_files(images, label_dir, self.label_files)
        if kind == "label_ids":
            self.table = lookup_table(LABEL_ID_TO_TRAIN_ID)
            self.raw_format = "official label ids 0..33"
        else:
            self.table = lookup_table({**{v: v for v in range(NUM_CLASSES)}, 255: 255})
            self.raw_format = f"train ids 0..{NUM_CLASSES - 1} or 255 (void)"
        items = [
            SegmentationItem(p.name.removesuffix(IMAGE_SUFFIX), p, _label_path(p, label_dir, kind))
            for p in images
        ]
        check_files_exist(items, image_dir)
        return items


class CityscapesDataModule(SegmentationDataModule):
    """Cityscapes-19 val (no background class; 255 ignored).

    :param root: the folder holding ``leftImg8bit/`` and ``gtFine/``, or up to two levels above it.
    :param label_files: ``auto`` | ``train_ids`` | ``label_ids`` (see the module docstring).
    """

    def __init__(
        self,
        root: str,
        label_files: str = "auto",
        limit: int | None = None,
        num_workers: int = 0,
        on_bad_sample: str = "error",
    ) -> None:
        super().__init__(root, limit, num_workers, on_bad_sample=on_bad_sample)
        self.label_files = check_label_files(label_files)

    @property
    def labels(self) -> LabelSpace:
        return cityscapes_labels()

    def build_dataset(self) -> CityscapesDataset:
        return CityscapesDataset(self.root, self.label_files)
