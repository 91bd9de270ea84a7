"""PF-PASCAL (Ham et al. 2017): the Proposal Flow archive and CNNGeometric's 299 test pairs.

``PF-dataset-PASCAL.zip`` unpacks to ``PF-dataset-PASCAL/{JPEGImages, Annotations}``; the test
pairs are ``test_pairs_pf_pascal.csv`` (CNNGeometric, used by WeakAlign, NCNet, DenseMatching,
SD-DINO and GeoAware-SC), inside that folder or beside it. The CSV has a header row
``source_image,target_image,class,XA,YA,XB,YB``; each row holds the two image paths (relative to
the folder holding ``PF-dataset-PASCAL/``), the class as 1..20 in VOC order, and the keypoints as
four ``;``-separated lists (source x, source y, target x, target y) in original pixels, as annotated
(no offset is applied); only keypoints visible in both images are listed.

PCK on PF-PASCAL is, by the field's convention, relative to the target IMAGE's longer side
(``method.pck_threshold=image``, PCK@alpha_img: CNNGeometric, NCNet, CATs, SD-DINO, GeoAware-SC;
every protocol preset uses it on this dataset). With ``boxes`` the object boxes of
``Annotations/<class>/<image>.mat`` (field ``bbox``, ``[x1, y1, x2, y2]``) come with the pairs, so
the box thresholds (``bbox-target``, ``bbox-source``) work too.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from datamodules.base import BenchmarkDataModule, KeypointPair, KeypointPairDataset
from datamodules.files import DatasetFormatError, DatasetNotFoundError, find_dataset_root

TOP = "PF-dataset-PASCAL"
PAIRS_FILE = "test_pairs_pf_pascal.csv"
HEADER = ["source_image", "target_image", "class", "XA", "YA", "XB", "YB"]
CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
"""The CSV's class ids 1..20, in order."""

LAYOUT = f"""\
<folder>/
  {TOP}/
    JPEGImages/<image>.jpg
    Annotations/<class>/<image>.mat        object box 'bbox' (read when data.boxes=true)
    {PAIRS_FILE}           (or beside {TOP}/) header {",".join(HEADER)}"""


def _coords(cell: str, where: str, column: str) -> np.ndarray:
    """A ``;``-separated list of numbers as a float array."""
    try:
        values = np.array([float(v) for v in cell.split(";") if v.strip()], dtype=np.float64)
    except ValueError as err:
        raise DatasetFormatError(
            f"{where}: column {column} must be ';'-separated numbers ({err})"
        ) from err
    if not np.isfinite(values).all():
        raise DatasetFormatError(f"{where}: column {column} holds NaN or infinite coordinates")
    return values


def _read_box(path: Path) -> np.ndarray:
    """The ``bbox`` ``[x1, y1, x2, y2]`` of a Proposal Flow annotation file."""
    from scipy.io import loadmat

    if not path.is_file():
        raise DatasetFormatError(
            f"PF-PASCAL annotation {str(path)!r} does not exist; it holds the object box. "
            "Unpack Annotations/ from PF-dataset-PASCAL.zip, or set data.boxes=false to score "
            "with the image size (method.pck_threshold=image) only"
        )
    try:
        box = np.asarray(loadmat(str(path))["bbox"], dtype=np.float64).reshape(-1)
    except (KeyError, ValueError, OSError) as err:
        raise DatasetFormatError(
            f"{str(path)!r} must be a MATLAB file with a field 'bbox' = [x1, y1, x2, y2] ({err})"
        ) from err
    if box.shape != (4,):
        raise DatasetFormatError(f"{str(path)!r}: 'bbox' must be [x1, y1, x2, y2], got {box}")
    return box


