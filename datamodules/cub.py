"""CUB-200-2011 (Wah et al. 2011) keypoint pairs built from its official text files.

Two protocols (the papers differ; the config names the one used):

* ``hedlin`` (default; ``ubc-vision/LDM_correspondences`` ``eval/cub2011.py``): the test split,
  classes with id <= ``num_classes`` (3), every unordered within-class pair in
  ``itertools.combinations`` order over each class's images sorted by image id, classes in id order.
  On the real files this gives 1,248 pairs.
* ``sampled`` (the DistillDIFT harness): all within-class test pairs of all 200 classes (81,878 on
  the real files), from which ``num_pairs`` (1000) are drawn without replacement with
  ``numpy.random.default_rng(seed)``. They are kept in drawn order, so ``data.limit`` keeps a
  uniform random subset and a smaller ``num_pairs`` with the same seed gives a prefix of a larger
  one.

In both, a pair keeps only the parts visible in both images (``parts/part_locs.txt``), as ``(x, y)``
pixels of the original images, ordered by part id; a pair with no common visible part is skipped
(the real files have none). Boxes come from ``bounding_boxes.txt`` (``x y w h`` -> ``x1 y1 x2 y2``).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.base import KeypointPair, KeypointPairDataset
from datamodules.files import DatasetFormatError, find_dataset_root
from datamodules.query_points import PairView, parse_query_points
from datamodules.training import TrainableDataModule
from sdzero.errors import ConfigError

PROTOCOLS = ("hedlin", "sampled")
DEFAULT_NUM_CLASSES = {"hedlin": 3, "sampled": None}
DEFAULT_NUM_PAIRS = 1000

MARKERS = [
    "images",
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "classes.txt",
    "parts/part_locs.txt",
]

LAYOUT = """\
CUB_200_2011/
  images/<class folder>/<image>.jpg
  images.txt              <image_id> <relative path>
  image_class_labels.txt  <image_id> <class_id>
  train_test_split.txt    <image_id> <is_training_image: 1 train, 0 test>
  bounding_boxes.txt      <image_id> <x> <y> <width> <height>
  classes.txt             <class_id> <class name>
  parts/part_locs.txt     <image_id> <part_id> <x> <y> <visible>"""


def _read_table(path: Path, columns: str) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of a whitespace-separated file with the named ``columns``.

    The last column takes the rest of the line (image paths and class names).
    """
    names = columns.split()
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split(maxsplit=len(names) - 1)
        if not fields:
            continue
        if len(fields) != len(names):
            raise DatasetFormatError(
                f"{str(path)!r} line {lineno}: expected {len(names)} columns ({columns}), got "
                f"{len(fields)}"
            )
        rows.append((lineno, fields))
    return rows


def _number(value: str, path: Path, lineno: int, kind: type = int) -> int | float:
    try:
        return kind(value)
    except ValueError as err:
        raise DatasetFormatError(
            f"{str(path)!r} line {lineno}: {value!r} is not "
            f"{'an integer' if kind is int else 'a number'}"
        ) from err


def _id_map(path: Path, columns: str, kind: type = int) -> dict[int, int | float | str]:
    """``{first column as int: second column converted by kind}`` for two-column files."""
    out = {}
    for lineno, (key, value) in _read_table(path, columns):
        out[_number(key, path, lineno)] = (
            value if kind is str else _number(value, path, lineno, kind)
        )
    return out


