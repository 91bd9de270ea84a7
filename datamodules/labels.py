"""What segmentation label values mean: class names shipped with the package, the prompt words
used for them, and :class:`LabelSpace` (background, ignored and stuff classes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources

import torch

from datamodules.files import DatasetFormatError

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


def _classnames_text(file_name: str) -> str:
    return (resources.files("datamodules") / "classnames" / file_name).read_text()


def read_class_names(file_name: str) -> list[str]:
    """Class names shipped in ``datamodules/classnames/<file_name>``: line ``i`` names label value ``i``."""
    names = [line.strip() for line in _classnames_text(file_name).splitlines()]
    if not names or any(not n for n in names):
        raise DatasetFormatError(f"class-name file {file_name!r} has an empty line or no names")
    return names


def read_synonyms(file_name: str, class_names: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Extra prompt names per class from ``datamodules/classnames/<file_name>``: lines
    ``<dataset class name>: <name>, <name>, ...`` (``#`` starts a comment); classes not listed
    get none. Parallel to ``class_names``."""
    extra: dict[str, tuple[str, ...]] = {}
    for lineno, line in enumerate(_classnames_text(file_name).splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, words = line.partition(":")
        synonyms = tuple(w.strip() for w in words.split(","))
        if not sep or name.strip() not in class_names or not all(synonyms):
            raise DatasetFormatError(
                f"synonym file {file_name!r} line {lineno}: expected '<class>: <name>, ...' with "
                f"a class among the label space's names, got {line!r}"
            )
        extra[name.strip()] = synonyms
    return tuple(extra.get(n, ()) for n in class_names)


@dataclass(frozen=True)
class LabelSpace:
    """What the values of a benchmark's label maps mean.

    ``class_names[i]`` is the dataset's name of label value ``i``; ``ignore_index`` marks void pixels;
    ``background_index`` is the catch-all class (0) or ``None``; ``stuff`` holds the class indices
    treated as stuff (amorphous regions: never filtered out by the segmentation method's CLIP filter);
    ``synonyms[i]`` the extra prompt names of class ``i`` (empty: none for any class).
    """

    class_names: tuple[str, ...]
    ignore_index: int = 255
    background_index: int | None = None
    stuff: frozenset[int] = frozenset()
    synonyms: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        n = len(self.class_names)
        if len(set(self.class_names)) != n:
            raise ValueError(f"class names must be distinct, got {self.class_names}")
        if 0 <= self.ignore_index < n:
            raise ValueError(f"ignore_index {self.ignore_index} collides with a class index")
        indices = set(self.stuff) | ({self.background_index} - {None})
        if any(not 0 <= i < n for i in indices):
            raise ValueError(f"background/stuff indices {sorted(indices)} must lie in [0, {n})")
        if self.synonyms and len(self.synonyms) != n:
            raise ValueError(f"synonyms must list {n} classes, got {len(self.synonyms)}")

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

    @property
    def prompt_synonyms(self) -> tuple[tuple[str, ...], ...]:
        """Per class its prompt names: :attr:`prompt_names`'s first, then its synonyms (distinct)."""
        extra = self.synonyms or ((),) * len(self.class_names)
        return tuple(
            tuple(dict.fromkeys((first, *more)))
            for first, more in zip(self.prompt_names, extra, strict=True)
        )

    def with_synonyms(self, file_name: str) -> LabelSpace:
        """This space with the synonyms of :func:`read_synonyms` ``(file_name)``."""
        return replace(self, synonyms=read_synonyms(file_name, self.class_names))

    def without_background(self) -> LabelSpace:
        """The space after :func:`reduce_zero_label`: class 0 dropped, the others shifted down by one."""
        if self.background_index != 0:
            raise ValueError("only a label space whose class 0 is background can drop it")
        stuff = frozenset(i - 1 for i in self.stuff if i != 0)
        return LabelSpace(self.class_names[1:], self.ignore_index, None, stuff, self.synonyms[1:])


def reduce_zero_label(label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """mmseg's ``reduce_zero_label`` on an ``(H, W)`` int64 map: 0 -> ignored, others - 1."""
    out = label - 1
    out[(label == 0) | (label == ignore_index)] = ignore_index
    return out
