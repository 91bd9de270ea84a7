"""TAESD, the tiny distilled autoencoder of Stable Diffusion's latent space, as a crop encoder.

The architecture is diffusers' ``AutoencoderTiny`` (Bohan's TAESD: 3x3 convolutions of 64 channels,
ReLU residual blocks, three stride-2 convolutions; about 1.2 M encoder parameters, ~9x fewer FLOPs
per 512 px encode than the SD VAE's encoder). It outputs latents already on the scale of
``vae.encode(x).latent_dist.mean * 0.18215`` (its ``scaling_factor`` is 1), so its latents stand in
for the VAE's directly: an approximation (a distilled network), never exact.

Weights load like the other backbones': a hub id (``madebyollin/taesd`` for SD 1.x/2.x), a local
folder (``AutoencoderTiny.save_pretrained``), or None for random weights of the architecture
(``channels``: a narrower toy for tests), with a loud warning.
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from sdzero.backbones.errors import WeightsFormatError, WeightsNotFoundError
from sdzero.backbones.sources import classify_weights, hub_offline

log = logging.getLogger(__name__)
TAESD_HUB_ID = "madebyollin/taesd"


class TinyAutoencoder(nn.Module):
    """A frozen ``AutoencoderTiny``: images in [0, 1] -> SD-scaled latents (encoder only used)."""

    def __init__(self, model: nn.Module, source: str, random_weights: bool) -> None:
        super().__init__()
        self.model = model
        self.source = source
        self.random_weights = random_weights
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TinyAutoencoder:
        return super().train(False)  # frozen, as the SD parts

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, 4, H/8, W/8)`` of ``images`` ``(B, 3, H, W)`` in [0, 1], on the SD VAE's
        scaled latent scale (diffusers' encode takes ``2x - 1``)."""
        param = next(self.model.parameters())
        x = images.to(param.device, param.dtype) * 2 - 1
        return self.model.encode(x).latents * self.model.config.scaling_factor


def load_tiny_autoencoder(
    weights: str | None = TAESD_HUB_ID,
    *,
    channels: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> TinyAutoencoder:
    """TAESD from a hub id, a local folder or, with ``weights=None``, random weights of the
    architecture ``channels`` wide (64 = TAESD; seeded; loud warning). Never falls back to random."""
    from diffusers import AutoencoderTiny

    kind, location = classify_weights(weights)
    if kind in ("missing", "file"):
        raise WeightsNotFoundError(
            f"method.taesd_weights={weights!r}: expected a hub id (e.g. {TAESD_HUB_ID}), a folder "
            "written by AutoencoderTiny.save_pretrained, or null for random weights"
        )
    if kind == "random":
        message = (
            f"TAESD crop encoder has RANDOM weights ({channels} channels): its latents are not the "
            "VAE's; set method.taesd_weights to a hub id or folder for real results."
        )
        log.warning(message)
        print(f"!! {message}", file=sys.stderr)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            widths = (channels,) * 4
            model = AutoencoderTiny(
                encoder_block_out_channels=widths, decoder_block_out_channels=widths
            )
        source = f"random:taesd:{channels}:seed={seed}"
    else:
        try:
            model = AutoencoderTiny.from_pretrained(
                location, local_files_only=kind == "folder" or hub_offline()
            )
        except OSError as err:
            error = WeightsFormatError if kind == "folder" else WeightsNotFoundError
            raise error(
                f"TAESD weights {location!r} could not be loaded ({type(err).__name__}: {err}); "
                f"download them with `hf download {TAESD_HUB_ID}` or point at a local folder"
            ) from err
        source = location
    return TinyAutoencoder(model, source, kind == "random").to(device=device, dtype=dtype)
