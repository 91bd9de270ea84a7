"""The rows k-means works on: seen centred by the data mean, processed chunk by chunk, on CPU by a
pool of single-threaded workers (see :class:`Points`)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(1)


class Points:
    """Rows ``x`` ``(N, D)`` seen centred by ``mean`` (``None``: ``x`` is centred) and processed
    in chunks of ``chunk_size`` rows. With a ``pool`` (CPU), its single-threaded workers take the
    chunks in turn, as sklearn's OpenMP loop does: a chunk stays in one core's cache through all the
    work on it and no thread waits for another before the pass ends (multi-threaded torch ops on
    small chunks synchronise once per op, which is slow on a busy machine). Every chunk gives its
    own result, so results do not depend on the number of workers.

    ``sq`` ``(N,)``: the squared norms of the centred rows (float32, for distances; with
    ``norms=False`` left to the first pass that reads every row); ``sq_total``: their sum, exact
    in float64, set by that pass (see ``lloyd._assign``).
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

    def subset(self, index: torch.Tensor) -> Points:
        """The rows at ``index``, centred into a new tensor."""
        out = self.x.new_empty(len(index), self.x.shape[1])

        def copy(sel: slice) -> None:
            torch.index_select(self.x, 0, index[sel], out=out[sel])
            if self.mean is not None:
                out[sel].sub_(self.mean)

        self.ranges(len(index), copy)
        return Points(out, None, self.chunk_size, self.pool, self.workers)

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


def sq_dists(points: Points, centred: torch.Tensor) -> torch.Tensor:
    """Squared distances ``(M, N)`` of centred rows ``(M, D)`` to the points."""
    dots = points.x.new_empty(points.x.shape[0], centred.shape[0])

    def chunk(sel: slice, rows: torch.Tensor) -> None:
        torch.mm(rows, centred.T, out=dots[sel])

    points.map(chunk)
    return (points.sq[None] - 2 * dots.T + sq_norms(centred)[:, None]).clamp_(min=0)
