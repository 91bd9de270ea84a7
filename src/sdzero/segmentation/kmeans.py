"""k-means in torch: greedy k-means++ seeding and Lloyd iterations, on CPU or CUDA.

Mirrors scikit-learn's ``KMeans(init="k-means++", algorithm="lloyd")`` (the OVDiff prototypes
use ``KMeans(n_clusters=32, random_state=0, n_init="auto")``) but draws its random numbers from a
seeded CPU ``torch.Generator``: centres are reproducible across devices, not bit-equal to sklearn's.
Rows are centred by the data mean chunk by chunk (as sklearn centres, for precise distances, but
without a centred copy); a chunk's distances, labels and centre sums are computed while it is in
cache. Lloyd is exact but reads only the points whose label may change (Elkan's bounds: late
iterations cost little), and the inertia comes from float64 sufficient statistics instead of a
last pass. Memory beyond the data: ``(N, K)`` bounds and a ``chunk_size x D`` buffer per thread
(OVDiff clusters up to ~131k 7680-d SD vectors per class).

``init_sample`` trades the procedure (not the objective) for speed, as faiss does: seed and
converge on a random subsample, then refine with a few Lloyd iterations on all points.

This module seeds and runs; the chunked rows are :mod:`~sdzero.segmentation.kmeans_points`, the
Lloyd iterations :mod:`~sdzero.segmentation.lloyd`.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from sdzero.segmentation.kmeans_points import Points, sq_dists
from sdzero.segmentation.lloyd import KMeansResult, lloyd


def _kmeans_plus_plus(points: Points, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (sklearn's variant: ``2 + log k`` candidates per step, keep the best).
    Returns ``(k, D)`` centres in the centred frame."""
    n, device = points.x.shape[0], points.x.device
    trials = 2 + int(math.log(k))
    first = points.rows(torch.randint(n, (1,), generator=generator).to(device))
    centres = [first[0]]
    closest = sq_dists(points, first)[0]
    for _ in range(1, k):
        pot = closest.sum()
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(device)
        cum = torch.cumsum(closest.double(), 0)
        cand = points.rows(torch.searchsorted(cum, draws * pot.double()).clamp_(max=n - 1))
        d = torch.minimum(sq_dists(points, cand), closest[None])
        best = int(d.sum(1).argmin())
        closest = d[best]
        centres.append(cand[best])
    return torch.stack(centres)


