"""LightningModule of the prompt-optimisation correspondence method: one test_step per image pair."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdzero.backbones.sd import as_dtype, load_stable_diffusion
from sdzero.correspondence.fitting import FitConfig, PromptCorrespondence
from sdzero.correspondence.frames import ModelFrame
from sdzero.errors import InputError
from sdzero.evaluation import EvaluationModule
from sdzero.metrics.pck import PCK, THRESHOLD_KINDS, threshold_size
from sdzero.settings import build_settings

PCK_FRAMES = ("original", "resized")
XSCALE = "bbox-target-xscale"  # the official CUB threshold, see the class docstring


@dataclass(frozen=True)
class CorrespondenceSettings(FitConfig):
    """Every ``method.*`` key of ``ldm_corr``: the fitting loop's (:class:`FitConfig`) plus the
    model frame and the scoring. Defaults reproduce the official code.

    Scoring: ``pck_threshold`` (``bbox-target`` | ``bbox-source`` | ``bbox-keypoints`` |
    ``bbox-keypoints-padded`` | ``image`` | ``bbox-target-xscale``) measured in ``pck_frame``
    (``original`` pixels of the target, or ``resized``: the model frame, as the official code
    measures). ``bbox-target-xscale`` is the official CUB quirk: the target box's longer side in
    original pixels times the x-axis scale only (``S / width``); it needs ``pck_frame=resized``.
    """

    resize: str = "stretch"  # stretch (official) | letterbox (keeps the aspect ratio)
    pck_threshold: str = "bbox-target"
    pck_frame: str = "original"  # original (target pixels) | resized (model frame, official)
    pck_alphas: tuple[float, ...] = (0.05, 0.1, 0.15)
    pck_inclusive: bool = True  # <= (official, DIFT) | < (SD-DINO)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pck_frame not in PCK_FRAMES:
            raise ValueError(
                f"method.pck_frame must be one of {PCK_FRAMES}, got {self.pck_frame!r}"
            )
        ModelFrame(1, 1, self.image_size, self.resize)  # validates method.resize
        if self.pck_threshold == XSCALE and self.pck_frame != "resized":
            raise ValueError(f"method.pck_threshold={XSCALE} is defined in pck_frame=resized only")
        kinds = (*THRESHOLD_KINDS, XSCALE)
        if self.pck_threshold not in kinds:
            raise ValueError(
                f"method.pck_threshold must be one of {kinds}, got {self.pck_threshold!r}"
            )
        alphas = self.pck_alphas
        if not alphas or min(alphas) <= 0 or len(set(alphas)) != len(alphas):
            raise ValueError(f"method.pck_alphas must be distinct numbers > 0, got {list(alphas)}")


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
        run_dir: str | None = None,
        visuals: int = 0,
        **settings: Any,
    ) -> None:
        super().__init__(run_dir=run_dir, visuals=visuals)
        self.fit_cfg = build_settings(CorrespondenceSettings, settings)
        self.backbone_dtype = as_dtype(backbone.get("dtype", "float32"), "backbone.dtype")
        self.backbone_cfg = dict(backbone)
        self.resize = self.fit_cfg.resize
        self.pck_frame = self.fit_cfg.pck_frame
        self.seed = int(seed)
        self.pck_threshold = self.fit_cfg.pck_threshold
        kind = "bbox-target" if self.pck_threshold == XSCALE else self.pck_threshold
        self.metric = PCK(
            alphas=self.fit_cfg.pck_alphas, threshold=kind, inclusive=self.fit_cfg.pck_inclusive
        )
        self.sd = None
        self.method: PromptCorrespondence | None = None

    def setup(self, stage: str) -> None:
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
        src_frame = ModelFrame(int(src_img.shape[2]), int(src_img.shape[1]), size, self.resize)
        trg_frame = ModelFrame(int(trg_img.shape[2]), int(trg_img.shape[1]), size, self.resize)
        check_query_points(src_kps, src_frame.w, src_frame.h)
        pred = self.method.match(
            src_frame.image(src_img).to(self.device),
            trg_frame.image(trg_img).to(self.device),
            src_frame.to_model(src_kps.float()),
            seed=self.seed,
            index=index,
        )
        return trg_frame.to_original(pred.cpu())

    def evaluate(self, batch: dict[str, Any]) -> dict[str, Any]:
        pred = self.predict_pair(
            batch["src_img"], batch["trg_img"], batch["src_kps"], batch["index"]
        )
        return {
            "index": int(batch["index"]),
            "id": str(batch["id"]),
            "category": str(batch["category"]),
            "src_kps": batch["src_kps"].tolist(),
            "trg_kps": batch["trg_kps"].tolist(),
            "pred_kps": [[round(x, 3), round(y, 3)] for x, y in pred.tolist()],
            "src_size": list(batch["src_size"]),
            "trg_size": list(batch["trg_size"]),
            "threshold_size": self._threshold_size(batch),
        }

    def _threshold_size(self, batch: dict[str, Any]) -> float:
        """The length alpha multiplies, in ``pck_frame``."""
        trg_kps, src_bbox, trg_bbox = batch["trg_kps"], batch["src_bbox"], batch["trg_bbox"]
        trg_size = torch.tensor(batch["trg_size"], dtype=torch.float32)
        if self.pck_frame == "resized":
            size = self.fit_cfg.image_size
            src_frame = ModelFrame(*batch["src_size"], size, self.resize)
            trg_frame = ModelFrame(*batch["trg_size"], size, self.resize)
            trg_kps = trg_frame.to_model(trg_kps)
            if self.pck_threshold == XSCALE:  # both sides scaled by the x factor (official CUB)
                trg_bbox = trg_bbox * trg_frame.scale[0]
            else:
                trg_bbox = trg_frame.box_to_model(trg_bbox)
            src_bbox = src_frame.box_to_model(src_bbox)
            trg_size = torch.tensor([float(size), float(size)])
        boxes = {"src_bbox": src_bbox, "trg_bbox": trg_bbox}
        boxes = {k: (None if torch.isnan(v).any() else v.tolist()) for k, v in boxes.items()}
        return threshold_size(
            self.metric.threshold, trg_kps=trg_kps, trg_size=trg_size.tolist(), **boxes
        )

    def scoring_points(self, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pred, target)`` of a record in ``pck_frame`` pixels."""
        pred = torch.tensor(record["pred_kps"], dtype=torch.float64).reshape(-1, 2)
        target = torch.tensor(record["trg_kps"], dtype=torch.float64).reshape(-1, 2)
        if self.pck_frame == "resized":
            frame = ModelFrame(*record["trg_size"], self.fit_cfg.image_size, self.resize)
            pred, target = frame.to_model(pred), frame.to_model(target)
        return pred, target

    def update_metric(self, record: dict[str, Any], batch: dict[str, Any] | None = None) -> None:
        pred, target = self.scoring_points(record)
        self.metric.update(
            pred,
            target,
            index=record["index"],
            category=record["category"],
            threshold_size=record["threshold_size"],
        )

    def summarise(self, computed: dict[str, Any]) -> dict[str, Any]:
        return {
            "task": "correspondence",
            "num_pairs": int(computed["num_pairs"]),
            "num_points": int(computed["num_points"]),
            "pck": computed["pck"],
            "pck_point": computed["pck_point"],
            "threshold": self.pck_threshold,
            "frame": self.pck_frame,
            "per_category": computed["per_category"],
            "seconds_per_pair": computed["seconds_per_sample"],
        }

    def save_visual(self, record: dict[str, Any], batch: dict[str, Any], path: Path) -> None:
        from sdzero.correspondence.viz import draw_matches

        draw_matches(
            batch["src_img"],
            batch["trg_img"],
            batch["src_kps"],
            torch.tensor(record["pred_kps"]),
            batch["trg_kps"],
        ).save(path)
