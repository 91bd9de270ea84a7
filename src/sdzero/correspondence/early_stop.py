"""Per-item early stopping of the fitting loop (an option beyond exact, off by default)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class EarlyStop:
    """Per-item early stopping on a noisy loss: an exponential moving average (0.9) of each item's
    loss; an item stops after ``patience`` consecutive steps in which the EMA did not fall below
    ``(1 - delta)`` times the EMA of its last significant improvement."""

    def __init__(self, items: int, patience: int, delta: float) -> None:
        self.patience = patience
        self.delta = delta
        self.ema = torch.full((items,), float("nan"))
        self.best = torch.full((items,), float("inf"))
        self.stale = torch.zeros(items, dtype=torch.long)
        self.steps = torch.zeros(items, dtype=torch.long)

    def active(self) -> list[int]:
        if self.patience == 0:
            return list(range(len(self.stale)))
        return torch.nonzero(self.stale < self.patience).flatten().tolist()

    def update(self, items: Sequence[int], losses: torch.Tensor) -> None:
        idx = torch.as_tensor(list(items), dtype=torch.long)
        loss = losses.detach().float().cpu()
        prev = self.ema[idx]
        ema = torch.where(prev.isnan(), loss, 0.9 * prev + 0.1 * loss)
        self.ema[idx] = ema
        improved = ema < self.best[idx] * (1 - self.delta)
        self.best[idx] = torch.where(improved, ema, self.best[idx])
        self.stale[idx] = torch.where(improved, 0, self.stale[idx] + 1)
        self.steps[idx] += 1