class CUBDataset(KeypointPairDataset):
    """Within-class keypoint pairs of CUB-200-2011 (see the module docstring for the protocols).

    :param root: the ``CUB_200_2011`` folder or any folder containing it.
    :param protocol: ``"hedlin"`` or ``"sampled"``.
    :param split: ``"test"`` (both protocols) or ``"train"``.
    :param num_classes: keep classes with id <= this; ``None`` = the protocol's default (3 for
        ``hedlin``, all for ``sampled``).
    :param num_pairs: pairs drawn by ``sampled`` (``None`` = 1000); must be ``None`` for ``hedlin``.
    :param seed: seed of the ``sampled`` draw.

    The category is the class name as written in ``classes.txt`` (``001.Black_footed_Albatross``).
    """

    name = "cub200"

    def __init__(
        self,
        root: str | Path,
        protocol: str = "hedlin",
        split: str = "test",
        num_classes: int | None = None,
        num_pairs: int | None = None,
        seed: int = 0,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(
                f"data.protocol: CUB protocol must be one of {PROTOCOLS}, got {protocol!r}"
            )
        if split not in ("train", "test"):
            raise ConfigError(f"data.split: CUB split must be 'train' or 'test', got {split!r}")
        if num_classes is not None and int(num_classes) < 1:
            raise ConfigError(
                f"data.num_classes: CUB num_classes must be a positive integer or null, got {num_classes}"
            )
        if protocol == "hedlin" and num_pairs is not None:
            raise ConfigError(
                "data.num_pairs: CUB num_pairs applies to protocol 'sampled' only; protocol 'hedlin' uses every "
                "within-class pair (set num_pairs to null)"
            )
        if num_pairs is not None and int(num_pairs) < 1:
            raise ConfigError(
                f"data.num_pairs: CUB num_pairs must be a positive integer or null, got {num_pairs}"
            )
        self.protocol = protocol
        self.split = split
        self.num_classes = (
            DEFAULT_NUM_CLASSES[protocol] if num_classes is None else int(num_classes)
        )
        self.num_pairs = DEFAULT_NUM_PAIRS if num_pairs is None else int(num_pairs)
        self.seed = seed
        super().__init__(root)

    def _load_pairs(self) -> list[KeypointPair]:
        top = find_dataset_root(self.root, MARKERS, LAYOUT, self.name)
        images = _id_map(top / "images.txt", "image_id path", str)
        labels = _id_map(top / "image_class_labels.txt", "image_id class_id")
        is_train = _id_map(top / "train_test_split.txt", "image_id is_training_image")
        classes = _id_map(top / "classes.txt", "class_id class_name", str)
        boxes = self._boxes(top / "bounding_boxes.txt")
        parts = self._visible_parts(top / "parts" / "part_locs.txt")

        want_train = int(self.split == "train")
        by_class: dict[int, list[int]] = defaultdict(list)
        for image_id in sorted(images):
            label = self._lookup(labels, image_id, top / "image_class_labels.txt")
            if self._lookup(is_train, image_id, top / "train_test_split.txt") != want_train:
                continue
            if self.num_classes is None or label <= self.num_classes:
                by_class[label].append(image_id)

        candidates = []
        for label in sorted(by_class):
            category = str(self._lookup(classes, label, top / "classes.txt"))
            for src, trg in itertools.combinations(by_class[label], 2):
                common = sorted(
                    self._lookup(parts, src, top / "parts" / "part_locs.txt").keys()
                    & self._lookup(parts, trg, top / "parts" / "part_locs.txt").keys()
                )
                if common:
                    candidates.append((category, src, trg, common))
        if self.protocol == "sampled":
            order = np.random.default_rng(self.seed).permutation(len(candidates))
            candidates = [candidates[i] for i in order[: self.num_pairs]]

        pairs = []
        for category, src, trg, common in candidates:
            paths = [top / "images" / str(images[i]) for i in (src, trg)]
            pairs.append(
                KeypointPair(
                    id=f"{src}-{trg}",
                    category=category,
                    src_path=paths[0],
                    trg_path=paths[1],
                    src_kps=np.array([parts[src][p] for p in common]),
                    trg_kps=np.array([parts[trg][p] for p in common]),
                    src_bbox=self._lookup(boxes, src, top / "bounding_boxes.txt"),
                    trg_bbox=self._lookup(boxes, trg, top / "bounding_boxes.txt"),
                )
            )
        for path in sorted({p for pair in pairs for p in (pair.src_path, pair.trg_path)}):
            if not path.is_file():
                raise DatasetFormatError(
                    f"CUB image {str(path)!r} (from images.txt) does not exist"
                )
        return pairs

    @staticmethod
    def _lookup(table: dict[int, Any], key: int, path: Path) -> Any:
        if key not in table:
            raise DatasetFormatError(f"{str(path)!r} has no row for id {key}")
        return table[key]

    @staticmethod
    def _boxes(path: Path) -> dict[int, np.ndarray]:
        """``{image_id: [x1, y1, x2, y2]}`` from ``x y w h`` rows."""
        out = {}
        for lineno, fields in _read_table(path, "image_id x y width height"):
            x, y, w, h = (_number(v, path, lineno, float) for v in fields[1:])
            out[_number(fields[0], path, lineno)] = np.array([x, y, x + w, y + h])
        return out

    @staticmethod
    def _visible_parts(path: Path) -> dict[int, dict[int, tuple[float, float]]]:
        """``{image_id: {part_id: (x, y)}}`` of the visible parts; every listed image has one."""
        out: dict[int, dict[int, tuple[float, float]]] = {}
        for lineno, fields in _read_table(path, "image_id part_id x y visible"):
            image_id, part_id, visible = (_number(fields[i], path, lineno) for i in (0, 1, 4))
            visible_parts = out.setdefault(image_id, {})
            if visible not in (0, 1):
                raise DatasetFormatError(
                    f"{str(path)!r} line {lineno}: visible must be 0 or 1, got {fields[4]!r}"
                )
            if visible:
                xy = (
                    _number(fields[2], path, lineno, float),
                    _number(fields[3], path, lineno, float),
                )
                visible_parts[part_id] = xy
        return out


class CUBDataModule(TrainableDataModule):
    """CUB-200-2011 pairs (``data.root`` = ``CUB_200_2011/`` or a folder containing it).

    :param protocol: ``hedlin`` (default, the official code) or ``sampled``.
    :param split: the evaluated split, ``test`` (default) or ``train``; ``train_split`` (``train``)
        is the one ``sdzero train`` uses; CUB has no validation split.
    :param num_classes: classes with id <= this; ``None`` = 3 for ``hedlin``, all for ``sampled``.
    :param num_pairs: pairs drawn by ``sampled`` (``None`` = 1000); ``None`` for ``hedlin``.
    :param seed: seed of the ``sampled`` draw.
    :param query_points, reverse: the evaluated split's query points (``keypoints`` | ``grid:N``)
        and direction (see :mod:`datamodules.query_points`).
    """

    def __init__(
        self,
        root: str,
        protocol: str = "hedlin",
        split: str = "test",
        num_classes: int | None = None,
        num_pairs: int | None = None,
        seed: int = 0,
        limit: int | None = None,
        num_workers: int = 0,
        on_bad_sample: str = "error",
        train_split: str | None = "train",
        val_split: str | None = None,
        batch_size: int = 8,
        train_limit: int | None = None,
        query_points: str = "keypoints",
        reverse: bool = False,
    ) -> None:
        splits = (train_split, val_split, batch_size, train_limit)
        super().__init__(root, limit, num_workers, *splits, on_bad_sample=on_bad_sample)
        parse_query_points(query_points)
        self.query_points, self.reverse = query_points, reverse
        self.protocol = protocol
        self.split = split
        self.num_classes = num_classes
        self.num_pairs = num_pairs
        self.seed = seed

    def build_dataset(self) -> PairView:
        return PairView(self.build_split(self.split), self.query_points, self.reverse)

    def build_split(self, split: str) -> CUBDataset:
        return CUBDataset(
            self.root,
            protocol=self.protocol,
            split=split,
            num_classes=self.num_classes,
            num_pairs=self.num_pairs,
            seed=self.seed,
        )
