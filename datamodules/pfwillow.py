"""PF-Willow (Ham et al. 2016): ``PF-dataset/`` and the 900-row pair CSV of CNNGeometric/CATs.

The CSV has a header row (``imageA,imageB,...``) then, per pair, the two image paths (relative to
the folder holding ``PF-dataset/``) and 40 numbers: 10 source x, 10 source y, 10 target x, 10 target
y, in original pixels as annotated (no offset is applied). A keypoint is kept only where it is valid
in both images: finite and non-negative (``-1`` pads a missing keypoint). PF-Willow has no object
boxes; the metric builds the PCK threshold from the keypoints.

Two layouts are found: the archive's (``PF-dataset/<subclass>/`` beside the CSV) and the one the
official Hedlin (and CATs) code reads, ``PF-WILLOW/`` holding the CSV and the ``<subclass>/``
folders directly, where the CSV paths' first component (``PF-dataset/``) is dropped.
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
  test_pairs.csv  or  test_pairs_pf.csv  header imageA,imageB,... then 2 paths + 40 coordinates
or, as the official Hedlin/CATs code reads it:
PF-WILLOW/
  <subclass>/<image>.png
  test_pairs.csv                         paths PF-dataset/<subclass>/<image>.png as above"""


def _existing(csv_path: Path) -> Path:
    if not csv_path.is_file():
        raise DatasetFormatError(f"PF-Willow pair file {str(csv_path)!r} does not exist")
    return csv_path


def _first_image(csv_path: Path) -> Path | None:
    """The first pair's source image path as the CSV writes it, or None."""
    with open(csv_path, newline="") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    return Path(rows[1][0].strip()) if len(rows) > 1 else None


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

    def _locate(self) -> tuple[Path, Path, int]:
        """The folder the CSV's image paths start from, the pair CSV, and how many leading
        components of those paths to drop: 0 in the archive's layout (``PF-dataset/`` beside the
        CSV), 1 in Hedlin's (``PF-WILLOW/`` holds the CSV and the subclass folders)."""
        if self.pairs_file is not None and Path(self.pairs_file).is_absolute():
            csv_path = _existing(Path(self.pairs_file))
            first = _first_image(csv_path)
            for drop in (0, 1):
                markers = [Path(*first.parts[drop:]).as_posix()] if first else ["PF-dataset"]
                try:
                    return find_dataset_root(self.root, markers, LAYOUT, self.name), csv_path, drop
                except DatasetNotFoundError:
                    if first is None:
                        raise
            raise DatasetNotFoundError(
                f"{self.name}: no folder under {str(self.root)!r} (searched it and two levels "
                f"below) holds {first} (the first image of {str(csv_path)!r}), with or without "
                f"its first folder. Expected the unpacked official dataset, laid out as:\n{LAYOUT}"
            )
        names = PAIR_FILES if self.pairs_file is None else (self.pairs_file,)
        for name in names:
            try:
                top = find_dataset_root(self.root, ["PF-dataset", name], LAYOUT, self.name)
                return top, top / name, 0
            except DatasetNotFoundError:
                pass
        for name in names:
            try:
                top = find_dataset_root(self.root, [name], LAYOUT, self.name)
            except DatasetNotFoundError:
                continue
            first = _first_image(top / name)
            if first is not None and (top / Path(*first.parts[1:])).is_file():
                return top, top / name, 1
        raise DatasetNotFoundError(
            f"{self.name}: no folder under {str(self.root)!r} (searched it and two levels below) "
            f"holds PF-dataset/ and the pair CSV ({' or '.join(names)}), nor the CSV beside the "
            f"subclass folders of its images. Expected the unpacked official dataset, laid out "
            f"as:\n{LAYOUT}"
        )

    def _load_pairs(self) -> list[KeypointPair]:
        top, csv_path, drop = self._locate()
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
            pair = self._parse_row(top, drop, csv_path, lineno, row)
            if pair is not None:
                pairs.append(pair)
        for path in sorted({p for pair in pairs for p in (pair.src_path, pair.trg_path)}):
            if not path.is_file():
                raise DatasetFormatError(
                    f"PF-Willow image {str(path)!r} (listed in {str(csv_path)!r}) does not exist"
                )
        return pairs

    def _parse_row(
        self, top: Path, drop: int, csv_path: Path, lineno: int, row: list[str]
    ) -> KeypointPair | None:
        """One CSV row; its image paths lose their first ``drop`` components."""
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
            src_path=top / Path(*src_rel.parts[drop:]),
            trg_path=top / Path(*trg_rel.parts[drop:]),
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
        on_bad_sample: str = "error",
    ) -> None:
        super().__init__(root, limit=limit, num_workers=num_workers, on_bad_sample=on_bad_sample)
        self.pairs_file = pairs_file

    def build_dataset(self) -> PFWillowDataset:
        return PFWillowDataset(self.root, pairs_file=self.pairs_file)
