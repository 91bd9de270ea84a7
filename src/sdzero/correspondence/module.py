"""LightningModule of the prompt-optimisation correspondence method: one test_step per image pair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdzero.backbones.architectures import check_attention_choice
from sdzero.backbones.tiny_autoencoder import load_tiny_autoencoder
from sdzero.correspondence.base import CorrespondenceModule, PairInfo, ScoringSettings
from sdzero.correspondence.crop_encoder import TinyCrops
from sdzero.correspondence.fit_config import FitConfig
from sdzero.correspondence.fitting import PromptCorrespondence
from sdzero.errors import ConfigError
from sdzero.evaluation import SmokeTest
from sdzero.settings import build_settings


def prepare_backbone(sd: Any, cfg: FitConfig) -> Any:
    """Put ``sd`` in the memory format ``cfg.channels_last`` asks for: 4-D weights NHWC (the
    convolutions then run on NHWC activations) or NCHW. The same values, so results agree to
    float rounding; which is faster depends on the shapes and the device (README). Returns
    ``sd``."""
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return sd.to(memory_format=fmt)


@dataclass(frozen=True)
class CorrespondenceSettings(FitConfig, ScoringSettings):
    """Every ``method.*`` key of ``ldm_corr``: the fitting loop's (:class:`FitConfig`) plus the
    model frame and the scoring (:class:`~sdzero.correspondence.base.ScoringSettings`). Defaults
    reproduce the official code; the ``*_ldm`` experiments set the official scoring."""

    def __post_init__(self) -> None:
        FitConfig.__post_init__(self)
        ScoringSettings.__post_init__(self)


class PromptCorrespondenceModule(CorrespondenceModule):
    """Hedlin et al.'s method as an evaluation module; ``settings`` are the ``method.*`` keys of
    :class:`CorrespondenceSettings` (the single source of their defaults)."""

    settings_class = CorrespondenceSettings
    smoke_test = SmokeTest(
        "demo_correspondence",
        (
            "data.num_pairs=3",
            "method.steps=2",
            "method.num_embeddings=2",
            "method.inference_crops=4",
        ),
        batching=(("method.batch_size=1",), ("method.batch_size=0", "method.cache_latents=false")),
    )

    def __init__(self, backbone: dict[str, Any], seed: int = 0, **settings: Any) -> None:
        super().__init__(backbone, seed)
        self.settings = build_settings(CorrespondenceSettings, settings)
        # before any model loads: the layer indices and heads the named architecture has
        check_attention_choice(
            self.settings.layers, self.settings.heads, self.backbone_cfg.get("arch")
        )
        self.method: PromptCorrespondence | None = None

    def setup(self, stage: str) -> None:
        """Build the task (under a Trainer) and load the backbone."""
        super().setup(stage)
        if self.method is None:
            sd = prepare_backbone(self.load_sd(), self.settings)
            try:
                self.method = PromptCorrespondence(sd, self.settings)
            except ValueError as err:  # layer paths or indices this (unnamed) UNet lacks
                raise ConfigError(f"method.layers={list(self.settings.layers)}: {err}") from err
            if self.settings.crop_encoder == "taesd":  # loaded now, registered to move with us
                self.taesd = load_tiny_autoencoder(self.settings.taesd_weights)
                self.random_weights |= self.taesd.random_weights
                self.method.crop_encoder = TinyCrops(sd, self.taesd)

    def match(
        self, src: torch.Tensor, trg: torch.Tensor, points: torch.Tensor, pair: PairInfo
    ) -> torch.Tensor:
        """Fit the prompts on the source, apply them to the target (per-pair random streams)."""
        return self.method.match(src, trg, points, seed=self.seed, index=pair.index)
