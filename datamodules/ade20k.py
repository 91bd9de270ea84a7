"""ADE20K (SceneParsing, ADEChallengeData2016), validation split (2,000 images), 150 classes.

Layout (the unpacked official ``ADEChallengeData2016.zip``, as mmsegmentation reads it)::

    ADEChallengeData2016/
        images/validation/ADE_val_<8 digits>.jpg
        annotations/validation/ADE_val_<8 digits>.png   grey PNG: 0 = other (not a class), 1..150

The split is every ``*.jpg`` in ``images/validation``, sorted by name. Labels go through mmseg's
``reduce_zero_label`` (fixed for ADE20K there): 0 becomes 255 (ignored), 1..150 become 0..149, so
the benchmark has no background class. Class names are mmseg's ``ADE20KDataset`` classes
(``classnames/ade20k.txt``); raw values above 150 are a format error.

Stuff: the 50 classes the ADE20K panoptic split marks as not things (``isthing: 0`` in the
ADE20K-150 category table of MaskFormer / Mask2Former). The official OVDiff code's own ADE stuff
table (``mmdata.IS_STUFF``) is not public in full, so this is the project's choice, not OVDiff's.
"""

from __future__ import annotations

from functools import cache

from datamodules.base import SegmentationDataModule, SegmentationItem, check_files_exist
from datamodules.files import find_dataset_root
from datamodules.label_tables import TableLabelDataset, lookup_table
from datamodules.labels import LabelSpace, read_class_names

ADE_LAYOUT = """\
ADEChallengeData2016/
    images/validation/ADE_val_<n>.jpg          2,000 images
    annotations/validation/ADE_val_<n>.png     grey PNG: 0 = other (ignored), 1..150 = classes"""
NUM_CLASSES = 150
ADE_STUFF = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "grass",
    "sidewalk",
    "earth",
    "mountain",
    "plant",
    "water",
    "house",
    "sea",
    "rug",
    "field",
    "rock",
    "base",
    "sand",
    "skyscraper",
    "grandstand",
    "path",
    "runway",
    "stairway",
    "river",
    "bridge",
    "blind",
    "hill",
    "bar",
    "hovel",
    "tower",
    "dirt track",
    "land",
    "escalator",
    "buffet",
    "poster",
    "stage",
    "conveyer belt",
    "canopy",
    "swimming pool",
    "waterfall",
    "tent",
    "cradle",
    "tank",
    "lake",
    "blanket",
    "pier",
    "crt screen",
    "shower",
)


@cache
def ade20k_labels() -> LabelSpace:
    """The 150 classes in mmseg's order (label value ``i`` = raw value ``i + 1``)."""
    names = read_class_names("ade20k.txt")
    return LabelSpace(tuple(names), stuff=frozenset(names.index(s) for s in ADE_STUFF))


class ADE20KDataset(TableLabelDataset):
    """ADE20K validation in the official layout; raw 0 -> 255, raw ``v`` -> ``v - 1``."""

    name = "ade20k"
    raw_format = "0 (other, ignored) or 1..150 (classes)"

    def __init__(self, root: str) -> None:
        self.table = lookup_table({0: 255, **{v: v - 1 for v in range(1, NUM_CLASSES + 1)}})
        super().__init__(root, ade20k_labels())

    def _load_items(self) -> list[SegmentationItem]:
        markers = ["images/validation", "annotations/validation"]
        top = find_dataset_root(self.root, markers, ADE_LAYOUT, self.name)
        image_dir, label_dir = top / "images" / "validation", top / "annotations" / "validation"
        items = [
            SegmentationItem(p.stem, p, label_dir / f"{p.stem}.png")
            for p in sorted(image_dir.glob("*.jpg"))
        ]
        check_files_exist(items, image_dir)
        return items


class ADE20KDataModule(SegmentationDataModule):
    """ADE20K-150 validation (no background class; label 0 ignored).

    :param root: ``ADEChallengeData2016`` or a folder up to two levels above it.
    """

    @property
    def labels(self) -> LabelSpace:
        return ade20k_labels()

    def build_dataset(self) -> ADE20KDataset:
        return ADE20KDataset(self.root)
