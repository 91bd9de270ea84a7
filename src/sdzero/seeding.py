"""Random streams keyed by integers, so that a draw depends on what it is for, not on batching,
sharding or what ran before it."""

from __future__ import annotations

import hashlib

import torch


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by the first 63 bits of the SHA-256 of ``key`` written as
    ``"k0:k1:..."``, e.g. ``(seed, image index, window index)``. Distinct keys give independent
    streams; the same key always gives the same one."""
    if not key or not all(isinstance(k, int) and not isinstance(k, bool) for k in key):
        raise ValueError(f"a generator key is one or more ints, got {key!r}")
    digest = hashlib.sha256(":".join(str(k) for k in key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
