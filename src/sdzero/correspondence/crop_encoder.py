"""What turns the fitting loop's crops into latents (``method.crop_encoder``).

- ``vae`` (default, exact): the SD VAE's posterior mean x 0.18215, as the official code;
- ``vae_bf16``: the same VAE under bf16 autocast, the UNet untouched (an option: latents move by
  bf16 rounding; on GPUs and CPUs with native bf16, about twice the VAE's fp32 speed);
- ``taesd``: TAESD, the distilled tiny autoencoder (:mod:`sdzero.backbones.tiny_autoencoder`,
  weights ``method.taesd_weights``): ~9x fewer FLOPs per crop, other latents (an approximation).

Each is a callable ``(B, 3, S, S)`` crops in [0, 1] (model device or CPU) -> ``(B, 4, S/8, S/8)``
float32 latents on the UNet's device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from sdzero.backbones.tiny_autoencoder import TinyAutoencoder, load_tiny_autoencoder

CROP_ENCODERS = ("vae", "vae_bf16", "taesd")
CropEncoder = Callable[[torch.Tensor], torch.Tensor]


class VaeCrops:
    """The SD VAE (posterior mean), optionally under autocast to ``dtype`` (bf16)."""

    def __init__(self, sd, dtype: torch.dtype | None = None) -> None:
        self.sd = sd
        self.dtype = dtype

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        device = self.sd.unet.device
        cast = (
            torch.autocast(device.type, dtype=self.dtype)
            if self.dtype is not None
            else contextlib.nullcontext()
        )
        with cast:
            latents = self.sd.encode_images(crops.to(device, self.sd.vae.dtype))
        return latents.float()


class TinyCrops:
    """TAESD's encoder; it follows the UNet to its device."""

    def __init__(self, sd, tiny: TinyAutoencoder) -> None:
        self.sd = sd
        self.tiny = tiny

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        device = self.sd.unet.device
        if next(self.tiny.parameters()).device != device:
            self.tiny.to(device)
        return self.tiny.encode_images(crops.to(device)).float()


def crop_encoder(sd, cfg, tiny: TinyAutoencoder | None = None) -> CropEncoder:
    """The encoder ``cfg.crop_encoder`` names for ``sd``; ``taesd`` loads ``cfg.taesd_weights``
    unless ``tiny`` is given."""
    if cfg.crop_encoder == "taesd":
        if tiny is None:
            tiny = load_tiny_autoencoder(cfg.taesd_weights, device=sd.unet.device)
        return TinyCrops(sd, tiny)
    return VaeCrops(sd, torch.bfloat16 if cfg.crop_encoder == "vae_bf16" else None)
