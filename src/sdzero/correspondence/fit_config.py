"""The settings of the prompt-optimisation fitting loop (:class:`FitConfig`), defaults and checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdzero.correspondence.crop_encoder import CROP_ENCODERS
from sdzero.correspondence.crops import crop_size

AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
GAUSSIAN_GRIDS = ("index", "center")
TRAIN_TIMESTEPS = 1000  # the SD noise schedule's length
LOWER_BOUNDS = {  # integer keys and their smallest valid value
    "steps": 0,
    "num_embeddings": 1,
    "inference_crops": 1,
    "image_size": 64,
    "token": 0,
    "batch_size": 0,
    "early_stop_patience": 0,
    "prefetch_batch": 0,
}


@dataclass(frozen=True)
class FitConfig:
    """Hyper-parameters of the fitting loop: each is a ``method.*`` key, and these defaults (the
    official code's: SD 1.4, DDIM-50 grid, ``eval/eval.py``'s digits) are its only definition."""

    steps: int = 129  # Adam steps per embedding
    lr: float = 0.0023755632081200314  # Adam learning rate (the official digits of a tuned value)
    num_embeddings: int = 5  # independent random restarts per query point (averaged at readout)
    inference_crops: int = 20  # target crops per embedding: 4 corners, then around the argmax
    layers: tuple[int | str, ...] = (7, 8, 9, 10)  # of the 16 cross-attention layers (or paths):
    # up 16x16 x3 + first up 32x32 (the official "layers 5-8" of the maps with <= 32^2 queries)
    heads: tuple[int, ...] | None = (4, 5, 6, 7)  # official quirk: attn[h // 2:]; None = all
    sigma: float = 27.97853316316864  # Gaussian target std, px at S=512 (scaled with image_size)
    gaussian_grid: str = "index"  # target at pixel indices 0..S-1 (official) | "center" (i + 0.5)
    opt_timestep: int = 140  # t while optimising: timesteps[-8] of the DDIM-50 grid
    infer_timestep: int = 40  # t at inference: the official code hard-codes timesteps[-3]
    noise: str = "uniform"  # official quirk: torch.rand_like, U[0, 1) | "gaussian": N(0, 1)
    crop_fraction: float = (
        0.9316549294381423  # crop side / image side (official 93.165...%: 477 px)
    )
    crop_margin: float = 0.15  # the query stays >= this fraction of the crop side from its border
    image_size: int = 512  # model frame side S
    token: int = 1  # the conditioning token whose map is supervised and read
    batch_size: int = 5  # (query, embedding) items per UNet call (bounds memory); 0 = all of a pair
    truncate: bool = True  # stop the UNet after the last read layer (exact: same maps, same grads)
    cache_latents: bool = True  # encode each distinct crop of an image once (exact)
    channels_last: bool = False  # NHWC convolutions (exact to rounding; not faster on AVX2 CPUs)
    prefetch_batch: int = 0  # > 0: a pair's fit crops encoded up front, this many a VAE call
    # Options beyond exact, off by default (their measured effects: README, "Speed options"):
    autocast: str | None = None  # "bf16" | "fp16" (GPU): UNet and VAE under torch.autocast
    checkpointing: bool = False  # gradient checkpointing: less memory, one more partial forward
    shared_crop: bool = False  # one crop per step for all restarts of a query point
    early_stop_patience: int = 0  # > 0: an item stops after this many steps without improvement
    early_stop_delta: float = 0.01  # relative improvement of the loss EMA that resets patience
    flip_target: bool = False  # also infer on the mirrored target; keep the sharper orientation
    crop_encoder: str = "vae"  # "vae" (exact) | "vae_bf16" | "taesd": see crop_encoder.py
    taesd_weights: str | None = "madebyollin/taesd"  # crop_encoder=taesd: hub id | folder | null

    def __post_init__(self) -> None:
        for name, low in LOWER_BOUNDS.items():
            if getattr(self, name) < low:
                raise ValueError(f"method.{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("lr", "sigma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"method.{name} must be a finite number > 0, got {value}")
        for name in ("opt_timestep", "infer_timestep"):
            if not 0 <= getattr(self, name) < TRAIN_TIMESTEPS:
                raise ValueError(
                    f"method.{name} must lie in 0..{TRAIN_TIMESTEPS - 1}, got {getattr(self, name)}"
                )
        if not self.layers:
            raise ValueError("method.layers must name at least one cross-attention layer")
        if self.heads is not None and (
            not self.heads or min(self.heads) < 0 or len(set(self.heads)) != len(self.heads)
        ):
            raise ValueError(
                f"method.heads must be null or distinct head indices >= 0, got {list(self.heads)}"
            )
        if self.inference_crops < 4 and self.inference_crops != 1:
            raise ValueError(
                "method.inference_crops must be 1 (one corner) or >= 4 (4 corners first)"
            )
        if self.image_size % 64:
            raise ValueError(f"method.image_size must be a multiple of 64, got {self.image_size}")
        if self.gaussian_grid not in GAUSSIAN_GRIDS:
            raise ValueError(
                f"method.gaussian_grid must be one of {GAUSSIAN_GRIDS}, got {self.gaussian_grid!r}"
            )
        if self.noise not in {"uniform", "gaussian"}:
            raise ValueError(f"method.noise must be 'uniform' or 'gaussian', got {self.noise!r}")
        if not 0 < self.crop_margin < 0.5:
            raise ValueError(f"method.crop_margin must lie in (0, 0.5), got {self.crop_margin}")
        if self.autocast not in AUTOCAST:
            raise ValueError(
                f"method.autocast must be one of {sorted(AUTOCAST, key=str)}, got {self.autocast!r}"
            )
        if not 0 <= self.early_stop_delta < 1:
            raise ValueError(
                f"method.early_stop_delta must lie in [0, 1), got {self.early_stop_delta}"
            )
        if self.crop_encoder not in CROP_ENCODERS:
            raise ValueError(
                f"method.crop_encoder must be one of {CROP_ENCODERS}, got {self.crop_encoder!r}"
            )
        crop_size(self.image_size, self.crop_fraction)
