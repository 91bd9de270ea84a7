"""Keyed random streams (sdzero.seeding)."""

import hashlib

import pytest
import torch

from sdzero.seeding import keyed_generator


def test_keyed_generator_is_the_sha256_of_the_joined_key():
    digest = hashlib.sha256(b"43:7:2").digest()
    seed = int.from_bytes(digest[:8], "little") & (2**63 - 1)
    want = torch.randn(5, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(torch.randn(5, generator=keyed_generator(43, 7, 2)), want)
    assert keyed_generator(43, 7, 2).initial_seed() == seed
    # Distinct keys (also a permuted or shorter one) give distinct streams.
    seeds = {keyed_generator(*k).initial_seed() for k in [(43, 7, 2), (43, 2, 7), (43, 7), (0,)]}
    assert len(seeds) == 4


def test_keyed_generator_rejects_non_int_keys():
    for key in [(), (1.0,), (True,), ("1",)]:
        with pytest.raises(ValueError, match="one or more ints"):
            keyed_generator(*key)
