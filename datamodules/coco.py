"""COCO-Stuff-164k val2017 (5,000 images) as COCO-Stuff-171 and as COCO-Object-81.

Layout (the official images + ``stuffthingmaps_trainval2017.zip``, as mmsegmentation expects)::

    coco_stuff164k/
        images/val2017/<id>.jpg
        annotations/val2017/<id>.png     stuffthingmap: value = COCO label id - 1 (0..181), 255 = unlabeled

The split is every ``*.jpg`` in ``images/val2017``, sorted by name. Raw maps are converted on the fly
with a 256-entry lookup table equal to the official converters:

* COCO-Stuff-171 (mmseg ``coco_stuff164k.py``): the 171 used raw ids -> 0..170 in raw order,
  everything else (unlabeled, removed ids) -> 255, ignored.
* COCO-Object-81 (TCL/GroupViT ``convert_coco_object.py``): the Stuff-171 trainId + 1 for things, and
  0 = background for every raw value > 90 (all stuff and unlabeled) and for removed thing ids.

If every image of the split also has the converters' output beside its raw map
(``<id>_labelTrainIds.png`` for Stuff, ``<id>_instanceTrainIds.png`` for Object), those files are read
as they are instead; otherwise the raw maps are used for all images, so a run never mixes sources.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from datamodules.base import (
    LabeledSegmentationDataset,
    SegmentationDataModule,
    SegmentationItem,
    check_files_exist,
)
from datamodules.files import find_dataset_root
from datamodules.labels import LabelSpace, read_class_names

COCO_LAYOUT = """\
coco_stuff164k/
    images/val2017/<id>.jpg                          5,000 images
    annotations/val2017/<id>.png                     raw stuffthingmaps (0..181, 255 = unlabeled)
    annotations/val2017/<id>_labelTrainIds.png       optional: mmseg's COCO-Stuff-171 conversion
    annotations/val2017/<id>_instanceTrainIds.png    optional: TCL's COCO-Object conversion"""

# Raw values (label id - 1) of the 11 ids COCO removed (labels.txt ids 12, 26, 29, 30, 45, 66, 68,
# 69, 71, 83, 91); they never occur in the maps and get no trainId.
UNUSED_RAW_IDS = frozenset({11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90})
LAST_THING_RAW_ID = 90  # raw 0..90 are things, 91..181 stuff
NUM_RAW_IDS = 182
USED_RAW_IDS = tuple(v for v in range(NUM_RAW_IDS) if v not in UNUSED_RAW_IDS)
NUM_THINGS = sum(v <= LAST_THING_RAW_ID for v in USED_RAW_IDS)


def stuff_lookup() -> torch.Tensor:
    """``(256,)`` int64 table: raw stuffthingmap value -> COCO-Stuff-171 trainId (255 = ignored)."""
    table = torch.full((256,), 255, dtype=torch.int64)
    table[list(USED_RAW_IDS)] = torch.arange(len(USED_RAW_IDS))
    return table


def object_lookup() -> torch.Tensor:
    """``(256,)`` int64 table: raw value -> COCO-Object-81 index (0 = background).

    The official converter adds 1 to the Stuff table in uint8, so its 255s wrap to 0 (background).
    """
    table = (stuff_lookup() + 1) % 256
    table[LAST_THING_RAW_ID + 1 :] = 0
    return table


@cache
def coco_stuff_labels() -> LabelSpace:
    """COCO-Stuff-171 in trainId order (80 things, then 91 stuff classes, which are the stuff)."""
    names = read_class_names("coco_stuff.txt")
    return LabelSpace(tuple(names), stuff=frozenset(range(NUM_THINGS, len(names))))


@cache
def coco_object_labels() -> LabelSpace:
    """COCO-Object-81: background, then the 80 things in trainId order."""
    things = coco_stuff_labels().class_names[:NUM_THINGS]
    space = LabelSpace.with_background(["background", *things])
    return space.with_synonyms("coco_object.synonyms.txt")  # SCLIP's person synonyms


class COCOStuffDataset(LabeledSegmentationDataset):
    """COCO-Stuff-171 on val2017; ``convert_label`` applies :func:`stuff_lookup` to raw maps."""

    name = "coco-stuff"
    converted_suffix = "_labelTrainIds.png"

    def __init__(self, root: str | Path) -> None:
        self.lookup = self.raw_lookup()
        self.pre_converted = False
        super().__init__(root, self.label_space())

    @classmethod
    def label_space(cls) -> LabelSpace:
        return coco_stuff_labels()

    @staticmethod
    def raw_lookup() -> torch.Tensor:
        return stuff_lookup()

    def convert_label(self, raw: torch.Tensor) -> torch.Tensor:
        return raw if self.pre_converted else self.lookup[raw]

    def _load_items(self) -> list[SegmentationItem]:
        markers = ["images/val2017", "annotations/val2017"]
        top = find_dataset_root(self.root, markers, COCO_LAYOUT, self.name)
        image_dir, label_dir = top / "images" / "val2017", top / "annotations" / "val2017"
        images = sorted(image_dir.glob("*.jpg"))
        converted = [label_dir / f"{p.stem}{self.converted_suffix}" for p in images]
        self.pre_converted = bool(images) and all(p.is_file() for p in converted)
        labels = converted if self.pre_converted else [label_dir / f"{p.stem}.png" for p in images]
        items = [
            SegmentationItem(img.stem, img, label)
            for img, label in zip(images, labels, strict=True)
        ]
        check_files_exist(items, image_dir)
        return items


class COCOObjectDataset(COCOStuffDataset):
    """COCO-Object-81 on val2017; ``convert_label`` applies :func:`object_lookup` to raw maps."""

    name = "coco-object"
    converted_suffix = "_instanceTrainIds.png"

    @classmethod
    def label_space(cls) -> LabelSpace:
        return coco_object_labels()

    @staticmethod
    def raw_lookup() -> torch.Tensor:
        return object_lookup()


class COCOStuffDataModule(SegmentationDataModule):
    """COCO-Stuff-171 val2017 (no background class; 255 ignored).

    :param root: ``coco_stuff164k`` or a folder up to two levels above it.
    """

    dataset_class: type[COCOStuffDataset] = COCOStuffDataset

    @property
    def labels(self) -> LabelSpace:
        return self.dataset_class.label_space()

    def build_dataset(self) -> COCOStuffDataset:
        return self.dataset_class(self.root)


class COCOObjectDataModule(COCOStuffDataModule):
    """COCO-Object-81 val2017 (background + 80 things; no pixel is ignored).

    :param root: ``coco_stuff164k`` or a folder up to two levels above it.
    """

    dataset_class = COCOObjectDataset
