"""VAE latents of square crops of one image, each distinct crop box encoded once."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Box = tuple[int, int, int]  # a square crop (x0, y0, side) in model-frame pixels


class LatentCache:
    """VAE latents of square crops of one image, each distinct box encoded once.

    Exact: the encoder is deterministic (posterior mean), so a cached latent is the one a fresh
    encode would give (up to batch-size-dependent float rounding). The four corner crops of a target
    are shared by every item, and the crops of the source recur across steps, restarts and query
    points (at 512 px there are at most 36² distinct crop offsets).
    """

    def __init__(self, encode: Callable[[list[Box]], torch.Tensor], enabled: bool = True) -> None:
        self.encode = encode
        self.enabled = enabled
        self.store: dict[Box, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __call__(self, boxes: Sequence[Box]) -> torch.Tensor:
        """``(len(boxes), 4, S/8, S/8)``; the missing distinct boxes are encoded in one batch.
        Disabled, nothing is kept between calls (a box repeated within one call is still encoded
        once)."""
        if not self.enabled:
            self.store = {}
        missing = list(dict.fromkeys(b for b in boxes if b not in self.store))
        if missing:
            for box, latent in zip(missing, self.encode(missing), strict=True):
                self.store[box] = latent
        self.misses += len(missing)
        self.hits += len(boxes) - len(missing)
        return torch.stack([self.store[b] for b in boxes])

    def prefetch(self, boxes: Sequence[Box], batch: int) -> None:
        """Encode the distinct boxes not yet stored, ``batch`` per encoder call, ahead of their
        use (a pair's optimisation crops: :func:`~sdzero.correspondence.crop_plan.fit_boxes`).
        Exact: the same latents as encoding them when asked (up to float rounding)."""
        if not self.enabled:
            raise ValueError("prefetching needs the cache (method.cache_latents=true)")
        missing = list(dict.fromkeys(b for b in boxes if b not in self.store))
        for start in range(0, len(missing), batch):
            part = missing[start : start + batch]
            for box, latent in zip(part, self.encode(part), strict=True):
                self.store[box] = latent
        self.misses += len(missing)
