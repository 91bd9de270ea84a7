"""LightningModule of the prompt-optimisation correspondence method: one test_step per image pair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdzero.backbones.sd import as_dtype, load_stable_diffusion
from sdzero.correspondence.fitting import FitConfig, PromptCorrespondence
from sdzero.errors import ConfigError, InputError
from sdzero.evaluation import EvaluationModule
from sdzero.settings import build_settings
from sdzero.tasks.correspondence import CorrespondenceTask, Scoring
from sdzero.tasks.frames import ModelFrame


@dataclass(frozen=True)
class CorrespondenceSettings(FitConfig):
    """Every ``method.*`` key of ``ldm_corr``: the fitting loop's (:class:`FitConfig`) plus the
    model frame and the scoring (:class:`~sdzero.tasks.correspondence.Scoring`). Defaults
    reproduce the official code; the ``*_ldm`` experiments set the official scoring.

    ``pck_threshold``: ``bbox-target`` | ``bbox-source`` | ``bbox-keypoints`` |
    ``bbox-keypoints-padded`` | ``image`` | ``bbox-target-xscale`` (the official CUB quirk, in
    ``pck_frame=resized`` only), measured in ``pck_frame``: ``original`` pixels of the target, or
    ``resized`` (the model frame, as the official code measures).
    """

    resize: str = "stretch"  # stretch (official) | letterbox (keeps the aspect ratio)
    pck_threshold: str = "bbox-target"
    pck_frame: str = "original"  # original (target pixels) | resized (model frame, official)
    pck_alphas: tuple[float, ...] = (0.05, 0.1, 0.15)
    pck_inclusive: bool = True  # <= (official, DIFT) | < (SD-DINO)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scoring()  # validates the scoring keys

    def scoring(self) -> Scoring:
        return Scoring(
            threshold=self.pck_threshold,
            frame=self.pck_frame,
            alphas=self.pck_alphas,
            inclusive=self.pck_inclusive,
            image_size=self.image_size,
            resize=self.resize,
        )


def check_query_points(
    points: torch.Tensor, width: int, height: int, image: str = "source image"
) -> None:
    """:class:`InputError` unless every ``(x, y)`` of ``points`` ``(N, 2)`` (pixels of the original
    source image, edges included) lies in the ``width`` x ``height`` image named ``image``."""
    outside = (
        (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (points[:, 1] > height)
    )
    if outside.any():
        bad = points[outside][0].tolist()
        raise InputError(
            f"query point {bad} lies outside the {width}x{height} (w x h) {image}; expected "
            f"0 <= x <= {width} and 0 <= y <= {height}"
        )


class PromptCorrespondenceModule(EvaluationModule):
    """Hedlin et al.'s method as an evaluation module; ``settings`` are the ``method.*`` keys of
    :class:`CorrespondenceSettings` (the single source of their defaults)."""

    settings_class = CorrespondenceSettings

    def __init__(
        self,
        backbone: dict[str, Any],
        seed: int = 0,
        **settings: Any,
    ) -> None:
        super().__init__()
        self.fit_cfg = build_settings(CorrespondenceSettings, settings)
        self.backbone_dtype = as_dtype(backbone.get("dtype", "float32"), "backbone.dtype")
        self.backbone_cfg = dict(backbone)
        self.seed = int(seed)
        self.sd = None
        self.method: PromptCorrespondence | None = None

    def setup(self, stage: str) -> None:
        """Load the backbone; under a Trainer, also build the task over the datamodule's
        ``category_names`` (``sdzero match`` calls this without one and needs no metric)."""
        if self._trainer is not None:
            datamodule = self.trainer.datamodule
            if not hasattr(datamodule, "category_names"):
                raise ConfigError(
                    f"{type(self).__name__} needs a keypoint-pair datamodule; "
                    f"{type(datamodule).__name__} lacks category_names"
                )
            self.task = CorrespondenceTask(self.fit_cfg.scoring(), datamodule.category_names)
        if self.sd is None:
            cfg = self.backbone_cfg
            self.sd = load_stable_diffusion(cfg["weights"], cfg["arch"], dtype=self.backbone_dtype)
            self.random_weights = bool(self.sd.random_weights)
            self.method = PromptCorrespondence(self.sd, self.fit_cfg)

    # -------------------------------------------------------------------------------- one pair
    def predict_pair(
        self, src_img: torch.Tensor, trg_img: torch.Tensor, src_kps: torch.Tensor, index: int = 0
    ) -> torch.Tensor:
        """Predicted target points ``(N, 2)`` in ORIGINAL target pixels for source points ``(N, 2)``
        in original source pixels; images are ``(3, H, W)`` uint8."""
        size = self.fit_cfg.image_size
        resize = self.fit_cfg.resize
        src_frame = ModelFrame(int(src_img.shape[2]), int(src_img.shape[1]), size, resize)
        trg_frame = ModelFrame(int(trg_img.shape[2]), int(trg_img.shape[1]), size, resize)
        check_query_points(src_kps, src_frame.w, src_frame.h)
        pred = self.method.match(
            src_frame.image(src_img).to(self.device),
            trg_frame.image(trg_img).to(self.device),
            src_frame.to_model(src_kps.float()),
            seed=self.seed,
            index=index,
        )
        return trg_frame.to_original(pred.cpu())

    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """``(N, 2)`` predicted target points of the pair, in original target pixels."""
        return self.predict_pair(
            batch["src_img"], batch["trg_img"], batch["src_kps"], batch["index"]
        )
