"""Dense feature extractors for OVDiff prototypes and inference, behind one interface.

Every extractor maps images ``(B, 3, H, W)`` in [0, 1] to features ``(B, D, gh, gw)`` on its grid.
Support images (512², square) go straight in; test-time windows go through :meth:`prepare` first,
which applies OVDiff's per-extractor input size ("Per-extractor input" in the reference notes):
SD windows -> 512², CLIP windows -> 448² (the official torchvision-0.13 tensor resizes: bilinear
without antialias); DINO windows as the official ``ViTFeats.resize`` (:func:`dino_input_size`);
colour windows unchanged. The patch extractors (DINO, colour) drop the last ``H mod p`` rows and
``W mod p`` columns of an input that is not a patch multiple, as the official stride-``p`` patch
convolution does; the window's score map is then stretched over the whole window (official
``predict.py``), dropped border included.

Names accepted by :func:`build_extractor`:

- ``sd``: Stable Diffusion cross-attention queries (OVDiff's 7680-d SD features);
- ``dino`` / ``dino:<vit>``: keys of DINO ViT-B/8's last block (``<vit>`` another
  :data:`~sdzero.backbones.vit.VIT_MODELS` entry, e.g. ``dino:tiny_vit8`` in tests);
- ``clip`` / ``clip:<vit>``: keys of CLIP ViT-B/16's block -2 (``clip:tiny_clip16`` in tests);
- ``colour``: plain colour features of 8×8 patches, no model (known-answer tests, debugging a
  dataset: if ``colour`` cannot separate its classes, neither colour cue nor masks are the issue).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdzero.backbones.attention import resolve_layers
from sdzero.backbones.sd_features import diffused_latents, query_features
from sdzero.backbones.sd_model import StableDiffusion, validate_images
from sdzero.backbones.vit import check_images
from sdzero.backbones.vit_features import build_vit_extractor
from sdzero.seeding import keyed_generator
from sdzero.segmentation.settings import OVDIFF

SD_LAYERS = (0, 6, 7, 8, 9, 10, 11, 12, 15)  # OVDiff's spec "0,6:13,15"
SD_TIMESTEP = OVDIFF.sd_timestep
SD_SEED = 43
SD_INPUT_SIZE = 512
CLIP_INPUT_SIZE = 448
DINO_SHORT_SIDE = 448  # official ViTFeats.input_size, independent of the test short side
DINO_MAX_SIDE = 800
VIT_MODELS = {"dino": "dino_vitb8", "clip": "clip_vitb16"}


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 3, *size)``: bilinear without antialias (torchvision 0.13's tensor
    ``resize``, as the official code resizes its test-time windows); unchanged at that size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False)


def dino_input_size(height: int, width: int) -> tuple[int, int]:
    """The ``(height, width)`` the official code gives DINO for a window of that size.

    ``ViTFeats.resize`` (``predict.py``) keeps a window with both sides <= 448, so crops go in as
    they are; a larger one (the full image) goes through torchvision 0.13's ``resize(img, 448,
    max_size=800)``: the short side becomes 448 and the long one ``int(448 * long / short)``; when
    that exceeds 800 the long side becomes 800 and the short one ``int(800 * 448 / long)``. The full
    image, short side 448, is thus unchanged unless its long side exceeds 800.
    """
    if height <= DINO_SHORT_SIDE and width <= DINO_SHORT_SIDE:
        return height, width
    short, long = min(height, width), max(height, width)
    new_short, new_long = DINO_SHORT_SIDE, int(DINO_SHORT_SIDE * long / short)
    if new_long > DINO_MAX_SIDE:
        new_short, new_long = int(DINO_MAX_SIDE * new_short / new_long), DINO_MAX_SIDE
    return (new_short, new_long) if height <= width else (new_long, new_short)


class FeatureExtractor(nn.Module):
    """Base: ``name`` (as given to :func:`build_extractor`), ``dim`` (D), ``settings`` (everything
    the features depend on, for cache keys), ``prepare(window)`` and ``forward(images)``."""

    name: str
    dim: int

    @property
    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where inputs should be: that of the first buffer (CPU for model-free extractors)."""
        return next(iter(self.buffers()), torch.empty(0)).device

    def prepare(self, window: torch.Tensor) -> torch.Tensor:
        """Test-time window ``(B, 3, h, w)`` in [0, 1] -> the input size this extractor uses."""
        raise NotImplementedError

    def window_features(
        self, windows: torch.Tensor, keys: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """Features of prepared test-time windows ``(B, 3, h, w)``. ``keys[b]``, the ``(image
        index, window index)`` of window ``b``, names its random stream; deterministic extractors
        ignore it."""
        return self(windows)


class SDQueryExtractor(FeatureExtractor):
    """OVDiff's SD features: queries of cross-attention layers ``layers`` (indices among the 16)
    by :func:`~sdzero.backbones.sd_features.query_features`, with OVDiff's seeding and inputs.

    The VAE latent is *sampled* and DDPM-noised to ``timestep`` with Gaussian noise: for support
    images both from CPU generators seeded ``seed``, re-seeded for the noise as officially (so the
    noise equals the sample's epsilon); for test-time windows both from one stream per window,
    keyed by ``(seed, image index, window index)`` (see :meth:`window_features`). One UNet pass
    with the empty-prompt embedding runs up to the last read layer; the queries, upsampled to the
    largest grid (64² for 512² input) and concatenated in layer order, are ``(B, sum C, H/8, W/8)``
    (7680-d for SD 1.5). Windows are resized to ``input_size``² first (bilinear, no antialias).
    """

    name = "sd"

    def __init__(
        self,
        sd: StableDiffusion,
        layers: Sequence[int] = SD_LAYERS,
        timestep: int = SD_TIMESTEP,
        seed: int = SD_SEED,
        input_size: int = SD_INPUT_SIZE,
    ) -> None:
        super().__init__()
        self.sd = sd
        self.layer_indices = [int(i) for i in layers]
        self.layers = resolve_layers(sd.unet, self.layer_indices)
        self.timestep = int(timestep)
        self.seed = int(seed)
        self.input_size = int(input_size)
        self.dim = sum(sd.unet.get_submodule(p).to_q.out_features for p in self.layers)
        with torch.no_grad():
            self.register_buffer("empty_prompt", sd.encode_prompt([""]), persistent=False)

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backbone": self.sd.source,
            "arch": self.sd.arch,
            "dtype": str(self.sd.dtype),
            "layers": self.layer_indices,
            "timestep": self.timestep,
            "seed": self.seed,
            "input_size": self.input_size,
            "noise": "vae_epsilon",  # support noise = the VAE sample's epsilon (official)
        }

    def prepare(self, window: torch.Tensor) -> torch.Tensor:
        return resize(window, (self.input_size, self.input_size))

    def _seeded(self, count: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(self.seed) for _ in range(count)]

    def window_features(
        self, windows: torch.Tensor, keys: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """Officially every window's pass draws a fresh VAE sample and noise from the global RNG;
        here each window has its own stream keyed by ``(seed, *keys[b])``, so the draws are fresh
        per window yet reproducible, resumable and independent of batching and sharding."""
        return self(windows, generators=[keyed_generator(self.seed, *key) for key in keys])

    @torch.no_grad()
    def forward(
        self,
        images: torch.Tensor,
        *,
        truncate: bool = True,
        generators: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """``(B, 3, H, W)`` [0, 1] -> ``(B, dim, H/8, W/8)`` float32 (``truncate=False``: tests).

        ``generators``: one per image, for its VAE sample and then its noise. Default (the official
        support-image features, ``gen_proto_sd.py``): the VAE sample and the noise each take a
        generator freshly seeded ``seed``, so the noise repeats the posterior sample's epsilon.
        """
        validate_images(images)
        # One generator per image: an image's features do not depend on the rest of its batch.
        if generators is None:
            count = len(images)
            noisy = diffused_latents(
                self.sd,
                images,
                self.timestep,
                generators=self._seeded(count),
                noise_generators=self._seeded(count),
            )
        else:
            noisy = diffused_latents(self.sd, images, self.timestep, generators=generators)
        return query_features(
            self.sd, noisy, self.timestep, self.empty_prompt, self.layers, truncate=truncate
        )


class ViTKeyExtractor(FeatureExtractor):
    """DINO/CLIP attention keys (``kind`` "dino" or "clip") of ``model`` (a ``VIT_MODELS`` name).

    ``(B, 3, H, W)`` -> ``(B, 768, H // p, W // p)`` for the ViT-B models (remainder rows and
    columns dropped). Test-time windows: CLIP resizes to ``448²``; DINO to
    :func:`dino_input_size` (unchanged for crops and a full image up to 800 px long); both
    bilinear without antialias.
    """

    def __init__(
        self, kind: str, model: str | None = None, weights: str = OVDIFF.vit_weights
    ) -> None:
        super().__init__()
        if kind not in VIT_MODELS:
            raise ValueError(
                f"ViT extractor kind must be one of {sorted(VIT_MODELS)}, got {kind!r}"
            )
        self.kind = kind
        self.model_name = model or VIT_MODELS[kind]
        self.weights = weights
        self.name = kind if model is None else f"{kind}:{model}"
        # Seeded so that random test weights, and thus cached prototypes, are reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.vit = build_vit_extractor(self.model_name, weights, facet="key")
        self.dim = self.vit.dim
        self.patch_size = self.vit.patch_size

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_name,
            "weights": self.weights,
            "block": self.vit.block,
            "facet": self.vit.facet,
        }

    def prepare(self, window: torch.Tensor) -> torch.Tensor:
        if self.kind == "clip":
            return resize(window, (CLIP_INPUT_SIZE, CLIP_INPUT_SIZE))
        return resize(window, dino_input_size(*window.shape[-2:]))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images.to(self.vit.mean.device)).float()


