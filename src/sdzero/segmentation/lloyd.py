"""Exact Lloyd iterations for k-means, accelerated by Elkan's bounds, with the inertia from float64
sufficient statistics (see :func:`lloyd`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sdzero.segmentation.kmeans_points import Points, sq_norms


@dataclass
class KMeansResult:
    """``centres`` ``(K, D)`` float32, ``labels`` ``(N,)`` int64 (index of the nearest centre),
    ``inertia``: sum of squared distances of the points to their centres; ``n_iter``: Lloyd
    iterations on all points of the kept run, ``n_iter_sample`` on its subsample (0 without
    ``init_sample``)."""

    centres: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int
    n_iter_sample: int = 0


@dataclass
class _Assignment:
    """Lloyd's state: ``labels`` ``(N,)`` (-1 before the first pass), ``upper`` ``(N,)`` an upper
    bound of each point's distance to its centre, ``lower`` ``(N, K)`` lower bounds of its
    distances to the centres (Elkan's bounds), ``sums`` ``(K, D)`` float64 and ``counts`` ``(K,)``
    of the points per label."""

    labels: torch.Tensor
    upper: torch.Tensor
    lower: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor


def _assign(
    points: Points, centres: torch.Tensor, state: _Assignment, index: torch.Tensor | None
) -> int:
    """Nearest centres of all points (``index=None``: ``sums``/``counts`` are rebuilt, and the
    points' ``sq_total``, and ``sq`` if missing) or of the points at ``index`` (they are updated by
    the points that move); exact bounds for those points. Returns how many points changed label."""
    k = centres.shape[0]
    c_sq, centres_t = sq_norms(centres), centres.T
    incremental = index is not None
    norms = points.sq is None
    sq = points.x.new_empty(points.x.shape[0]) if norms else points.sq

    def chunk(sel: slice | torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        wide = None if incremental else rows.double()  # for exact sums
        if wide is not None:
            sq64 = torch.linalg.vector_norm(wide, dim=1).square_()
            if norms:
                sq[sel] = sq64
        # |x - c_k|^2 = |x|^2 + |c_k|^2 - 2 x.c_k
        d = torch.addmm(c_sq, rows, centres_t, alpha=-2)
        nearest, new = d.min(1)
        old = state.labels[sel]
        moved = torch.nonzero(new != old).flatten()
        old = old[moved]  # a copy: the labels are overwritten next
        state.lower[sel] = d.add_(sq[sel, None]).clamp_(min=0).sqrt_()
        state.upper[sel] = (nearest + sq[sel]).clamp_(min=0).sqrt_()
        state.labels[sel] = new
        if wide is not None:
            sums = wide.new_zeros(k, rows.shape[1]).index_add_(0, new, wide)
            return sums, torch.bincount(new, minlength=k), moved.new_tensor(len(moved)), sq64.sum()
        if len(moved) == 0:
            return None
        # Moved points leave their old cluster and join the new one.
        moved_rows = rows[moved].double()
        sums = moved_rows.new_zeros(k, rows.shape[1]).index_add_(0, new[moved], moved_rows)
        sums.index_add_(0, old, -moved_rows)
        counts = torch.bincount(new[moved], minlength=k) - torch.bincount(old, minlength=k)
        return sums, counts, moved.new_tensor(len(moved))

    parts = [p for p in points.map(chunk, index) if p is not None]
    if not parts:
        return 0
    sums, counts, moved, *total = (_fold(column) for column in zip(*parts, strict=True))
    if incremental:
        state.sums += sums
        state.counts += counts
    else:
        state.sums, state.counts = sums, counts
        points.sq, points.sq_total = sq, float(total[0])
    return int(moved)


def _fold(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of equally shaped tensors, in order (fewer copies than ``torch.stack(...).sum(0)``)."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total


def _inertia(
    points: Points, centres: torch.Tensor, state: _Assignment, exact: bool = True
) -> float:
    """Sum of squared distances of the points to their centres (``state`` holds their labels).

    From the sufficient statistics, ``sum |x_i|^2 - 2 sum_k c_k.S_k + sum_k n_k |c_k|^2``, in
    float64 from float32 inputs (sums over chunks of rows): each term is exact to ~1e-13 of
    ``sum |x_i|^2 + sum_k n_k |c_k|^2`` (which bounds the middle one), so the result is exact to
    1e-6 relative whenever it is at least 1e-5 of that. Otherwise (nearly zero inertia) it is
    summed from the direct differences if ``exact``.
    """
    c = centres.double()
    own = float((state.counts.double() * (c * c).sum(1)).sum())
    inertia = points.sq_total - 2 * float((c * state.sums).sum()) + own
    if inertia >= 1e-5 * (points.sq_total + own) or not exact:
        return inertia

    def chunk(sel: slice, rows: torch.Tensor) -> torch.Tensor:
        diff = rows - centres[state.labels[sel]]
        return torch.linalg.vector_norm(diff, dim=1, dtype=torch.float64).square_().sum()

    return float(torch.stack(points.map(chunk)).sum())


def lloyd(
    points: Points,
    centres: torch.Tensor,
    max_iter: int,
    tol: float,
    min_gain: float | None = None,
) -> KMeansResult:
    """Lloyd iterations from ``centres`` ``(K, D)`` (centred frame) until the labels repeat, the
    squared centre shift is ``<= tol``, an assignment lowers the inertia by less than
    ``min_gain`` of it, or ``max_iter``; then the labels of the final centres.
    Exact Lloyd, accelerated by Elkan's bounds: a point whose upper bound to its centre
    is below its lower bound to every other centre (or half the gap between the two centres) keeps
    its label without being read, so late iterations, which move few points, cost little."""
    n, k = points.x.shape[0], centres.shape[0]
    device = points.x.device
    state = _Assignment(
        labels=torch.full((n,), -1, dtype=torch.long, device=device),
        upper=points.x.new_empty(n),
        lower=points.x.new_empty(n, k),
        sums=centres.new_zeros(k, centres.shape[1], dtype=torch.float64),
        counts=torch.zeros(k, dtype=torch.long, device=device),
    )
    index = None  # None: every point is assigned afresh
    converged = False
    inertia = math.inf
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        if _assign(points, centres, state, index) == 0:
            # Strict convergence: the centres computed from these labels are the current ones.
            converged = True
            break
        empty = torch.nonzero(state.counts == 0).flatten()
        if min_gain is not None and not len(empty):
            previous, inertia = inertia, _inertia(points, centres, state, exact=False)
            if previous - inertia < min_gain * inertia:
                converged = True  # the labels are those of the current centres
                break
        if len(empty):
            # As sklearn: an empty cluster takes the point farthest from its centre, which leaves
            # its old cluster. That needs every point's exact distance; bounds restart after it.
            if index is not None:
                _assign(points, centres, state, None)
            far = torch.topk(state.upper, len(empty)).indices
            far_rows = points.rows(far).double()
            state.sums.index_add_(0, state.labels[far], -far_rows)
            state.counts.index_add_(0, state.labels[far], -torch.ones_like(far))
            state.sums[empty], state.counts[empty], state.labels[far] = far_rows, 1, empty
        new_centres = (state.sums / state.counts[:, None]).to(centres.dtype)
        moves = torch.linalg.vector_norm(new_centres - centres, dim=1)
        shift = float((moves.double() ** 2).sum())
        centres = new_centres
        index = None if len(empty) else _candidates(points, state, centres, moves)
        if shift <= tol:
            break
    if not converged:  # as sklearn, the labels of the final centres
        _assign(points, centres, state, index)
    return KMeansResult(centres, state.labels, _inertia(points, centres, state), n_iter)


def _candidates(
    points: Points, state: _Assignment, centres: torch.Tensor, moves: torch.Tensor
) -> torch.Tensor:
    """Move the bounds with the centres (which moved by ``moves`` ``(K,)``) and return the points
    whose label may change."""
    exact = centres.double()
    gram = exact @ exact.T
    gaps = (gram.diag()[:, None] + gram.diag()[None] - 2 * gram).clamp_(min=0).sqrt_()
    # Centre j cannot be nearer than a point's own centre a if |x - c_a| <= |x - c_j| or
    # |x - c_a| <= |c_a - c_j| / 2; a itself is never nearer (infinite half gap to itself).
    half_gaps = (0.5 * gaps.fill_diagonal_(math.inf)).to(state.lower.dtype)  # (K, K)

    def chunk(sel: slice) -> torch.Tensor:
        labels = state.labels[sel]
        upper = state.upper[sel].add_(moves[labels])
        lower = state.lower[sel].sub_(moves)
        bound = torch.maximum(lower, half_gaps[labels]).min(1).values
        return torch.nonzero(upper > bound).flatten().add_(sel.start)

    n = len(state.labels)
    return torch.cat(points.ranges(n, chunk, step=max(4096, -(-n // points.workers))))