class PFPascalDataset(KeypointPairDataset):
    """The PF-PASCAL pairs of a CNNGeometric pair CSV, in row order.

    :param root: the folder holding ``PF-dataset-PASCAL/`` or any folder containing it (the
        ``PF-dataset-PASCAL`` folder itself works too).
    :param pairs_file: the CSV's name or an absolute path; ``None`` = ``test_pairs_pf_pascal.csv``
        inside ``PF-dataset-PASCAL/`` or beside it (``val_pairs_pf_pascal.csv``: the val split).
    :param boxes: read each image's object box from ``Annotations/<class>/<image>.mat``.

    The category is the class name; ids are ``<row>-<source>-<target>``.
    """

    name = "pfpascal"

    def __init__(self, root: str | Path, pairs_file: str | None = None, boxes: bool = True) -> None:
        self.pairs_file = pairs_file or PAIRS_FILE
        self.boxes = boxes
        super().__init__(root)

    def _locate(self) -> tuple[Path, Path]:
        """The folder holding ``PF-dataset-PASCAL/`` (the CSV's paths start there) and the CSV."""
        given = Path(self.pairs_file)
        if given.is_absolute():
            base = find_dataset_root(self.root, [TOP], LAYOUT, self.name)
            if not given.is_file():
                raise DatasetFormatError(f"PF-PASCAL pair file {str(given)!r} does not exist")
            return base, given
        for markers, csv_in in (([f"{TOP}/{given}"], TOP), ([TOP, str(given)], "")):
            try:
                base = find_dataset_root(self.root, markers, LAYOUT, self.name)
                return base, base / csv_in / given
            except DatasetNotFoundError:
                pass
        inside = Path(self.root).expanduser()
        if (inside / "JPEGImages").is_dir() and inside.name == TOP:  # root is the folder itself
            for csv_path in (inside / given, inside.parent / given):
                if csv_path.is_file():
                    return inside.parent, csv_path
        raise DatasetNotFoundError(
            f"{self.name}: no folder under {str(self.root)!r} (searched it and two levels below) "
            f"holds {TOP}/ and {given} (inside it or beside it). Expected the unpacked official "
            f"dataset and CNNGeometric's pair list, laid out as:\n{LAYOUT}"
        )

    def _load_pairs(self) -> list[KeypointPair]:
        base, csv_path = self._locate()
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or [c.strip() for c in rows[0]] != HEADER:
            raise DatasetFormatError(
                f"{str(csv_path)!r}: expected the header row {','.join(HEADER)}, got "
                f"{','.join(rows[0]) if rows else 'an empty file'}"
            )
        pairs = [
            self._parse_row(base, f"{str(csv_path)!r} line {lineno}", lineno - 2, row)
            for lineno, row in enumerate(rows[1:], 2)
            if any(cell.strip() for cell in row)
        ]
        for path in sorted({p for pair in pairs for p in (pair.src_path, pair.trg_path)}):
            if not path.is_file():
                raise DatasetFormatError(
                    f"PF-PASCAL image {str(path)!r} (listed in {str(csv_path)!r}) does not exist"
                )
        return pairs

    def _parse_row(self, base: Path, where: str, number: int, row: list[str]) -> KeypointPair:
        if len(row) != len(HEADER):
            raise DatasetFormatError(
                f"{where}: expected {len(HEADER)} columns ({','.join(HEADER)}), got {len(row)}"
            )
        class_id = int(row[2]) if row[2].strip().isdigit() else 0
        if not 1 <= class_id <= len(CLASSES):
            raise DatasetFormatError(
                f"{where}: class must be a class id 1..{len(CLASSES)}, got {row[2]!r}"
            )
        category = CLASSES[class_id - 1]
        xa, ya, xb, yb = (_coords(row[3 + i], where, HEADER[3 + i]) for i in range(4))
        if not len(xa) == len(ya) == len(xb) == len(yb):
            raise DatasetFormatError(
                f"{where}: XA, YA, XB, YB must list as many numbers each, got "
                f"{len(xa)}, {len(ya)}, {len(xb)}, {len(yb)}"
            )
        src_rel, trg_rel = Path(row[0].strip()), Path(row[1].strip())
        boxes = {}
        if self.boxes:
            annotations = base / TOP / "Annotations" / category
            boxes = {
                "src_bbox": _read_box(annotations / f"{src_rel.stem}.mat"),
                "trg_bbox": _read_box(annotations / f"{trg_rel.stem}.mat"),
            }
        return KeypointPair(
            id=f"{number:03d}-{src_rel.stem}-{trg_rel.stem}",
            category=category,
            src_path=base / src_rel,
            trg_path=base / trg_rel,
            src_kps=np.stack([xa, ya], axis=1),
            trg_kps=np.stack([xb, yb], axis=1),
            **boxes,
        )


class PFPascalDataModule(BenchmarkDataModule):
    """PF-PASCAL test pairs (``data.root`` = the folder holding ``PF-dataset-PASCAL/``, or above).

    :param pairs_file: the pair CSV's name or absolute path (default ``test_pairs_pf_pascal.csv``).
    :param boxes: read the object boxes from ``Annotations/`` (for ``bbox-*`` thresholds); the
        field's PF-PASCAL threshold is the image size, which needs none.
    """

    def __init__(
        self,
        root: str,
        pairs_file: str | None = None,
        boxes: bool = True,
        limit: int | None = None,
        num_workers: int = 0,
        on_bad_sample: str = "error",
    ) -> None:
        super().__init__(root, limit=limit, num_workers=num_workers, on_bad_sample=on_bad_sample)
        self.pairs_file = pairs_file
        self.boxes = boxes

    def build_dataset(self) -> PFPascalDataset:
        return PFPascalDataset(self.root, pairs_file=self.pairs_file, boxes=self.boxes)