class ColourExtractor(FeatureExtractor):
    """Plain colour features of ``patch``×``patch`` pixel patches, no model: ``(B, 7, H/p, W/p)``.

    Channels 0-2: the patch mean of ``2·RGB − 1`` (centred, so that cosine similarity tells hues
    apart instead of seeing every colour in the positive octant); channels 3-5: the per-channel
    standard deviation within the patch (texture); channel 6: a constant 0.5, so that near-grey
    patches (centred to almost zero) keep a stable direction instead of one set by noise and tint.
    Windows keep their size; as in the ViTs, the last ``H mod p`` rows and ``W mod p`` columns
    fall outside every patch.
    """

    name = "colour"

    def __init__(self, patch: int = 8) -> None:
        super().__init__()
        self.patch_size = int(patch)
        self.dim = 7

    @property
    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "patch": self.patch_size, "version": 2}

    def prepare(self, window: torch.Tensor) -> torch.Tensor:
        return window

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.patch_size)
        x = images.float()
        mean = F.avg_pool2d(x, self.patch_size)
        var = F.avg_pool2d(x * x, self.patch_size) - mean * mean
        const = torch.full_like(mean[:, :1], 0.5)
        return torch.cat([2 * mean - 1, var.clamp(min=0).sqrt(), const], dim=1)


def build_extractor(
    name: str,
    *,
    sd: StableDiffusion | None = None,
    vit_weights: str = OVDIFF.vit_weights,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """The extractor called ``name`` (see the module docstring), on ``device``.

    ``sd`` (loaded with ``text_encoder=True``, for the empty prompt) is required for ``sd``;
    ``vit_weights`` ("pretrained" | "random" | checkpoint path) applies to ``dino``/``clip``.
    """
    kind, _, variant = str(name).partition(":")
    if kind == "sd" and not variant:
        if sd is None:
            raise ValueError("extractor 'sd' needs the loaded Stable Diffusion: pass sd=")
        extractor: FeatureExtractor = SDQueryExtractor(sd)
    elif kind in VIT_MODELS:
        extractor = ViTKeyExtractor(kind, variant or None, vit_weights)
    elif kind == "colour" and not variant:
        extractor = ColourExtractor()
    else:
        raise ValueError(
            f"unknown feature extractor {name!r}; expected 'sd', 'dino[:<vit>]', 'clip[:<vit>]' "
            "or 'colour'"
        )
    return extractor.to(device)
