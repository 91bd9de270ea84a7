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
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


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


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(1)


class _Points:
    """Rows ``x`` ``(N, D)`` seen centred by ``mean`` (``None``: ``x`` is centred) and processed
    in chunks of ``chunk_size`` rows. With a ``pool`` (CPU), its single-threaded workers take the
    chunks in turn, as sklearn's OpenMP loop does: a chunk stays in one core's cache through all the
    work on it and no thread waits for another before the pass ends (multi-threaded torch ops on
    small chunks synchronise once per op, which is slow on a busy machine). Every chunk gives its
    own result, so results do not depend on the number of workers.

    ``sq`` ``(N,)``: the squared norms of the centred rows (float32, for distances; with
    ``norms=False`` left to the first pass that reads every row); ``sq_total``: their sum, exact
    in float64, set by that pass (see ``_assign``).
    """

    def __init__(
        self,
        x: torch.Tensor,
        mean: torch.Tensor | None,
        chunk_size: int,
        pool: ThreadPoolExecutor | None,
        workers: int,
        norms: bool = True,
    ) -> None:
        self.x, self.mean, self.chunk_size = x, mean, chunk_size
        self.pool, self.workers = pool, workers
        self._local = threading.local()  # one buffer for the centred chunk per thread
        self.sq: torch.Tensor | None = None
        self.sq_total = math.nan
        if norms:
            self.sq = torch.cat(self.map(lambda _, rows: torch.linalg.vector_norm(rows, dim=1)))
            self.sq.square_()

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The centred rows ``(M, D)`` at ``index``."""
        rows = self.x[index]  # a copy
        return rows if self.mean is None else rows.sub_(self.mean)

    def subset(self, index: torch.Tensor) -> _Points:
        """The rows at ``index``, centred into a new tensor."""
        out = self.x.new_empty(len(index), self.x.shape[1])

        def copy(sel: slice) -> None:
            torch.index_select(self.x, 0, index[sel], out=out[sel])
            if self.mean is not None:
                out[sel].sub_(self.mean)

        self.ranges(len(index), copy)
        return _Points(out, None, self.chunk_size, self.pool, self.workers)

    def _chunk(self, sel: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(sel, slice) and self.mean is None:
            return self.x[sel]
        buffer = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = self.x.new_empty(self.chunk_size, self.x.shape[1])
        if isinstance(sel, slice):
            rows = self.x[sel]
            return torch.sub(rows, self.mean, out=buffer[: len(rows)])
        rows = torch.index_select(self.x, 0, sel, out=buffer[: len(sel)])
        return rows if self.mean is None else rows.sub_(self.mean)

    def ranges(self, n: int, fn: Callable[[slice], T], step: int | None = None) -> list[T]:
        """``fn(sel)`` for consecutive slices of ``step`` (default ``chunk_size``) of
        ``range(n)``, in order."""
        step = step or self.chunk_size
        sels = [slice(s, s + step) for s in range(0, n, step)]
        if self.pool is None or len(sels) == 1:
            return [fn(sel) for sel in sels]
        share = self.workers

        def work(first: int) -> list[T]:
            return [fn(sel) for sel in sels[first::share]]

        parts = list(self.pool.map(work, range(share)))
        return [parts[i % share][i // share] for i in range(len(sels))]

    def map(
        self,
        fn: Callable[[slice | torch.Tensor, torch.Tensor], T],
        index: torch.Tensor | None = None,
    ) -> list[T]:
        """``fn(sel, centred rows x[sel])`` for consecutive chunks ``sel`` (slices) of all points,
        or of ``index`` (index tensors), in order. ``fn`` may write to disjoint parts of shared
        tensors; the rows are valid during the call only."""
        if index is None:
            return self.ranges(self.x.shape[0], lambda sel: fn(sel, self._chunk(sel)))
        return self.ranges(len(index), lambda sel: fn(index[sel], self._chunk(index[sel])))


def _sq_dists(points: _Points, centred: torch.Tensor) -> torch.Tensor:
    """Squared distances ``(M, N)`` of centred rows ``(M, D)`` to the points."""
    dots = points.x.new_empty(points.x.shape[0], centred.shape[0])

    def chunk(sel: slice, rows: torch.Tensor) -> None:
        torch.mm(rows, centred.T, out=dots[sel])

    points.map(chunk)
    return (points.sq[None] - 2 * dots.T + _sq_norms(centred)[:, None]).clamp_(min=0)


def _kmeans_plus_plus(points: _Points, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (sklearn's variant: ``2 + log k`` candidates per step, keep the best).
    Returns ``(k, D)`` centres in the centred frame."""
    n, device = points.x.shape[0], points.x.device
    trials = 2 + int(math.log(k))
    first = points.rows(torch.randint(n, (1,), generator=generator).to(device))
    centres = [first[0]]
    closest = _sq_dists(points, first)[0]
    for _ in range(1, k):
        pot = closest.sum()
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(device)
        cum = torch.cumsum(closest.double(), 0)
        cand = points.rows(torch.searchsorted(cum, draws * pot.double()).clamp_(max=n - 1))
        d = torch.minimum(_sq_dists(points, cand), closest[None])
        best = int(d.sum(1).argmin())
        closest = d[best]
        centres.append(cand[best])
    return torch.stack(centres)


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
    points: _Points, centres: torch.Tensor, state: _Assignment, index: torch.Tensor | None
) -> int:
    """Nearest centres of all points (``index=None``: ``sums``/``counts`` are rebuilt, and the
    points' ``sq_total``, and ``sq`` if missing) or of the points at ``index`` (they are updated by
    the points that move); exact bounds for those points. Returns how many points changed label."""
    k = centres.shape[0]
    c_sq, centres_t = _sq_norms(centres), centres.T
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
    points: _Points, centres: torch.Tensor, state: _Assignment, exact: bool = True
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


def _lloyd(
    points: _Points,
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
    points: _Points, state: _Assignment, centres: torch.Tensor, moves: torch.Tensor
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


def _best_of(
    points: _Points, k: int, n_init: int, generator: torch.Generator, max_iter: int, tol: float
) -> KMeansResult:
    """The lowest-inertia result of ``n_init`` runs of k-means++ then Lloyd."""
    best = None
    for _ in range(n_init):
        result = _lloyd(points, _kmeans_plus_plus(points, k, generator), max_iter, tol)
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
        # Parallel by chunks only (see _Points): every thread, this one included, runs torch ops
        # single-threaded until the end.
        torch.set_num_threads(1)
        pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))
    try:
        # With a subsample, the first pass over all points computes their norms on the way.
        points = _Points(x, mean, chunk_size, pool, threads, norms=not sample)
        if sample:
            index = torch.randperm(n, generator=generator)[:sample].sort().values
            part = points.subset(index.to(x.device))
            tol_abs = tol * float(part.sq.double().sum()) / part.x.numel()  # x mean variance
            warm = _best_of(part, k, n_init, generator, max_iter, tol_abs)
            best = _lloyd(points, warm.centres, max_iter, tol_abs, min_gain=tol)
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
