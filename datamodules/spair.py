"""SPair-71k (Min et al. 2019) read from its official on-disk layout.

Pairs come from ``Layout/large/<split>.txt`` in file order (the order every official loader uses);
each name ``<pair>:<category>`` has its annotation in ``PairAnnotation/<split>/<name>.json``.
Keypoints are kept exactly as annotated, including those on the image border; they are ``(x, y)``
pixels of the original JPEGs. The pair's other annotations go into the sample's ``extra``:
``kps_ids`` (each keypoint's slot in its category, as integers), ``mirror`` and the difficulty
levels ``viewpoint_variation``, ``scale_variation`` (0-2: easy, medium, hard), ``truncation`` and
``occlusion`` (0-3: none, source, target, both), each where the JSON has it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.base import KeypointPair, KeypointPairDataset
from datamodules.files import DatasetFormatError, find_dataset_root, read_json, require
from datamodules.query_points import PairView, parse_query_points
from datamodules.training import TrainableDataModule
from sdzero.errors import ConfigError

SPLITS = ("trn", "val", "test")

LAYOUT = """\
SPair-71k/
  JPEGImages/<category>/<image>.jpg
  PairAnnotation/{trn,val,test}/<pair>:<category>.json
  Layout/large/{trn,val,test}.txt      one pair name (no .json) per line"""


def _points(value: Any, path: Path, field: str) -> np.ndarray:
    """A JSON list of ``[x, y]`` as an ``(N, 2)`` float array, or an error naming the file/field."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DatasetFormatError(f"{str(path)!r}: field {field!r} is not a list of [x, y]") from err
    if arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2 or not np.isfinite(arr).all():
        raise DatasetFormatError(
            f"{str(path)!r}: field {field!r} must be a list of finite [x, y] pairs, got shape "
            f"{arr.shape}"
        )
    return arr


LEVELS = {
    "mirror": 2,
    "viewpoint_variation": 3,
    "scale_variation": 3,
    "truncation": 4,
    "occlusion": 4,
}
"""Per-pair integer fields and their number of values (``0 .. n-1``)."""


