"""PF-Willow (Ham et al. 2016): ``PF-dataset/`` and the 900-row pair CSV of CNNGeometric/CATs.

The CSV has a header row (``imageA,imageB,...``) then, per pair, the two image paths (relative to
the folder holding ``PF-dataset/``) and 40 numbers: 10 source x, 10 source y, 10 target x, 10 target
y, in original pixels as annotated (no offset is applied). A keypoint is kept only where it is valid
in both images: finite and non-negative (``-1`` pads a missing keypoint). PF-Willow has no object
boxes; the metric builds the PCK threshold from the keypoints.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from datamodules.base import BenchmarkDataModule, KeypointPair, KeypointPairDataset
from datamodules.files import DatasetFormatError, DatasetNotFoundError, find_dataset_root

PAIR_FILES = ("test_pairs.csv", "test_pairs_pf.csv")
NUM_KPS = 10

LAYOUT = """\
<folder>/
  PF-dataset/<subclass>/<image>.png      subclasses like car(G), duck(S), winebottle(woC)
  test_pairs.csv  or  test_pairs_pf.csv  header imageA,imageB,... then 2 paths + 40 coordinates"""


class PFWillowDataset(KeypointPairDataset):
    """The PF-Willow test pairs in CSV row order.

    :param root: the folder holding ``PF-dataset/`` and the pair CSV, or any folder containing it.
    :param pairs_file: the CSV's name (relative to that folder) or an absolute path; ``None`` looks
        for ``test_pairs.csv`` (Hedlin, CATs), then ``test_pairs_pf.csv`` (CNNGeometric).

    The category is the object class: the subclass folder up to ``(`` (``car(G)`` -> ``car``). Pairs
    left with no valid keypoint are skipped (the official CSV has none).
    """

    name = "pfwillow"

    def __init__(self, root: str | Path, pairs_file: str | None = None) -> None:
        self.pairs_file = pairs_file
        super().__init__(root)

    def _locate(self) -> tuple[Path, Path]:
        """The dataset folder and the pair CSV."""
        if self.pairs_file is not None and Path(self.pairs_file).is_absolute():
            top = find_dataset_root(self.root, ["PF-dataset"], LAYOUT, self.name)
            csv_path = Path(self.pairs_file)
            if not csv_path.is_file():
                raise DatasetFormatError(f"PF-Willow pair file {str(csv_path)!r} does not exist")
            return top, csv_path
        names = PAIR_FILES if self.pairs_file is None else (self.pairs_file,)
        for name in names[:-1]:
            try:
                top = find_dataset_root(self.root, ["PF-dataset", name], LAYOUT, self.name)
                return top, top / name
            except DatasetNotFoundError:
                continue
        top = find_dataset_root(self.root, ["PF-dataset", names[-1]], LAYOUT, self.name)
        return top, top / names[-1]

    def _load_pairs(self) -> list[KeypointPair]:
        top, csv_path = self._locate()
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or [c.strip() for c in rows[0][:2]] != ["imageA", "imageB"]:
            raise DatasetFormatError(
                f"{str(csv_path)!r}: expected a header row starting 'imageA,imageB', got "
                f"{rows[0][:2] if rows else 'an empty file'}"
            )
        pairs = []
        for lineno, row in enumerate(rows[1:], 2):
            if not any(cell.strip() for cell in row):
                continue
            pair = self._parse_row(top, csv_path, lineno, row)
            if pair is not None:
                pairs.append(pair)
        for path in sorted({p for pair in pairs for p in (pair.src_path, pair.trg_path)}):
            if not path.is_file():
                raise DatasetFormatError(
                    f"PF-Willow image {str(path)!r} (listed in {str(csv_path)!r}) does not exist"
                )
        return pairs

    def _parse_row(
        self, top: Path, csv_path: Path, lineno: int, row: list[str]
    ) -> KeypointPair | None:
        where = f"{str(csv_path)!r} line {lineno}"
        if len(row) != 2 + 4 * NUM_KPS:
            raise DatasetFormatError(
                f"{where}: expected {2 + 4 * NUM_KPS} columns (imageA, imageB, 10 source x, "
                f"10 source y, 10 target x, 10 target y), got {len(row)}"
            )
        try:
            # An empty cell is a missing keypoint, like the -1 padding.
            coords = np.array([float(c) if c.strip() else np.nan for c in row[2:]])
        except ValueError as err:
            raise DatasetFormatError(f"{where}: coordinates must be numbers ({err})") from err
        src = coords[: 2 * NUM_KPS].reshape(2, NUM_KPS).T
        trg = coords[2 * NUM_KPS :].reshape(2, NUM_KPS).T
        valid = (np.isfinite(src) & (src >= 0)).all(1) & (np.isfinite(trg) & (trg >= 0)).all(1)
        if not valid.any():
            return None
        src_rel, trg_rel = Path(row[0].strip()), Path(row[1].strip())
        subclass = src_rel.parent.name
        if not subclass:
            raise DatasetFormatError(
                f"{where}: imageA {row[0]!r} must be 'PF-dataset/<subclass>/<image>.png'"
            )
        return KeypointPair(
            id=f"{lineno - 2:03d}-{src_rel.stem}-{trg_rel.stem}",
            category=subclass.split("(")[0],
            src_path=top / src_rel,
            trg_path=top / trg_rel,
            src_kps=src[valid],
            trg_kps=trg[valid],
        )


class PFWillowDataModule(BenchmarkDataModule):
    """PF-Willow (``data.root`` = the folder holding ``PF-dataset/`` and the pair CSV, or above it).

    :param pairs_file: the pair CSV's name or absolute path; ``None`` finds ``test_pairs.csv`` or
        ``test_pairs_pf.csv``.
    """

    def __init__(
        self,
        root: str,
        pairs_file: str | None = None,
        limit: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(root, limit=limit, num_workers=num_workers)
        self.pairs_file = pairs_file

    def build_dataset(self) -> PFWillowDataset:
        return PFWillowDataset(self.root, pairs_file=self.pairs_file)
