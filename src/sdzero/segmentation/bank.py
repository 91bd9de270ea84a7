"""One extractor's prototypes of every class as one matrix, scored against features in chunks.

The foreground prototypes of all classes are the rows of one L2-normalised ``(N, D)`` matrix,
grouped by class (class ``c``'s rows are ``fg[fg_start[c]:fg_start[c + 1]]``), and likewise the
background prototypes the stuff filter keeps (``(M, D)``, ``bg_start``). Scoring multiplies the
features by blocks of rows, so the similarity values held at once stay under a budget
(``method.score_memory_mb``) whatever the number of classes: ADE20K's 150 and COCO-Stuff's 171
classes with 65 prototypes of 7,680 SD dimensions each would otherwise need gigabytes per window
batch. The result is the same as scoring all rows at once (the same products; ties go to the
first row either way).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdzero.segmentation.filters import keep_background
from sdzero.segmentation.settings import OVDIFF

BYTES_PER_SCORE = 4  # float32 similarities


def rows_per_chunk(memory_mb: float, cells: int) -> int:
    """How many prototype rows one similarity block may hold for ``cells`` feature vectors
    (windows x grid cells) within ``memory_mb`` MiB of float32 values (at least one)."""
    return max(1, int(memory_mb * 2**20) // (BYTES_PER_SCORE * max(cells, 1)))


@dataclass
class BankScores:
    """Per window: FG ``(B, k, gh, gw)`` best similarity and best prototype row of each kept class;
    background ``(B, gh, gw)`` best similarity, its owner class (label index) and row in its ``bg``."""

    fg: Tensor
    fg_arg: Tensor
    bg: Tensor
    bg_owner: Tensor
    bg_arg: Tensor


@dataclass
class PrototypeBank:
    """One extractor's prototypes of every non-background class, L2-normalised.

    ``classes[c]`` is the label index of class position ``c``; ``fg`` ``(N, D)`` holds every
    class's foreground rows one class after another from ``fg_start`` ``(C + 1,)`` on, with
    ``fg_source`` ``(N,)`` each row's index in its class's :class:`Prototypes` ``fg``; ``bg``,
    ``bg_start``, ``bg_source`` the same for the background rows left by the stuff filter.
    """

    extractor: str
    classes: list[int]
    fg: Tensor
    fg_start: Tensor
    fg_source: Tensor
    bg: Tensor
    bg_start: Tensor
    bg_source: Tensor

    @classmethod
    def build(
        cls,
        prototypes: Mapping[int, Any],
        stuff: Collection[int] = (),
        stuff_threshold: float = OVDIFF.stuff_threshold,
    ) -> PrototypeBank:
        """From ``{label index: Prototypes}`` of one extractor. Stuff classes' own background
        prototypes are dropped; the others' go through :func:`keep_background` (``threshold <= 0``
        switches that off, as the official ``--filter_bg_thres``)."""
        if not prototypes:
            raise ValueError("a prototype bank needs the prototypes of at least one class")
        classes = sorted(prototypes)
        names = {prototypes[c].extractor for c in classes}
        dims = {int(prototypes[c].fg.shape[-1]) for c in classes}
        if len(names) != 1 or len(dims) != 1:
            raise ValueError(
                f"one bank holds one extractor's prototypes, got {names} with dims {dims}"
            )
        dim = dims.pop()
        stuff_fg = [prototypes[c].fg for c in classes if c in stuff]
        stuff_fg = torch.cat(stuff_fg) if stuff_fg else torch.empty(0, dim)
        bg_keep = []
        for c in classes:
            bg = prototypes[c].bg
            keep = torch.isfinite(bg).all(-1) & ~torch.tensor(c in stuff)
            if stuff_threshold > 0:
                keep &= keep_background(bg, stuff_fg, stuff_threshold)
            bg_keep.append(torch.nonzero(keep).flatten())
        fg = _stack([prototypes[c].fg for c in classes], [None] * len(classes), dim)
        bg = _stack([prototypes[c].bg for c in classes], bg_keep, dim)
        return cls(names.pop(), classes, *fg, *bg)

    def to(self, device: Any) -> PrototypeBank:
        tensors = {k: getattr(self, k).to(device) for k in ("fg", "bg", "fg_source", "bg_source")}
        return PrototypeBank(
            self.extractor,
            self.classes,
            fg_start=self.fg_start,
            bg_start=self.bg_start,
            **tensors,
        )

    @property
    def fg_counts(self) -> Tensor:
        """``(C,)`` foreground rows per class."""
        return self.fg_start[1:] - self.fg_start[:-1]

    @property
    def bg_counts(self) -> Tensor:
        """``(C,)`` background rows kept per class."""
        return self.bg_start[1:] - self.bg_start[:-1]

    def score(
        self, features: Tensor, kept: Sequence[int], memory_mb: float = OVDIFF.score_memory_mb
    ) -> BankScores:
        """Best-prototype cosine similarities of L2-normalised ``features`` ``(B, D, gh, gw)``.

        :param kept: label indices of the classes kept for this image (their FG channels and
            their BG prototypes take part).
        :param memory_mb: at most this many MiB of similarity values at once (whole classes per
            block; a class with more rows than that is one block).
        """
        unknown = sorted(set(kept) - set(self.classes))
        if unknown:
            raise ValueError(f"classes {unknown} have no {self.extractor!r} prototypes in the bank")
        batch, _, height, width = features.shape
        flat = features.flatten(2)  # (B, D, hw): rows @ flat needs no copy of the features
        budget = rows_per_chunk(memory_mb, batch * height * width)
        positions = [self.classes.index(c) for c in kept]
        fg_val, fg_arg = self._best_per_class(flat, positions, budget)
        bg_val, bg_row = self._best_background(flat, positions, budget)
        owner_of = torch.tensor(self.classes, device=flat.device)[self._bg_class(bg_row)]
        source = self.bg_source[bg_row.clamp(min=0)]
        none = bg_row < 0  # no kept class has background rows: the channel stays -1, unowned
        bg_owner = torch.where(none, -1, owner_of)
        bg_arg = torch.where(none, -1, source)
        grid = (batch, height, width)
        return BankScores(
            fg_val.view(batch, len(kept), height, width),
            fg_arg.view(batch, len(kept), height, width),
            bg_val.view(grid),
            bg_owner.view(grid),
            bg_arg.view(grid),
        )

    def _best_per_class(
        self, flat: Tensor, positions: Sequence[int], budget: int
    ) -> tuple[Tensor, Tensor]:
        """``(B, k, hw)`` max and argmax (row in the class's ``fg``) over each kept class's rows."""
        batch, _, cells = flat.shape
        values = flat.new_full((batch, len(positions), cells), -1.0)
        args = torch.full(values.shape, -1, dtype=torch.long, device=flat.device)
        for block in _blocks([self._span(self.fg_start, p) for p in positions], budget):
            rows = torch.cat([torch.arange(a, b) for _, (a, b) in block]).to(flat.device)
            sim = self.fg[rows] @ flat  # (B, rows of the block, hw)
            offset = 0
            for j, (a, b) in block:
                best = sim[:, offset : offset + b - a].max(dim=1)
                values[:, j] = best.values
                args[:, j] = self.fg_source[a + best.indices]
                offset += b - a
        return values, args

    def _best_background(
        self, flat: Tensor, positions: Sequence[int], budget: int
    ) -> tuple[Tensor, Tensor]:
        """``(B, hw)`` max over the background rows of every kept class (one group) and the
        winning row of ``bg`` (-1 where there is none)."""
        batch, _, cells = flat.shape
        spans = [self._span(self.bg_start, p) for p in positions]
        rows = torch.cat([torch.arange(a, b) for a, b in spans] or [torch.zeros(0)]).long()
        rows = rows.to(flat.device)
        best = flat.new_full((batch, cells), -1.0)
        arg = torch.full((batch, cells), -1, dtype=torch.long, device=flat.device)
        for start in range(0, len(rows), budget):
            chunk = rows[start : start + budget]
            found = (self.bg[chunk] @ flat).max(dim=1)
            better = found.values > best
            if start == 0:  # every value beats the -1 start, even a cosine of -1
                better = torch.ones_like(better)
            best = torch.where(better, found.values, best)
            arg = torch.where(better, chunk[found.indices], arg)
        return best, arg

    def _bg_class(self, rows: Tensor) -> Tensor:
        """The class position of background rows (0 for -1, which the caller masks)."""
        starts = self.bg_start[1:].to(rows.device)
        return torch.searchsorted(starts, rows.clamp(min=0), right=True)

    @staticmethod
    def _span(start: Tensor, position: int) -> tuple[int, int]:
        return int(start[position]), int(start[position + 1])


def _blocks(
    spans: Sequence[tuple[int, int]], budget: int
) -> list[list[tuple[int, tuple[int, int]]]]:
    """Consecutive kept classes ``(j, span)`` grouped so that each block holds at most ``budget``
    rows (or one class); classes without rows are left out (their channel stays -1)."""
    blocks: list[list[tuple[int, tuple[int, int]]]] = []
    size = 0
    for j, (a, b) in enumerate(spans):
        if b == a:
            continue
        if not blocks or size + (b - a) > budget:
            blocks.append([])
            size = 0
        blocks[-1].append((j, (a, b)))
        size += b - a
    return blocks


def _stack(
    rows: Sequence[Tensor], keep: Sequence[Tensor | None], dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The kept rows of every class, L2-normalised, as one ``(N, D)`` matrix; its ``(C + 1,)``
    class offsets; each row's index in its class's own rows."""
    chosen = [torch.arange(len(r)) if k is None else k for r, k in zip(rows, keep, strict=True)]
    parts = [F.normalize(r[k].float(), dim=-1, eps=1e-6) for r, k in zip(rows, chosen, strict=True)]
    matrix = torch.cat(parts) if parts else torch.empty(0, dim)
    counts = torch.tensor([len(k) for k in chosen], dtype=torch.long)
    start = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    source = torch.cat(chosen).long() if chosen else torch.zeros(0, dtype=torch.long)
    return matrix.reshape(-1, dim), start, source
