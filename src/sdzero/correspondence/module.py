"""LightningModule of the prompt-optimisation correspondence method: one test_step per image pair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdzero.correspondence.base import CorrespondenceModule, PairInfo, ScoringSettings
from sdzero.correspondence.fit_config import FitConfig
from sdzero.correspondence.fitting import PromptCorrespondence
from sdzero.evaluation import SmokeTest
from sdzero.settings import build_settings


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
        self.method: PromptCorrespondence | None = None

    def setup(self, stage: str) -> None:
        """Build the task (under a Trainer) and load the backbone."""
        super().setup(stage)
        if self.method is None:
            self.method = PromptCorrespondence(self.load_sd(), self.settings)

    def match(
        self, src: torch.Tensor, trg: torch.Tensor, points: torch.Tensor, pair: PairInfo
    ) -> torch.Tensor:
        """Fit the prompts on the source, apply them to the target (per-pair random streams)."""
        return self.method.match(src, trg, points, seed=self.seed, index=pair.index)
