"""The student's frozen features: named parts fused on one grid, computed once per image.

A part maps model-frame images ``(B, 3, S, S)`` in [0, 1] to ``(B, C, h, w)`` features and says its
``channels``. Built-in parts (``method.backbones``):

- ``sd``: Stable Diffusion up-block features as DIFT computes them
  (:class:`~sdzero.correspondence.dift.DIFT`'s ``features``: the noised posterior sample of the
  image at ``method.sd_timestep``, one UNet pass cut after up block ``method.sd_up_ft_index``,
  conditioned on ``method.sd_prompt``, averaged over ``method.sd_ensemble_size`` noise draws);
- ``dino``: the tokens (or keys) of a DINOv2 / DINO block (``method.dino_model``, read by
  :func:`~sdzero.backbones.vit_features.build_vit_extractor` through the feature tap) on the
  frame resized to ``method.dino_size``;
- ``colour``: the frame's mean colour per cell of a ``method.colour_grid`` grid (no weights; for
  tests and as a floor).

:class:`FrozenBackbone` resamples every part bilinearly to one grid (``method.grid``, or the
finest part's), L2-normalises each part per cell (each part weighs the same, as SD+DINO fuses)
and concatenates them. :func:`register_part` adds a part.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdzero.backbones.vit_features import build_vit_extractor
from sdzero.correspondence.dift import DIFT


class SDPart(nn.Module):
    """DIFT's up-block features of the frame (see the module docstring)."""

    def __init__(self, settings: Any, backbone: dict[str, Any], seed: int) -> None:
        super().__init__()
        s = settings
        self.dift = DIFT(
            backbone,
            seed,
            image_size=s.image_size,
            resize=s.resize,
            timestep=s.sd_timestep,
            up_ft_index=s.sd_up_ft_index,
            prompt=s.sd_prompt,
            ensemble_size=s.sd_ensemble_size,
            match_resolution="cell",
        )
        self.dift.setup("fit")  # loads the backbone group's Stable Diffusion
        self.random_weights = bool(self.dift.random_weights)
        out_channels = tuple(reversed(self.dift.sd.unet.config.block_out_channels))
        self.channels = int(out_channels[s.sd_up_ft_index])

    def forward(self, images: torch.Tensor, names: Sequence[str], category: str) -> torch.Tensor:
        return self.dift.features(images, names, category)


class DINOPart(nn.Module):
    """A ViT block's tokens of the frame resized to ``dino_size`` (bilinear, antialiased)."""

    def __init__(self, settings: Any, backbone: dict[str, Any], seed: int) -> None:
        super().__init__()
        s = settings
        self.vit = build_vit_extractor(s.dino_model, s.dino_weights, s.dino_block, s.dino_facet)
        self.size = int(s.dino_size)
        self.random_weights = s.dino_weights == "random"
        self.channels = int(self.vit.dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, names: Sequence[str], category: str) -> torch.Tensor:
        size = (self.size, self.size)
        resized = F.interpolate(images, size=size, mode="bilinear", antialias=True)
        return self.vit(resized.clamp(0, 1))


class ColourPart(nn.Module):
    """The mean colour of each cell of a ``colour_grid`` grid."""

    channels = 3
    random_weights = False

    def __init__(self, settings: Any, backbone: dict[str, Any], seed: int) -> None:
        super().__init__()
        self.grid = int(settings.colour_grid)

    def forward(self, images: torch.Tensor, names: Sequence[str], category: str) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, self.grid)


PartFactory = Callable[[Any, dict[str, Any], int], nn.Module]
PARTS: dict[str, PartFactory] = {"sd": SDPart, "dino": DINOPart, "colour": ColourPart}


def register_part(name: str, factory: PartFactory, *, replace: bool = False) -> None:
    """Add a part: ``factory(settings, backbone group, seed)`` -> a module with ``channels``,
    ``random_weights`` and ``forward(images, names, category)``."""
    if name in PARTS and not replace:
        raise ValueError(f"student feature part {name!r} is already registered")
    PARTS[name] = factory


class FrozenBackbone(nn.Module):
    """The fused frozen features of ``settings.backbones`` (see the module docstring).

    ``settings`` and ``seed`` are kept for the feature cache's key
    (:class:`~sdzero.backbones.feature_cache.MethodFeatureCache` reads them from the module it
    is given); the cached tensor is the fused map in ``method.cache_dtype``.
    """

    def __init__(self, settings: Any, backbone: dict[str, Any], seed: int) -> None:
        super().__init__()
        self.settings, self.seed = settings, int(seed)
        self.parts = nn.ModuleDict(
            {n: PARTS[n](settings, backbone, seed) for n in settings.backbones}
        )
        self.requires_grad_(False)
        self.eval()
        self.random_weights = any(bool(p.random_weights) for p in self.parts.values())
        self.channels = sum(int(p.channels) for p in self.parts.values())
        uses_prompt = "sd" in settings.backbones and "{category}" in settings.sd_prompt
        self.features_use_category = uses_prompt

    def train(self, mode: bool = True) -> FrozenBackbone:
        return super().train(False)  # frozen: never in training mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor, names: Sequence[str], category: str) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, channels, g, g)`` float32."""
        maps = [part(images, names, category).float() for part in self.parts.values()]
        side = self.settings.grid or max(m.shape[-1] for m in maps)
        fused = [
            F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False)
            if m.shape[-2:] != (side, side)
            else m
            for m in maps
        ]
        return torch.cat([F.normalize(m, dim=1) for m in fused], dim=1)
