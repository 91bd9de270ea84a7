"""GeoAware-SC's test-time refinements of nearest-neighbour matching (Zhang et al., CVPR 2024,
"Telling Left from Right"; official code github Junyi42/GeoAware-SC, ``pck_train.py`` and
``utils/utils_correspondence.py``, ``utils/utils_geoware.py``).

* **Adaptive pose alignment** (``--ADAPT_FLIP``): the source is matched as it is and mirrored
  left-right; the orientation whose dense features lie closer to the target's (a lower
  :data:`FLIP_SCORES` distance) gives the matches. Official rule: flip when the flipped score is
  strictly lower than the original's. Query points of the mirrored source are the mirrored points
  (:func:`mirror_x`).
* **Window soft-argmax** (``--SOFT_EVAL --SOFT_EVAL_WINDOW``): :func:`window_soft_argmax`.

Features are ``(C, h, w)`` grids, descriptors unit-normalised per cell before any distance (the
official code normalises its descriptors before both rules).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def mirror_x(points: torch.Tensor, extent: float) -> torch.Tensor:
    """``(N, 2)`` ``(x, y)`` points mirrored left-right: ``x -> extent - x``. ``extent`` is the
    frame's width for continuous coordinates (0 = the left edge; the official ``ANNO_SIZE - x``)
    or ``W - 1`` for pixel-index coordinates (integer x indexes a pixel column)."""
    out = points.clone()
    out[:, 0] = extent - out[:, 0]
    return out


def _cells(features: torch.Tensor) -> torch.Tensor:
    """``(h*w, C)`` unit descriptors of a ``(C, h, w)`` grid (row-major cells)."""
    return F.normalize(features.flatten(1).T.float(), dim=1)


def nn_distance(src_features: torch.Tensor, trg_features: torch.Tensor) -> float:
    """Mean over source cells of the Euclidean distance from the cell's unit descriptor to its
    nearest target descriptor, for ``(C, h, w)`` grids: the official ``get_distance`` (its default
    flip score) with every cell in the object masks, since sdzero has no SAM masks; the official
    code also resizes both grids to 64 x 64 first, here the grids are used as they are."""
    return torch.cdist(_cells(src_features), _cells(trg_features)).min(dim=1).values.mean().item()


def mutual_nn_distance(src_features: torch.Tensor, trg_features: torch.Tensor) -> float:
    """Mean distance of the mutual nearest neighbours (a source cell whose nearest target cell has
    it as its nearest source cell) of two ``(C, h, w)`` grids: the official
    ``get_distance_mutual_nn`` (``--MUTUAL_NN``)."""
    dist = torch.cdist(_cells(src_features), _cells(trg_features))
    best, to_trg = dist.min(dim=1)
    to_src = dist.argmin(dim=0)
    mutual = to_src[to_trg] == torch.arange(len(to_trg), device=dist.device)
    return best[mutual].mean().item()


# method.flip_score: the orientation score of flip alignment (lower: the features agree better)
FLIP_SCORES: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "nn_distance": nn_distance,
    "mutual_nn": mutual_nn_distance,
}


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
