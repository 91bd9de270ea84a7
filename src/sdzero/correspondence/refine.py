"""GeoAware-SC's test-time refinements of nearest-neighbour matching (Zhang et al., CVPR 2024,
"Telling Left from Right"; official code github Junyi42/GeoAware-SC, ``pck_train.py`` and
``utils/utils_correspondence.py``, ``utils/utils_geoware.py``).

* **Adaptive pose alignment** (``--ADAPT_FLIP``): the source is matched as it is and mirrored
  left-right; the orientation whose dense features lie closer to the target's (a lower
  orientation distance, ``method.flip_score``) gives the matches. Official rule: flip when the
  flipped distance is strictly lower than the original's. The default distance is
  :func:`nn_distance` inside the objects' masks (SAM masks prompted with each image's annotated
  box, the mirrored source's mask mirrored), on both grids resized to 64 x 64; ``--MUTUAL_NN``
  is :func:`mutual_nn_distance`, which reads no mask. The mirrored source's queries are the
  mirrored points, with SPair's left/right ids exchanged
  (:mod:`sdzero.correspondence.mirror_keypoints`).
* **Window soft-argmax** (``--SOFT_EVAL --SOFT_EVAL_WINDOW``): :func:`window_soft_argmax`.

Features are ``(C, h, w)`` grids, descriptors unit-normalised per cell before any distance (the
official code normalises its descriptors before both rules). Masks are ``(h, w)`` bool on the
grid a distance reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def mirror_x(points: torch.Tensor, extent: float) -> torch.Tensor:
    """``(N, 2)`` ``(x, y)`` points mirrored left-right: ``x -> extent - x``. ``extent`` is the
    frame's width for continuous coordinates (0 = the left edge; the official ``ANNO_SIZE - x``)
    or ``W - 1`` for pixel-index coordinates (integer x indexes a pixel column)."""
    out = points.clone()
    out[:, 0] = extent - out[:, 0]
    return out


def mirror_box(box: Sequence[float] | None, extent: float) -> tuple[float, ...] | None:
    """A ``(x1, y1, x2, y2)`` box mirrored left-right in a frame ``extent`` wide (None stays
    None)."""
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return (extent - x2, y1, extent - x1, y2)


def box_mask(box: Sequence[float] | None, grid_hw: tuple[int, int], size: float) -> torch.Tensor:
    """``(h, w)`` bool: the cells of a grid over the ``size x size`` frame whose centres lie in
    ``box`` ``(x1, y1, x2, y2)`` (frame pixels, edges included). ``None``, or a box holding no
    cell centre, gives every cell (the distance then reads the whole grid)."""
    h, w = grid_hw
    if box is None:
        return torch.ones(h, w, dtype=torch.bool)
    x1, y1, x2, y2 = box
    xs = (torch.arange(w) + 0.5) * (size / w)
    ys = (torch.arange(h) + 0.5) * (size / h)
    inside = ((ys >= y1) & (ys <= y2))[:, None] & ((xs >= x1) & (xs <= x2))[None, :]
    return inside if inside.any() else torch.ones(h, w, dtype=torch.bool)


def unit_grid(features: torch.Tensor, grid: int = 0) -> torch.Tensor:
    """``(C, h, w)`` features unit-normalised per cell, then (``grid > 0``) resized bilinearly
    (``align_corners=False``) to ``grid x grid`` without normalising again, as the official
    ``get_distance`` resizes its normalised descriptors."""
    unit = F.normalize(features.float(), dim=0)
    if not grid:
        return unit
    return F.interpolate(unit[None], size=(grid, grid), mode="bilinear", align_corners=False)[0]


def _rows(grid: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(n, C)`` the cells of a ``(C, h, w)`` grid inside ``mask`` (all without one)."""
    rows = grid.flatten(1).T
    return rows if mask is None else rows[mask.flatten().to(rows.device)]


def nn_distance(
    src_features: torch.Tensor,
    trg_features: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    trg_mask: torch.Tensor | None = None,
    grid: int = 0,
) -> float:
    """The official ``get_distance`` (its default flip score): the mean, over source cells in
    ``src_mask``, of the Euclidean distance to the nearest target cell in ``trg_mask``, on
    :func:`unit_grid` ``(C, h, w)`` grids (``grid``: the official 64; 0 keeps the grids as they
    are). Masks are on that grid; None: every cell."""
    src = _rows(unit_grid(src_features, grid), src_mask)
    trg = _rows(unit_grid(trg_features, grid), trg_mask)
    return torch.cdist(src, trg).min(dim=1).values.mean().item()


def mutual_nn_distance(src_features: torch.Tensor, trg_features: torch.Tensor) -> float:
    """Mean distance of the mutual nearest neighbours (a source cell whose nearest target cell has
    it as its nearest source cell) of two ``(C, h, w)`` grids of unit descriptors, every cell
    read: the official ``get_distance_mutual_nn`` (``--MUTUAL_NN``)."""
    dist = torch.cdist(_rows(unit_grid(src_features), None), _rows(unit_grid(trg_features), None))
    best, to_trg = dist.min(dim=1)
    to_src = dist.argmin(dim=0)
    mutual = to_src[to_trg] == torch.arange(len(to_trg), device=dist.device)
    return best[mutual].mean().item()


# method.flip_score: the orientation distance of flip alignment (lower: the features agree better)
FLIP_SCORES = ("nn_distance", "mutual_nn")
# method.flip_mask: where nn_distance reads (official: SAM masks prompted with the annotated boxes)
FLIP_MASKS = ("none", "box")


def window_soft_argmax(
    scores: torch.Tensor, grid_hw: tuple[int, int], window: int, temperature: float
) -> torch.Tensor:
    """GeoAware-SC's window soft-argmax: ``(N, 2)`` ``(x, y)`` continuous cell coordinates (column,
    row; cell ``j`` spans ``[j, j+1)``, its centre ``j + 0.5``) of ``N`` queries from their
    similarity ``scores`` ``(N, h*w)`` over a row-major ``grid_hw`` target grid.

    Official rule (``get_flow`` + SFNet's ``soft_argmax``): every score outside the
    ``(2 window + 1)^2`` cells around the query's argmax cell (the window clipped at the grid's
    borders) is set to 0, not dropped; a softmax of ``scores / temperature`` over the whole grid
    (official ``beta`` 0.02) weights the cells; the result is the expected cell centre.
    """
    h, w = grid_hw
    best = scores.argmax(dim=1)
    rows = torch.arange(h, device=scores.device)
    cols = torch.arange(w, device=scores.device)
    near_row = (rows[None] - (best // w)[:, None]).abs() <= window
    near_col = (cols[None] - (best % w)[:, None]).abs() <= window
    inside = (near_row[:, :, None] & near_col[:, None, :]).flatten(1)
    kept = torch.where(inside, scores, torch.zeros_like(scores))
    weights = torch.softmax(kept.float() / temperature, dim=1).view(-1, h, w)
    x = (weights.sum(dim=1) * (cols.float() + 0.5)).sum(dim=1)
    y = (weights.sum(dim=2) * (rows.float() + 0.5)).sum(dim=1)
    return torch.stack([x, y], dim=1)