def _best_of(
    points: Points, k: int, n_init: int, generator: torch.Generator, max_iter: int, tol: float
) -> KMeansResult:
    """The lowest-inertia result of ``n_init`` runs of k-means++ then Lloyd."""
    best = None
    for _ in range(n_init):
        result = lloyd(points, _kmeans_plus_plus(points, k, generator), max_iter, tol)
        if best is None or result.inertia < best.inertia:
            best = result
    return best


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    n_init: int | str = "auto",
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    chunk_size: int | None = None,
    init_sample: int | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` ``(N, D)`` into ``k`` clusters; keep the lowest-inertia run.

    :param n_init: number of k-means++ seedings (each followed by Lloyd, the lowest inertia is
        kept); ``"auto"`` means 1, as sklearn for k-means++. With ``init_sample``, all run on the
        subsample and only the best one is refined on all points.
    :param tol: sklearn's relative tolerance: stop when the total squared centre shift is at most
        ``tol`` times the mean per-feature variance of ``x`` (of the subsample with
        ``init_sample``).
    :param seed: seeds the CPU generator behind every random choice (sklearn's ``random_state``).
    :param chunk_size: rows per block; default 8 MiB of rows on CPU (a chunk stays in cache from
        its distances to its centre sums), 32768 rows on other devices.
    :param init_sample: ``None`` or 0: k-means++ on all points (sklearn's procedure). ``m > 0``:
        k-means++ and Lloyd to convergence on ``m`` points drawn without replacement, then Lloyd
        on all points from those centres, which also stops once an assignment lowers the inertia
        by less than ``tol`` of it (on 100k x 7680 pooled-feature-like points, the iterations
        after the second gained 0.02 % for 3x the time). ``m >= N``: as 0.
    :raises ValueError: ``x`` not 2-D, empty or non-finite; ``k < 1`` or ``k > N``;
        ``init_sample < 0``; ``chunk_size < 1``.

    Computation runs on ``x.device`` in float32 on data centred by its mean; ``centres`` come
    back on that device in the original frame.
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
    if init_sample is not None and (
        not isinstance(init_sample, int) or isinstance(init_sample, bool) or init_sample < 0
    ):
        raise ValueError(f"kmeans: init_sample must be None or an int >= 0, got {init_sample!r}")
    if chunk_size is None:  # CPU: 8 MiB chunks stay in cache
        chunk_size = max(1, (1 << 21) // x.shape[1]) if x.device.type == "cpu" else 32768
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"kmeans: chunk_size must be a positive int, got {chunk_size!r}")
    x = x.float()
    mean = x.mean(0)
    # A non-finite value makes its column's sum non-finite: no elementwise check is needed.
    if not torch.isfinite(mean).all():
        what = "NaN or infinite values" if not torch.isfinite(x).all() else "too large values"
        raise ValueError(f"kmeans: x contains {what}")
    n = x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    sample = init_sample if init_sample and init_sample < n else 0
    threads = torch.get_num_threads()
    pool = None
    if x.device.type == "cpu" and threads > 1:
        # Parallel by chunks only (see Points): every thread, this one included, runs torch ops
        # single-threaded until the end.
        torch.set_num_threads(1)
        pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))
    try:
        # With a subsample, the first pass over all points computes their norms on the way.
        points = Points(x, mean, chunk_size, pool, threads, norms=not sample)
        if sample:
            index = torch.randperm(n, generator=generator)[:sample].sort().values
            part = points.subset(index.to(x.device))
            tol_abs = tol * float(part.sq.double().sum()) / part.x.numel()  # x mean variance
            warm = _best_of(part, k, n_init, generator, max_iter, tol_abs)
            best = lloyd(points, warm.centres, max_iter, tol_abs, min_gain=tol)
            best.n_iter_sample = warm.n_iter
        else:
            tol_abs = tol * float(points.sq.double().sum()) / x.numel()
            best = _best_of(points, k, n_init, generator, max_iter, tol_abs)
    finally:
        if pool is not None:
            pool.shutdown()
            torch.set_num_threads(threads)
    best.centres = best.centres + mean
    return best


def feature_mixture(
    n: int, d: int, *, components: int = 40, rank: int = 16, seed: int = 0
) -> torch.Tensor:
    """``(n, d)`` float32 points shaped like pooled SD features, for tests and benchmarks: a
    Gaussian mixture of ``components`` with unequal weights, means off the origin that differ
    mostly in a shared ``rank``-dim subspace, per-component spreads along that subspace and
    per-component isotropic noise scales. Unlike uniform noise, k-means has a real optimum here:
    seedings reach inertias a few percent apart."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.multinomial(torch.rand(components, generator=g) ** 2 + 0.02, n, True, generator=g)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g))[0].T.contiguous()  # (rank, d)
    scale = math.sqrt(d / rank)  # a subspace direction carries as much variance as the noise
    means = 2 * torch.randn(d, generator=g) + 0.5 * torch.randn(components, d, generator=g)
    means.addmm_(torch.randn(components, rank, generator=g), basis, alpha=0.5 * scale)
    spreads = scale * torch.rand(components, rank, generator=g)
    noise = 0.5 + 1.5 * torch.rand(components, generator=g)
    x = torch.randn(n, d, generator=g)
    x.addmm_(torch.randn(n, rank, generator=g) * spreads[owner], basis).mul_(noise[owner, None])
    for start in range(0, n, 8192):  # no (n, d) temporary
        x[start : start + 8192] += means[owner[start : start + 8192]]
    return x
