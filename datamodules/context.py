"""Pascal Context, val split (5,105 VOC2010 images), as prepared by mmsegmentation.

Layout (mmseg's ``tools/dataset_converters/pascal_context.py`` output inside VOC2010)::

    VOCdevkit/VOC2010/
        JPEGImages/<id>.jpg
        SegmentationClassContext/<id>.png        value = class 0..59 (0 = background)
        ImageSets/SegmentationContext/val.txt    one <id> a line

Two benchmarks: Context60 (``background=True``, the default) and Context59 (``background=False``:
``reduce_zero_label``, background ignored).
"""

from __future__ import annotations

from functools import cache

from datamodules.labels import LabelSpace, read_class_names
from datamodules.voc import VOCDataModule, VOCDataset

CONTEXT_LAYOUT = """\
VOCdevkit/VOC2010/
    JPEGImages/<id>.jpg
    SegmentationClassContext/<id>.png        mmseg-converted labels: value = class 0..59, 0 = background
    ImageSets/SegmentationContext/val.txt    one <id> a line (5,105 ids)"""

# Context classes treated as stuff: those the official OVDiff code's hard-coded stuff table
# (``mmdata.IS_STUFF``) marks as stuff among the Context-60 names. Building and tree are things
# there; bedclothes and cloth are stuff.
CONTEXT_STUFF = (
    "bedclothes",
    "ceiling",
    "cloth",
    "curtain",
    "fence",
    "floor",
    "grass",
    "ground",
    "mountain",
    "platform",
    "road",
    "rock",
    "sidewalk",
    "sky",
    "snow",
    "track",
    "wall",
    "water",
    "wood",
)


@cache
def context_labels() -> LabelSpace:
    """Context60's classes in mmseg's order; background and :data:`CONTEXT_STUFF` are stuff."""
    return LabelSpace.with_background(read_class_names("context.txt"), CONTEXT_STUFF)


class ContextDataset(VOCDataset):
    """Pascal Context val in mmseg's layout; ``background=False`` gives Context59."""

    year_dir = "VOC2010"
    label_dir = "SegmentationClassContext"
    split_file = "ImageSets/SegmentationContext/val.txt"
    layout = CONTEXT_LAYOUT
    names = ("context60", "context59")

    @classmethod
    def default_labels(cls) -> LabelSpace:
        return context_labels()


class ContextDataModule(VOCDataModule):
    """Pascal Context val: Context60 (``background=True``) or Context59 (``background=False``).

    :param root: ``VOCdevkit/VOC2010``, ``VOCdevkit`` or a folder up to two levels above it.
    :param background: keep class 0 (Context60) or ignore it and shift the others down (Context59).
    """

    dataset_class = ContextDataset
