"""Filters of pseudo-labels, each a pure function of one pair's labels, and the counts of what they drop.

A pair's labels are source points ``(K, 2)`` and their labelled target points ``(K, 2)``, ``(x, y)``
pixels of the original images; a filter returns the ``(K,)`` bool mask of the labels it keeps.

- :func:`inside`: labels whose target lies in the target image (edges included);
- :func:`cycle_consistent`: labels that come back to their source point when the pair is run in
  the other direction (mutual / cycle consistency; needs a run with ``data.reverse=true``);
- :func:`confident`: labels whose recorded per-point confidence reaches a minimum;
- :func:`keyed_subset`: at most ``limit`` labels of a pair, a random subset drawn from a stream keyed
  by the pair, so the choice does not depend on the order runs or pairs are read in.
"""

from __future__ import annotations

from collections import Counter

import torch

from sdzero.seeding import keyed_generator

FILTERS = ("no_label", "annotated", "outside", "confidence", "cycle", "max_per_pair")
"""The reasons a label is dropped, in the order they are applied (see :class:`DropCounts`)."""


def inside(points: torch.Tensor, size_wh: tuple[int, int]) -> torch.Tensor:
    """``(K,)``: which ``(x, y)`` ``points`` ``(K, 2)`` lie in the ``size_wh`` ``(w, h)`` image."""
    w, h = size_wh
    x, y = points[:, 0], points[:, 1]
    return (x >= 0) & (x <= w) & (y >= 0) & (y <= h)


def cycle_consistent(
    src: torch.Tensor,
    pred: torch.Tensor,
    back_src: torch.Tensor,
    back_pred: torch.Tensor,
    tolerance: float,
) -> torch.Tensor:
    """``(K,)``: which forward labels ``src -> pred`` (``(K, 2)`` each) survive the round trip.

    The reverse run queried ``back_src`` ``(M, 2)`` in the target image and predicted
    ``back_pred`` ``(M, 2)`` in the source image. A label's target ``pred[k]`` is looked up at
    the nearest reverse query (the grid spacing bounds that approximation); the label is kept
    when that query's prediction lies within ``tolerance`` pixels of ``src[k]``: with queries at
    the exact targets this is mutual nearest-neighbour consistency.
    """
    if len(back_src) == 0:
        return torch.zeros(len(src), dtype=torch.bool)
    nearest = torch.cdist(pred, back_src).argmin(dim=1)
    return torch.linalg.vector_norm(back_pred[nearest] - src, dim=1) <= tolerance


def confident(confidence: torch.Tensor, minimum: float) -> torch.Tensor:
    """``(K,)``: which per-point ``confidence`` values ``(K,)`` reach ``minimum``."""
    return confidence >= minimum


def keyed_subset(keep: torch.Tensor, limit: int, *key: int) -> torch.Tensor:
    """``keep`` ``(K,)`` bool with all but ``limit`` of its True entries cleared, the survivors
    drawn uniformly from the stream keyed by ``key`` (e.g. seed, run, pair index)."""
    chosen = torch.nonzero(keep).flatten()
    if len(chosen) <= limit:
        return keep
    order = torch.randperm(len(chosen), generator=keyed_generator(*key))[:limit]
    out = torch.zeros_like(keep)
    out[chosen[order]] = True
    return out


class DropCounts(Counter):
    """Labels dropped per reason of :data:`FILTERS`, plus ``kept`` labels and ``pairs`` left."""

    def drop(self, reason: str, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``keep & mask``, counting under ``reason`` the labels ``mask`` removes from ``keep``."""
        if reason not in FILTERS:
            raise ValueError(f"unknown filter {reason!r}; expected one of {FILTERS}")
        self[reason] += int((keep & ~mask).sum())
        return keep & mask

    def summary(self) -> str:
        """One line: ``K labels on P pairs kept; dropped: reason n, ...``."""
        dropped = ", ".join(f"{r} {self[r]}" for r in FILTERS if self[r])
        return f"{self['kept']} labels on {self['pairs']} pairs kept; dropped: {dropped or 'none'}"
