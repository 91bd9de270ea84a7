"""Backbone-level SD features on the tiny model: noised latents, up-block outputs (DIFT's
features), cross-attention queries (OVDiff's), each against a computation written out here."""

import pytest
import torch
import torch.nn.functional as F
from sd1_layers import SD1_CROSS_ATTENTION

from sdzero.backbones.sd import load_stable_diffusion
from sdzero.backbones.sd_features import (
    diffused_latents,
    query_features,
    unet_features,
    up_block_features,
)

T = 261  # DIFT's timestep


@pytest.fixture(scope="module")
def sd():
    return load_stable_diffusion(None, "tiny", text_encoder=True)


def _images(batch=2, seed=0):
    return torch.rand(batch, 3, 64, 48, generator=torch.Generator().manual_seed(seed))


def _closed_form(sd, latents, eps, t):
    abar = sd.scheduler.alphas_cumprod[t]
    return abar.sqrt() * latents + (1 - abar).sqrt() * eps


@torch.no_grad()
def test_diffused_latents_sample_then_noise_per_image_stream(sd):
    images = _images()
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    got = diffused_latents(sd, images, T, generators=gens())
    assert got.shape == (2, 4, 8, 6)
    expected = []
    for image, g in zip(images, gens(), strict=True):
        dist = sd.vae.encode(image[None] * 2 - 1).latent_dist
        latent = dist.sample(generator=g) * sd.vae.config.scaling_factor
        eps = torch.randn(1, 4, 8, 6, generator=g)  # the same stream continues
        expected.append(_closed_form(sd, latent, eps, T))
    torch.testing.assert_close(got, torch.cat(expected), rtol=0, atol=1e-6)
    # Separate noise generators: the noise is their first draw.
    again = diffused_latents(sd, images, T, generators=gens(), noise_generators=gens())
    assert not torch.allclose(again, got)
    with pytest.raises(ValueError, match="1 generators for 2 images"):
        diffused_latents(sd, images, T, generators=gens()[:1])


@torch.no_grad()
def test_diffused_latents_global_rng_as_dift(sd):
    images = _images(1)
    torch.manual_seed(3)
    got = diffused_latents(sd, images, T)
    torch.manual_seed(3)
    latent = sd.vae.encode(images * 2 - 1).latent_dist.sample() * sd.vae.config.scaling_factor
    expected = _closed_form(sd, latent, torch.randn_like(latent), T)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_up_block_outputs_equal_a_full_pass_in_the_order_asked(sd):
    latents = diffused_latents(sd, _images(), T, generators=[torch.Generator()] * 2)
    prompt = sd.encode_prompt(["a photo of a cat"])
    seen = {}
    handles = [
        sd.unet.up_blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, o))
        for i in (0, 1, 2)
    ]
    context = prompt.expand(2, -1, -1)
    sd.unet(latents, torch.tensor(T), encoder_hidden_states=context)
    for handle in handles:
        handle.remove()
    got = up_block_features(sd, latents, T, prompt, [2, 0])
    assert [tuple(f.shape) for f in got] == [(2, 32, 8, 6), (2, 64, 2, 2)]
    assert torch.equal(got[0], seen[2]) and torch.equal(got[1], seen[0])
    (dift,) = up_block_features(sd, latents, T, prompt, [1])  # up_ft_index=1: 1/16 of 64x48
    assert dift.shape[-2:] == (4, 3) and torch.equal(dift, seen[1])
    with pytest.raises(ValueError, match=r"up blocks \[4\]: expected indices in 0\.\.3"):
        up_block_features(sd, latents, T, prompt, [4])


@torch.no_grad()
def test_query_features_upsample_to_the_largest_grid_and_concatenate(sd):
    latents = diffused_latents(sd, _images(1), 140)
    layers = [SD1_CROSS_ATTENTION[i] for i in (7, 0)]  # up_blocks.1 (2x2) then down (8x6)
    empty = sd.encode_prompt([""])
    got = query_features(sd, latents, 140, empty, layers)
    raw = unet_features(sd, latents, 140, empty, queries=layers, truncate=False)
    assert raw.hw == {layers[0]: (2, 2), layers[1]: (8, 6)}
    up = raw.queries[layers[0]].transpose(1, 2).reshape(1, 64, 2, 2)
    expected = torch.cat(
        [
            F.interpolate(up, size=(8, 6), mode="bilinear", align_corners=False),
            raw.queries[layers[1]].transpose(1, 2).reshape(1, 32, 8, 6),
        ],
        dim=1,
    )
    assert got.shape == (1, 96, 8, 6) and got.dtype == torch.float32
    assert torch.equal(got, expected)
