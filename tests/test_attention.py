"""Cross-attention capture on the tiny UNet: names, shapes, normalisation, truncation exactness."""

import pytest
import torch
from sd1_layers import SD1_CROSS_ATTENTION

from sdzero.backbones.attention import (
    AttentionCapture,
    cross_attention_layers,
    probs_to_maps,
    resolve_layers,
)
from sdzero.backbones.sd import load_stable_diffusion

EXPECTED = list(SD1_CROSS_ATTENTION)


@pytest.fixture(scope="module")
def unet():
    return load_stable_diffusion(None, "tiny").unet


def _inputs(batch=2, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, side, side, generator=g)
    cond = torch.randn(batch, 77, 32, generator=g)
    return latents, cond


def test_layers_in_execution_order(unet):
    assert cross_attention_layers(unet) == EXPECTED
    # the papers' indices: Hedlin et al.'s 7-10 = three 16x16 up layers + the first 32x32 one
    assert resolve_layers(unet, [10, 7, "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]) == [
        EXPECTED[7],
        EXPECTED[8],
        EXPECTED[10],
    ]
    with pytest.raises(ValueError, match="out of range: this UNet has 16"):
        resolve_layers(unet, [16])
    with pytest.raises(ValueError, match="unknown cross-attention layer 'up_blocks.9'"):
        resolve_layers(unet, ["up_blocks.9"])


def test_execution_order_matches_a_forward_trace(unet):
    seen = []
    hooks = [
        unet.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: seen.append(n))
        for name in EXPECTED
    ]
    latents, cond = _inputs(1)
    with torch.no_grad():
        unet(latents, 10, encoder_hidden_states=cond)
    for h in hooks:
        h.remove()
    assert seen == EXPECTED


def test_shapes_probabilities_and_grids(unet):
    latents, cond = _inputs(2, side=32)
    with torch.no_grad(), AttentionCapture(unet, [0, 6, 7, 10, 15], heads=[4, 5, 6, 7]) as cap:
        got = cap(latents, 140, cond)
    sides = {0: 32, 6: 4, 7: 8, 10: 16, 15: 32}  # latent 32 -> 32/16/8/4 like 64/32/16/8 at 512 px
    for idx, side in sides.items():
        probs = got.probs[EXPECTED[idx]]
        assert probs.shape == (2, 4, side * side, 77)
        assert got.hw[EXPECTED[idx]] == (side, side)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, side * side))
        assert probs.min() >= 0
    maps = probs_to_maps(got.probs[EXPECTED[7]], got.hw[EXPECTED[7]])
    assert maps.shape == (2, 4, 77, 8, 8)
    assert torch.equal(maps[0, 1, 3, 2, 5], got.probs[EXPECTED[7]][0, 1, 2 * 8 + 5, 3])


def test_processors_restored_and_unread_layers_keep_sdpa(unet):
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with AttentionCapture(unet, [7]):
        inside = {k: type(v).__name__ for k, v in unet.attn_processors.items()}
    assert inside[f"{EXPECTED[7]}.processor"] == "CaptureProcessor"
    assert sum(v == "CaptureProcessor" for v in inside.values()) == 1
    assert inside[f"{EXPECTED[8]}.processor"] == before[f"{EXPECTED[8]}.processor"].__name__
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_capturing_does_not_change_the_unet_output(unet):
    latents, cond = _inputs(1)
    with torch.no_grad():
        plain = unet(latents, 140, encoder_hidden_states=cond).sample
        seen = []
        with AttentionCapture(
            unet, [2, 9], truncate=False, queries=True, callback=lambda *a: seen.append(a[:2])
        ) as cap:
            got = cap(latents, 140, cond)
            direct = unet(latents, 140, encoder_hidden_states=cond).sample  # e.g. by a pipeline
    torch.testing.assert_close(got.output, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(direct, plain, atol=1e-5, rtol=1e-5)
    assert seen[:4] == [(EXPECTED[2], "queries"), (EXPECTED[2], "probs")] * 1 + [
        (EXPECTED[9], "queries"),
        (EXPECTED[9], "probs"),
    ]
    assert len(seen) == 8  # two forwards, two layers, two kinds


@pytest.mark.parametrize("heads", [None, [4, 5, 6, 7]])
def test_truncation_gives_identical_maps_and_gradients(unet, heads):
    latents, cond0 = _inputs(2)
    results = []
    calls = []
    hook = unet.up_blocks[3].register_forward_hook(lambda *a: calls.append(1))
    for truncate in (True, False):
        cond = cond0.clone().requires_grad_(True)
        with AttentionCapture(unet, [7, 8, 9, 10], heads=heads, truncate=truncate) as cap:
            got = cap(latents, 140, cond)
        loss = sum((p[..., 1] ** 2).sum() for p in got.probs.values())
        (grad,) = torch.autograd.grad(loss, cond)
        results.append((got.probs, grad))
    hook.remove()
    assert len(calls) == 1  # the truncated pass never reached the last up block
    (p_trunc, g_trunc), (p_full, g_full) = results
    for name in p_full:
        assert torch.equal(p_trunc[name], p_full[name])
    assert torch.equal(g_trunc, g_full)
    assert g_full.abs().sum() > 0


def test_queries_capture(unet):
    latents, cond = _inputs(1)
    with torch.no_grad(), AttentionCapture(unet, [0, 15], probs=False, queries=True) as cap:
        got = cap(latents, 200, cond)
    assert not got.probs
    assert got.queries[EXPECTED[0]].shape == (1, 32 * 32, 32)
    assert got.queries[EXPECTED[15]].shape == (1, 32 * 32, 32)
    attn = unet.get_submodule(EXPECTED[0])
    assert attn.to_q.out_features == 32


def test_bad_arguments(unet):
    with pytest.raises(ValueError, match="probs=True or queries=True"):
        AttentionCapture(unet, [7], probs=False)
    with pytest.raises(ValueError, match=r"heads \[8\] out of range"):
        AttentionCapture(unet, [7], heads=[8])
    cap = AttentionCapture(unet, [7])
    with pytest.raises(RuntimeError, match="must be entered"):
        cap(*_inputs(1)[:1], 10, _inputs(1)[1])