def _extra(rec: dict, path: Path, num_kps: int) -> dict[str, Any]:
    """``kps_ids`` (as ints, one per keypoint) and the integer fields of :data:`LEVELS` that the
    pair JSON has, each checked."""
    extra: dict[str, Any] = {}
    if "kps_ids" in rec:
        try:
            ids = [int(i) for i in rec["kps_ids"]]
        except (TypeError, ValueError) as err:
            raise DatasetFormatError(
                f"{str(path)!r}: field 'kps_ids' must be a list of keypoint ids such as \"3\""
            ) from err
        if len(ids) != num_kps or any(i < 0 for i in ids):
            raise DatasetFormatError(
                f"{str(path)!r}: field 'kps_ids' must hold one id >= 0 per keypoint ({num_kps}), "
                f"got {rec['kps_ids']}"
            )
        extra["kps_ids"] = ids
    for name, count in LEVELS.items():
        if name not in rec:
            continue
        value = rec[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
            raise DatasetFormatError(
                f"{str(path)!r}: field {name!r} is {value!r}; expected an integer 0..{count - 1}"
            )
        extra[name] = value
    return extra


def first_per_category(names: list[tuple[str, str]], count: int) -> list[tuple[str, str]]:
    """The first ``count`` of each category's ``(name, category)`` items, in the given order."""
    seen: dict[str, int] = {}
    kept = []
    for name, category in names:
        seen[category] = seen.get(category, 0) + 1
        if seen[category] <= count:
            kept.append((name, category))
    return kept


def _box(value: Any, path: Path, field: str) -> np.ndarray:
    """A JSON ``[x1, y1, x2, y2]`` as a ``(4,)`` float array."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DatasetFormatError(f"{str(path)!r}: field {field!r} is not [x1, y1, x2, y2]") from err
    if arr.shape != (4,):
        raise DatasetFormatError(
            f"{str(path)!r}: field {field!r} must be [x1, y1, x2, y2], got shape {arr.shape}"
        )
    return arr


class SPairDataset(KeypointPairDataset):
    """SPair-71k pairs of one split, in ``Layout/large/<split>.txt`` order.

    :param root: the ``SPair-71k`` folder or any folder containing it.
    :param split: ``"test"`` (12,234 pairs), ``"val"`` or ``"trn"``.
    :param category: ``None`` for all categories, one category name, or a list of names.
    :param per_category: keep only the first ``per_category`` pairs of each category (in layout
        order; SD-DINO evaluates 20 per category), or ``None`` for all.

    Boxes are ``src_bndbox``/``trg_bndbox`` ``[x1, y1, x2, y2]`` in original pixels.
    """

    name = "spair71k"

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        category: str | Sequence[str] | None = None,
        per_category: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"data.split: SPair-71k split must be one of {SPLITS}, got {split!r}")
        check_per_category(per_category)
        self.split = split
        self.categories = [category] if isinstance(category, str) else category
        self.per_category = per_category
        super().__init__(root)

    def _load_pairs(self) -> list[KeypointPair]:
        top = find_dataset_root(
            self.root, ["JPEGImages", "PairAnnotation", "Layout"], LAYOUT, self.name
        )
        names = self._pair_names(top)
        if self.categories is not None:
            available = sorted({cat for _, cat in names})
            unknown = [c for c in self.categories if c not in available]
            if unknown:
                raise ConfigError(
                    f"data.category: SPair-71k split {self.split!r} has no category {unknown}; "
                    f"available: {available}"
                )
            names = [(name, cat) for name, cat in names if cat in self.categories]
        if self.per_category is not None:
            names = first_per_category(names, int(self.per_category))
        pairs = [self._read_pair(top, name, cat) for name, cat in names]
        for path in sorted({p for pair in pairs for p in (pair.src_path, pair.trg_path)}):
            if not path.is_file():
                raise DatasetFormatError(f"SPair-71k image {str(path)!r} does not exist")
        return pairs

    def _pair_names(self, top: Path) -> list[tuple[str, str]]:
        """``(pair name, category)`` in layout-file order; the category is the name's suffix."""
        layout_file = top / "Layout" / "large" / f"{self.split}.txt"
        if not layout_file.is_file():
            raise DatasetFormatError(
                f"SPair-71k: {str(layout_file)!r} does not exist; expected the pair list of split "
                f"{self.split!r}, laid out as:\n{LAYOUT}"
            )
        names = []
        for lineno, line in enumerate(layout_file.read_text().splitlines(), 1):
            name = line.strip()
            if not name:
                continue
            if ":" not in name:
                raise DatasetFormatError(
                    f"{str(layout_file)!r} line {lineno}: {name!r} is not a pair name of the form "
                    "'<id>-<source>-<target>:<category>'"
                )
            names.append((name, name.rpartition(":")[2]))
        return names

    def _read_pair(self, top: Path, name: str, category: str) -> KeypointPair:
        path = top / "PairAnnotation" / self.split / f"{name}.json"
        rec = read_json(path)
        if not isinstance(rec, dict):
            raise DatasetFormatError(f"{str(path)!r} must hold a JSON object")
        if require(rec, "category", path) != category:
            raise DatasetFormatError(
                f"{str(path)!r}: field 'category' is {rec['category']!r} but the pair name says "
                f"{category!r}"
            )
        src_kps = _points(require(rec, "src_kps", path), path, "src_kps")
        trg_kps = _points(require(rec, "trg_kps", path), path, "trg_kps")
        if len(src_kps) != len(trg_kps):
            raise DatasetFormatError(
                f"{str(path)!r}: 'src_kps' has {len(src_kps)} points but 'trg_kps' has "
                f"{len(trg_kps)}; they must correspond one to one"
            )
        images = top / "JPEGImages" / category
        return KeypointPair(
            id=name,
            category=category,
            src_path=images / str(require(rec, "src_imname", path)),
            trg_path=images / str(require(rec, "trg_imname", path)),
            src_kps=src_kps,
            trg_kps=trg_kps,
            src_bbox=_box(require(rec, "src_bndbox", path), path, "src_bndbox"),
            trg_bbox=_box(require(rec, "trg_bndbox", path), path, "trg_bndbox"),
            extra=_extra(rec, path, len(src_kps)),
        )


def check_per_category(per_category: int | None) -> None:
    """:class:`ConfigError` unless ``data.per_category`` is a positive integer or null."""
    if per_category is not None and (isinstance(per_category, bool) or int(per_category) < 1):
        raise ConfigError(
            f"data.per_category must be a positive integer or null, got {per_category!r}"
        )


class SPairDataModule(TrainableDataModule):
    """SPair-71k (``data.root`` = ``SPair-71k/`` or a folder containing it).

    :param split: the evaluated split: ``test`` (default), ``val`` or ``trn``; ``train_split`` /
        ``val_split`` are those ``sdzero train`` uses (see :class:`TrainableDataModule`).
    :param category: ``None`` (all), a category name, or a list of names.
    :param per_category: evaluate the first ``per_category`` pairs of each category (layout order;
        ``limit`` then takes the head of that subset); the training splits stay whole.
    :param query_points, reverse: the evaluated split's query points (``keypoints`` | ``grid:N``)
        and direction (see :mod:`datamodules.query_points`).
    """

    def __init__(
        self,
        root: str,
        split: str = "test",
        category: str | Sequence[str] | None = None,
        per_category: int | None = None,
        limit: int | None = None,
        num_workers: int = 0,
        on_bad_sample: str = "error",
        train_split: str | None = "trn",
        val_split: str | None = "val",
        batch_size: int = 8,
        train_limit: int | None = None,
        query_points: str = "keypoints",
        reverse: bool = False,
    ) -> None:
        splits = (train_split, val_split, batch_size, train_limit)
        super().__init__(root, limit, num_workers, *splits, on_bad_sample=on_bad_sample)
        check_per_category(per_category)
        parse_query_points(query_points)
        self.split = split
        self.category = category
        self.per_category = per_category
        self.query_points, self.reverse = query_points, reverse

    def build_dataset(self) -> PairView:
        dataset = SPairDataset(self.root, self.split, self.category, self.per_category)
        return PairView(dataset, self.query_points, self.reverse)

    def build_split(self, split: str) -> SPairDataset:
        return SPairDataset(self.root, split=split, category=self.category)
