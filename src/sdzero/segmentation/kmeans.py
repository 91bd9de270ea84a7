"""k-means in torch: greedy k-means++ seeding and Lloyd iterations, on CPU or CUDA.

Mirrors scikit-learn's ``KMeans(init="k-means++", algorithm="lloyd")`` (the OVDiff prototypes
use ``KMeans(n_clusters=32, random_state=0, n_init="auto")``) but draws its random numbers from a
seeded CPU ``torch.Generator``: centres are reproducible across devices, not bit-equal to sklearn's.
Distances are computed in row chunks so memory stays ``O(chunk_size * K)`` beyond the data itself
(OVDiff clusters up to ~131k 7680-d SD vectors per class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    """``centres`` ``(K, D)`` float32, ``labels`` ``(N,)`` int64 (index of the nearest centre),
    ``inertia``: sum of squared distances of the points to their centres; ``n_iter`` of the kept
    run."""

    centres: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(1)


def _assign(
    x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre ``(N,)`` and its squared distance ``(N,)`` for every row of ``x``."""
    c_sq = _sq_norms(centres)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], chunk_size):
        d = x_sq[s : s + chunk_size, None] - 2 * x[s : s + chunk_size] @ centres.T + c_sq
        dist[s : s + chunk_size], labels[s : s + chunk_size] = d.min(1)
    return labels, dist.clamp_(min=0)


def _kmeans_plus_plus(
    x: torch.Tensor, x_sq: torch.Tensor, k: int, generator: torch.Generator
) -> torch.Tensor:
    """Greedy k-means++ (sklearn's variant: ``2 + log k`` candidates per step, keep the best)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    closest = (x_sq - 2 * x @ x[first] + x_sq[first]).clamp_(min=0)
    for _ in range(1, k):
        pot = closest.sum()
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device)
        cum = torch.cumsum(closest.double(), 0)
        cand = torch.searchsorted(cum, draws * pot.double()).clamp_(max=n - 1)
        d = (x_sq[cand, None] - 2 * (x @ x[cand].T).T + x_sq[None]).clamp_(min=0)
        d = torch.minimum(d, closest[None])
        best = int(d.sum(1).argmin())
        closest = d[best]
        centres.append(x[cand[best]])
    return torch.stack(centres)


def _lloyd(
    x: torch.Tensor,
    x_sq: torch.Tensor,
    centres: torch.Tensor,
    max_iter: int,
    tol: float,
    chunk_size: int,
) -> KMeansResult:
    k = centres.shape[0]
    labels = None
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        new_labels, dist = _assign(x, x_sq, centres, chunk_size)
        if labels is not None and torch.equal(new_labels, labels):
            break  # strict convergence: the centres computed from these labels are the current ones
        labels = new_labels
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            # As sklearn: an empty cluster takes the point farthest from its centre, which leaves
            # its old cluster.
            far = torch.topk(dist, len(empty)).indices
            counts.index_add_(0, labels[far], -torch.ones(len(far), dtype=x.dtype, device=x.device))
            sums.index_add_(0, labels[far], -x[far])
            counts[empty], sums[empty] = 1, x[far]
        new_centres = sums / counts[:, None]
        shift = float(((new_centres - centres) ** 2).sum())
        centres = new_centres
        if shift <= tol:
            labels, _ = _assign(x, x_sq, centres, chunk_size)
            break
    else:
        labels, _ = _assign(x, x_sq, centres, chunk_size)
    # Summed directly rather than from the expanded distances, which lose digits to cancellation.
    inertia = sum(
        float(((x[s : s + chunk_size] - centres[labels[s : s + chunk_size]]) ** 2).double().sum())
        for s in range(0, x.shape[0], chunk_size)
    )
    return KMeansResult(centres, labels, inertia, n_iter)


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    n_init: int | str = "auto",
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    chunk_size: int = 16384,
) -> KMeansResult:
    """Cluster the rows of ``x`` ``(N, D)`` into ``k`` clusters; keep the lowest-inertia run.

    :param n_init: number of k-means++ seedings; ``"auto"`` means 1, as sklearn for k-means++.
    :param tol: sklearn's relative tolerance: stop when the total squared centre shift is at most
        ``tol`` times the mean per-feature variance of ``x``.
    :param seed: seeds the CPU generator behind every random choice (sklearn's ``random_state``).
    :raises ValueError: ``x`` not 2-D, empty or non-finite; ``k < 1`` or ``k > N``.

    Computation runs on ``x.device`` in float32 on data centred by its mean (as sklearn, for precise
    distances); ``centres`` come back on that device in the original frame.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans expects a non-empty (N, D) tensor, got shape {tuple(x.shape)}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"kmeans: k must be a positive int, got {k!r}")
    if k > x.shape[0]:
        raise ValueError(f"kmeans: k={k} clusters need at least {k} points, got N={x.shape[0]}")
    if n_init == "auto":
        n_init = 1
    if not isinstance(n_init, int) or isinstance(n_init, bool) or n_init < 1:
        raise ValueError(f"kmeans: n_init must be 'auto' or a positive int, got {n_init!r}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError("kmeans: x contains NaN or infinite values")
    mean = x.mean(0)
    x = x - mean
    x_sq = _sq_norms(x)
    tol_abs = tol * float(x.var(0, unbiased=False).mean())
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(n_init):
        init = _kmeans_plus_plus(x, x_sq, k, generator)
        result = _lloyd(x, x_sq, init, max_iter, tol_abs, chunk_size)
        if best is None or result.inertia < best.inertia:
            best = result
    best.centres = best.centres + mean
    return best
