"""Sharding a test split over ranks without repeating samples, even with more ranks than samples.

Rank ``r`` of ``w`` gets the indices ``r, r + w, ...``: the shares are disjoint and cover the split.
A rank left with none gets one *padding* sample (``{"index": -1, "padding": True}``): every rank
then runs its loop, so the collective calls of the epoch's end (metric sync, timing gather) stay
matched, and the padding contributes nothing (the method skips it; the run's callbacks ignore it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import Dataset, Sampler

PADDING: dict[str, Any] = {"index": -1, "id": "", "padding": True}


class ShardSampler(Sampler[int]):
    """Indices of rank ``rank``'s share of ``range(length)``; ``[length]`` (padding) if none."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size)) or [length]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class Padded(Dataset):
    """``dataset`` plus index ``len(dataset)``: the padding sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset) + 1

    def __getitem__(self, index: int) -> Any:
        return dict(PADDING) if index == len(self.dataset) else self.dataset[index]
