"""A fast correspondence student (``method=student``): a light trainable head on frozen features.

Hedlin et al. close their paper with the idea of training a correspondence network on the matches
their method estimates, for fast inference. The student is that network: each image goes once
through frozen backbones (:mod:`sdzero.correspondence.student_features`: Stable Diffusion
up-block features as DIFT computes them and/or DINOv2 tokens, fused on one grid), a small head
(:class:`Head`: a linear projection refined by residual 3x3 convolutions) maps the fused features
to descriptors, and a source point's match is the target cell of highest cosine similarity (or,
with ``method.match_resolution=image``, pixel), so every protocol of the correspondence task
scores it. It trains on any labelled pairs (the pseudo-labels of
:mod:`datamodules.pseudo_labels`, or a benchmark's ground truth) with the loss of
:class:`~sdzero.correspondence.trained.TrainedMatcher`; only the head has weights to learn.

The frozen features of an image are computed once: with ``method.feature_cache`` set they go to
that folder (keyed by the image, the backbone settings and weights, never by the head), so an
epoch reads them instead of running the backbones; checkpoints hold the head alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdzero.backbones.dtypes import as_dtype
from sdzero.backbones.feature_cache import MethodFeatureCache
from sdzero.backbones.vit import vit_names
from sdzero.correspondence.dift import TRAIN_TIMESTEPS, UP_BLOCKS
from sdzero.correspondence.student_features import PARTS, FrozenBackbone
from sdzero.correspondence.trained import TrainedMatcher, TrainingSettings
from sdzero.errors import ConfigError
from sdzero.evaluation import SmokeTest
from sdzero.settings import build_settings

HEAD_KEYS = ("head_channels", "descriptor_dims", "head_layers")
CACHE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class StudentSettings(TrainingSettings):
    """Every ``method.*`` key of ``student``."""

    image_size: int = 768  # side of the model frame (SD reads it; a multiple of 16)
    backbones: tuple[str, ...] = ("sd", "dino")  # frozen parts fused: sd | dino | colour
    sd_timestep: int = 261  # SD part: the noise level of the latents (DIFT's)
    sd_up_ft_index: int = 1  # SD part: the UNet up block read (DIFT's: 1/16 of the side)
    sd_prompt: str = "a photo of a {category}"  # SD part: the prompt (DIFT's)
    sd_ensemble_size: int = 1  # SD part: noise draws averaged (DIFT uses 8; 1 is 8x cheaper)
    dino_model: str = "dinov2_vitb14"  # DINO part: a registered ViT (sdzero.backbones.vit)
    dino_weights: str = "pretrained"  # DINO part: pretrained | random | a checkpoint file
    dino_size: int = 840  # DINO part: side the frame is resized to (a multiple of the patch)
    dino_block: int = -1  # DINO part: the block read
    dino_facet: str = "token"  # DINO part: token (SD+DINO) | key
    colour_grid: int = 32  # colour part: cells per side
    grid: int = 0  # cells per side of the fused map; 0: the finest part's
    cache_dtype: str = "float16"  # dtype of the frozen features stored in method.feature_cache
    head_channels: int = 256  # width of the head
    head_layers: int = 2  # residual 3x3 convolutions of the head
    descriptor_dims: int = 128  # channels of the descriptors matched
    temperature: float = 0.05  # softmax temperature of the loss over target cells
    lr: float = 3e-4
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size < 16 or self.image_size % 16:
            raise ConfigError(f"method.image_size must be a multiple of 16, got {self.image_size}")
        unknown = [b for b in self.backbones if b not in PARTS]
        if not self.backbones or unknown or len(set(self.backbones)) != len(self.backbones):
            raise ConfigError(
                f"method.backbones must list distinct feature parts of {sorted(PARTS)}, got "
                f"{list(self.backbones)}"
            )
        if not 0 <= self.sd_timestep < TRAIN_TIMESTEPS:
            raise ConfigError(f"method.sd_timestep must lie in 0..999, got {self.sd_timestep}")
        if not 0 <= self.sd_up_ft_index < UP_BLOCKS:
            raise ConfigError(f"method.sd_up_ft_index must lie in 0..3, got {self.sd_up_ft_index}")
        if "dino" in self.backbones and self.dino_model not in vit_names():
            raise ConfigError(
                f"method.dino_model must be one of {vit_names()}, got {self.dino_model!r}"
            )
        if self.dino_facet not in ("token", "key"):
            raise ConfigError(f"method.dino_facet must be token or key, got {self.dino_facet!r}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(
                f"method.cache_dtype must be one of {list(CACHE_DTYPES)}, got {self.cache_dtype!r}"
            )
        for key in ("sd_ensemble_size", "dino_size", "colour_grid", "head_channels"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be >= 1, got {getattr(self, key)}")
        if self.descriptor_dims < 1 or self.head_layers < 0:
            raise ConfigError(
                f"method.descriptor_dims must be >= 1 and method.head_layers >= 0 (0: a linear "
                f"head), got {self.descriptor_dims} and {self.head_layers}"
            )
        if self.grid < 0:
            raise ConfigError(f"method.grid must be >= 0 (0: the finest part's), got {self.grid}")


class Head(nn.Module):
    """``(B, C_in, g, g)`` frozen features -> ``(B, dims, g, g)`` descriptors: a 1x1 projection
    to ``channels``, ``layers`` residual blocks (ReLU, 3x3 convolution) and a 1x1 projection to
    ``dims``. At initialisation the blocks add little to the projection, so an untrained head
    is close to a random linear map of the frozen features."""

    def __init__(self, in_channels: int, channels: int, dims: int, layers: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(in_channels, channels, 1)
        self.blocks = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers)
        )
        self.out = nn.Conv2d(channels, dims, 1)
        for block in self.blocks:
            nn.init.normal_(block.weight, std=0.1 / (9 * channels) ** 0.5)
            nn.init.zeros_(block.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.project(features)
        for block in self.blocks:
            x = x + block(torch.relu(x))
        return self.out(x)


class _Frozen:
    """Holds the frozen backbone outside the module tree: it is in no state dict (checkpoints
    hold the head alone) and Lightning neither wraps nor casts it."""

    def __init__(self, module: FrozenBackbone) -> None:
        self.module = module


class Student(TrainedMatcher):
    """The student; ``backbone``: the ``backbone`` group (the SD part's weights); ``settings``:
    the keys of :class:`StudentSettings`."""

    settings_class = StudentSettings
    smoke_test = SmokeTest("demo_student", ("data.num_pairs=3",))

    def __init__(self, backbone: dict[str, Any] | None = None, seed: int = 0, **settings: Any):
        super().__init__(backbone, seed)
        self.settings = build_settings(StudentSettings, settings)
        self.frozen: _Frozen | None = None
        self.head: Head | None = None
        self.feature_cache: MethodFeatureCache | None = None

    def requirements(self) -> list[Any]:
        """The weights of the frozen parts: the ``backbone`` group's SD (``sd``) and the DINO
        weights (``dino``)."""
        from sdzero.requirements import sd_requirements, vit_requirements

        s = self.settings
        needs = sd_requirements(self.backbone_cfg) if "sd" in s.backbones else []
        if "dino" in s.backbones:
            needs += vit_requirements(s.dino_model, s.dino_weights, "method.dino_weights")
        return needs

    @property
    def monitor(self) -> tuple[str, str]:
        """Validation PCK at 0.1 (or the largest alpha scored), higher is better."""
        alphas = [str(a) for a in self.settings.pck_alphas]
        return (f"val/pck@{'0.1' if '0.1' in alphas else max(alphas, key=float)}", "max")

    def setup(self, stage: str) -> None:
        """Load the frozen backbones and build the head (seeded by the run seed), before the
        base loads ``method.checkpoint`` into it."""
        if self.frozen is None:
            frozen = FrozenBackbone(self.settings, self.backbone_cfg, self.seed)
            self.frozen = _Frozen(frozen)
            self.random_weights |= frozen.random_weights
            s = self.settings
            torch.manual_seed(self.seed)
            self.head = Head(frozen.channels, s.head_channels, s.descriptor_dims, s.head_layers)
        super().setup(stage)

    def backbone_features(self, image: torch.Tensor, name: str, category: str) -> torch.Tensor:
        """``(C, g, g)`` frozen features of one ``(1, 3, S, S)`` image (through
        ``method.feature_cache`` when set), in ``method.cache_dtype`` either way, so cached and
        computed features are the same numbers."""
        frozen = self.frozen.module
        if next(frozen.parameters(), torch.empty(0, device=self.device)).device != self.device:
            frozen.to(self.device)
        dtype = as_dtype(self.settings.cache_dtype, "method.cache_dtype")

        def compute() -> torch.Tensor:
            return frozen(image, [name], category)[0].to(dtype)

        s = self.settings
        if s.feature_cache is None:
            return compute()
        if self.feature_cache is None:
            ignored = [f.name for f in fields(TrainingSettings)] + list(HEAD_KEYS)
            bound = int(s.feature_cache_gb * 1e9)
            folder = Path(s.feature_cache).expanduser()
            self.feature_cache = MethodFeatureCache(folder, bound, ignored)
        return self.feature_cache.image_features(frozen, image, name, category, compute)

    def _descriptors(self, maps: torch.Tensor) -> torch.Tensor:
        return self.head(maps.to(self.head.out.weight.dtype))

    def image_features(self, image: torch.Tensor, name: str, category: str) -> torch.Tensor:
        """``(descriptor_dims, g, g)`` descriptors of one ``(1, 3, S, S)`` image."""
        return self._descriptors(self.backbone_features(image, name, category)[None])[0]

    def features(self, images: torch.Tensor, names: Sequence[str], category: str) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, descriptor_dims, g, g)``."""
        return self.training_features(images, names, [category] * len(images))

    def training_features(
        self, images: torch.Tensor, names: Sequence[str], categories: Sequence[str]
    ) -> torch.Tensor:
        """The head on each image's frozen features (gradients reach the head only)."""
        maps = [
            self.backbone_features(image[None], name, category)
            for image, name, category in zip(images, names, categories, strict=True)
        ]
        return self._descriptors(torch.stack(maps))
