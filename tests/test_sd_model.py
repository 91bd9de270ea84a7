"""The frozen StableDiffusion module on the tiny architecture: images -> VAE latents, forward
noising, prompt embeddings."""

import pytest
import torch

from sdzero.backbones.sd import StableDiffusion, load_stable_diffusion, sample_noise


@pytest.fixture(scope="module")
def tiny() -> StableDiffusion:
    return load_stable_diffusion(None, "tiny", text_encoder=True, seed=0)


# --- images -> latents -------------------------------------------------------------------------


def test_encode_images_is_the_scaled_posterior_mean_of_2x_minus_1(tiny):
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    latents = tiny.encode_images(images)
    assert latents.shape == (2, 4, 6, 8)
    expected = tiny.vae.encode(images * 2 - 1).latent_dist.mean * 0.18215
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)


def test_encode_images_sample_draws_from_the_posterior(tiny):
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mean = tiny.encode_images(images)
    a = tiny.encode_images(images, sample=True, generator=torch.Generator().manual_seed(5))
    b = tiny.encode_images(images, sample=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, mean)
    posterior = tiny.vae.encode(images * 2 - 1).latent_dist
    z = (a / 0.18215 - posterior.mean) / posterior.std  # standardised draw ~ N(0, 1)
    assert abs(z.mean().item()) < 0.5 and 0.6 < z.std().item() < 1.4


@pytest.mark.parametrize(
    ("images", "problem"),
    [
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float tensor"),
        (torch.rand(1, 1, 32, 32), r"\(B, 3, H, W\).*\(1, 1, 32, 32\)"),
        (torch.rand(1, 4, 32, 32), r"\(1, 4, 32, 32\)"),
        (torch.rand(3, 32, 32), r"\(3, 32, 32\)"),
        (torch.rand(1, 3, 32, 32) * 255, r"\[0, 1\].*max 2"),
        (torch.rand(1, 3, 32, 32) * 2 - 1, r"\[0, 1\].*min -"),
        (torch.rand(1, 3, 36, 32), "multiples of 8; got H=36, W=32"),
        (torch.full((1, 3, 8, 8), float("nan")), r"\[0, 1\].*nan"),
    ],
)
def test_encode_images_rejects_wrong_image_modes(tiny, images, problem):
    with pytest.raises(ValueError, match=problem):
        tiny.encode_images(images)


# --- noising ---------------------------------------------------------------------------------


def test_add_noise_matches_the_closed_form(tiny):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    # Hedlin et al.'s optimisation timestep: sqrt(abar)=0.917, sqrt(1-abar)=0.398.
    assert abs(abar[140].sqrt().item() - 0.917) < 1e-3
    assert abs((1 - abar[140]).sqrt().item() - 0.398) < 1e-3
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.rand(2, 4, 8, 8, generator=gen)
    for t in (0, 140, 200, 999):
        expected = abar[t].sqrt() * latents + (1 - abar[t]).sqrt() * noise
        torch.testing.assert_close(tiny.add_noise(latents, t, noise), expected.float())


def test_add_noise_draws_the_named_noise_reproducibly(tiny):
    latents = torch.zeros(4, 4, 16, 16)
    abar = tiny.scheduler.alphas_cumprod[200]
    uniform = tiny.add_noise(latents, 200, "uniform", torch.Generator().manual_seed(7))
    eps = uniform / (1 - abar).sqrt()
    assert eps.min() >= 0 and eps.max() < 1 + 1e-6 and abs(eps.mean().item() - 0.5) < 0.05
    expected = sample_noise(latents.shape, "uniform", torch.Generator().manual_seed(7))
    torch.testing.assert_close(eps, expected)
    gaussian = tiny.add_noise(latents, 200, "gaussian", torch.Generator().manual_seed(7))
    g = gaussian / (1 - abar).sqrt()
    assert abs(g.mean().item()) < 0.1 and abs(g.std().item() - 1) < 0.1 and g.min() < 0


def test_sample_noise_kinds_and_bad_arguments(tiny):
    u = sample_noise((10_000,), "uniform", torch.Generator().manual_seed(0), dtype=torch.float64)
    assert u.dtype == torch.float64 and u.min() >= 0 and u.max() < 1
    with pytest.raises(ValueError, match="'laplace'.*'uniform' or 'gaussian'"):
        sample_noise((2,), "laplace")
    latents = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 1000\); got 1000"):
        tiny.add_noise(latents, 1000)
    with pytest.raises(ValueError, match="integer; got 0.5"):
        tiny.add_noise(latents, 0.5)
    with pytest.raises(ValueError, match=r"noise shape \(1, 4, 4, 4\)"):
        tiny.add_noise(latents, 10, torch.zeros(1, 4, 4, 4))


# --- prompts ---------------------------------------------------------------------------------


def test_encode_prompt_shape_and_errors(tiny):
    embeddings = tiny.encode_prompt(["a photo of a cat", ""])
    assert embeddings.shape == (2, 77, 32)
    assert not torch.equal(embeddings[0], embeddings[1])
    with pytest.raises(ValueError, match="list of strings"):
        tiny.encode_prompt("a photo of a cat")
    bare = load_stable_diffusion(None, "tiny")
    with pytest.raises(RuntimeError, match="text_encoder=True"):
        bare.encode_prompt(["a cat"])
