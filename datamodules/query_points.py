"""Which source points a correspondence run queries, and in which direction it runs a pair.

``data.query_points``:

* ``keypoints`` (default): the annotated source keypoints, scored against their annotated targets;
* ``grid:N``: the annotated keypoints, then the centres of an ``N x N`` grid of cells over the
  source object's box (over the whole source image when the dataset has no box). The grid points
  have no ground truth: their target is NaN in the sample (``null`` in the record), they are
  recorded like any prediction and PCK skips them (its ``num_unlabelled_points`` counts them), so
  the run's PCK stays the method's PCK on the annotated keypoints. Such runs make the pseudo-labels
  of :mod:`datamodules.pseudo_labels` on the training splits.

``data.reverse=true`` runs every pair target -> source (images, keypoints, boxes and the
source/target levels of SPair's ``truncation`` / ``occlusion`` swapped): with a forward run of the
same split it gives the two directions that cycle-consistency filtering of pseudo-labels needs.

Both are a view of a keypoint-pair dataset (:class:`PairView`); its indices and ids are the
dataset's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from sdzero.errors import ConfigError

QUERY_POINTS = ("keypoints", "grid:N")
SWAPPED_LEVELS = ("truncation", "occlusion")  # 1 = source, 2 = target: swapped by reverse


def parse_query_points(spec: str) -> int | None:
    """The grid side ``N`` of ``grid:N`` (``N >= 1``), or None for ``keypoints``; otherwise a
    :class:`ConfigError` naming ``data.query_points``."""
    if spec == "keypoints":
        return None
    kind, _, side = str(spec).partition(":")
    if kind == "grid" and side.isdigit() and int(side) >= 1:
        return int(side)
    raise ConfigError(
        f"data.query_points must be 'keypoints' or 'grid:N' with N a positive integer "
        f"(e.g. grid:8), got {spec!r}"
    )


def grid_points(side: int, box: torch.Tensor, size_wh: tuple[int, int]) -> torch.Tensor:
    """``(side*side, 2)`` ``(x, y)`` centres of a ``side x side`` grid of cells over ``box``
    ``(4,)`` ``[x1, y1, x2, y2]`` (original pixels, clipped to the image), row-major; over the
    whole ``size_wh`` ``(w, h)`` image when the box has NaN (no box)."""
    w, h = (float(v) for v in size_wh)
    if torch.isnan(box).any():
        x1, y1, x2, y2 = 0.0, 0.0, w, h
    else:
        x1, y1 = max(float(box[0]), 0.0), max(float(box[1]), 0.0)
        x2, y2 = min(float(box[2]), w), min(float(box[3]), h)
    steps = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    xs, ys = x1 + steps * (x2 - x1), y1 + steps * (y2 - y1)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)


class PairView(Dataset):
    """A keypoint-pair dataset's samples with ``data.query_points`` and ``data.reverse`` applied
    (see the module docstring); other attributes are the dataset's."""

    def __init__(self, dataset: Dataset, query_points: str = "keypoints", reverse: bool = False):
        self.dataset = dataset
        self.grid = parse_query_points(query_points)
        self.reverse = bool(reverse)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        if self.reverse:
            sample = swapped(sample)
        if self.grid is not None:
            grid = grid_points(self.grid, sample["src_bbox"], sample["src_size"])
            unknown = torch.full_like(grid, float("nan"))
            sample["src_kps"] = torch.cat([sample["src_kps"], grid])
            sample["trg_kps"] = torch.cat([sample["trg_kps"], unknown])
        return sample


def swapped(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample run target -> source (see the module docstring)."""
    out = dict(sample)
    for field in ("name", "img", "kps", "bbox", "size"):
        out[f"src_{field}"], out[f"trg_{field}"] = sample[f"trg_{field}"], sample[f"src_{field}"]
    extra = dict(sample.get("extra", {}))
    for level in SWAPPED_LEVELS:
        if extra.get(level) in (1, 2):
            extra[level] = 3 - extra[level]
    out["extra"] = extra
    return out
