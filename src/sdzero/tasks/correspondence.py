"""Semantic correspondence: PCK on keypoint pairs, for any method that predicts target points.

A prediction is ``(N, 2)`` target points ``(x, y)`` in pixels of the ORIGINAL target image, one per
source keypoint of the pair. Errors are measured in ``frame``: ``original`` (target pixels) or
``resized`` (the target stretched/letterboxed to ``image_size``², as the official Hedlin code
measures); ``threshold`` names the length alpha multiplies (:func:`~sdzero.metrics.pck.threshold_size`,
plus ``bbox-target-xscale``, the official CUB quirk: the target box's longer side in original pixels
times the x-axis scale only, defined in the resized frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdzero.metrics.pck import PCK, THRESHOLD_KINDS, threshold_size
from sdzero.tasks.base import Task
from sdzero.tasks.frames import ModelFrame

FRAMES = ("original", "resized")
XSCALE = "bbox-target-xscale"
THRESHOLDS = (*THRESHOLD_KINDS, XSCALE)


@dataclass(frozen=True)
class Scoring:
    """How a correspondence benchmark is scored (no defaults: the method's settings hold them)."""

    threshold: str
    frame: str
    alphas: tuple[float, ...]
    inclusive: bool
    image_size: int  # side of the resized frame
    resize: str  # how the resized frame is made (``stretch`` | ``letterbox``)

    def __post_init__(self) -> None:
        if self.frame not in FRAMES:
            raise ValueError(f"method.pck_frame must be one of {FRAMES}, got {self.frame!r}")
        if self.threshold not in THRESHOLDS:
            raise ValueError(
                f"method.pck_threshold must be one of {THRESHOLDS}, got {self.threshold!r}"
            )
        if self.threshold == XSCALE and self.frame != "resized":
            raise ValueError(f"method.pck_threshold={XSCALE} is defined in pck_frame=resized only")
        alphas = self.alphas
        if not alphas or min(alphas) <= 0 or len(set(alphas)) != len(alphas):
            raise ValueError(f"method.pck_alphas must be distinct numbers > 0, got {list(alphas)}")
        ModelFrame(1, 1, self.image_size, self.resize)  # validates method.resize


class CorrespondenceTask(Task):
    """Records, PCK, ``metrics.json`` and visuals of a correspondence benchmark."""

    name = "correspondence"

    def __init__(self, scoring: Scoring, categories: Sequence[str]) -> None:
        """``categories``: every category of the split (the datamodule's ``category_names``)."""
        self.scoring = scoring
        kind = "bbox-target" if scoring.threshold == XSCALE else scoring.threshold
        self.metric = PCK(
            categories, alphas=scoring.alphas, threshold=kind, inclusive=scoring.inclusive
        )

    def record(self, batch: dict[str, Any], prediction: torch.Tensor) -> dict[str, Any]:
        """``prediction``: ``(N, 2)`` target points in original target pixels."""
        return {
            "index": int(batch["index"]),
            "id": str(batch["id"]),
            "category": str(batch["category"]),
            "src_kps": batch["src_kps"].tolist(),
            "trg_kps": batch["trg_kps"].tolist(),
            "pred_kps": [[round(x, 3), round(y, 3)] for x, y in prediction.tolist()],
            "src_size": list(batch["src_size"]),
            "trg_size": list(batch["trg_size"]),
            "threshold_size": self.threshold_size(batch),
        }

    def _frame(self, size_wh: Any) -> ModelFrame:
        w, h = (int(v) for v in size_wh)
        return ModelFrame(w, h, self.scoring.image_size, self.scoring.resize)

    def threshold_size(self, batch: dict[str, Any]) -> float:
        """The length alpha multiplies for this pair, in the scoring frame."""
        trg_kps, src_bbox, trg_bbox = batch["trg_kps"], batch["src_bbox"], batch["trg_bbox"]
        trg_size = torch.tensor(batch["trg_size"], dtype=torch.float32)
        if self.scoring.frame == "resized":
            size = self.scoring.image_size
            src_frame, trg_frame = self._frame(batch["src_size"]), self._frame(batch["trg_size"])
            trg_kps = trg_frame.to_model(trg_kps)
            if self.scoring.threshold == XSCALE:  # both sides scaled by the x factor (official CUB)
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
        """``(pred, target)`` of a record in the scoring frame's pixels."""
        pred = torch.tensor(record["pred_kps"], dtype=torch.float64).reshape(-1, 2)
        target = torch.tensor(record["trg_kps"], dtype=torch.float64).reshape(-1, 2)
        if self.scoring.frame == "resized":
            frame = self._frame(record["trg_size"])
            pred, target = frame.to_model(pred), frame.to_model(target)
        return pred, target

    def update(
        self,
        record: dict[str, Any],
        batch: dict[str, Any],
        prediction: Any = None,
        predictions: Path | None = None,
    ) -> None:
        pred, target = self.scoring_points(record)
        self.metric.update(
            pred,
            target,
            category=record["category"],
            threshold_size=record["threshold_size"],
        )

    def summary(self, computed: dict[str, Any]) -> dict[str, Any]:
        return {
            "task": "correspondence",
            "num_pairs": int(computed["num_pairs"]),
            "num_points": int(computed["num_points"]),
            "pck": computed["pck"],
            "pck_point": computed["pck_point"],
            "threshold": self.scoring.threshold,
            "frame": self.scoring.frame,
            "per_category": computed["per_category"],
            "seconds_per_pair": computed["seconds_per_sample"],
        }

    def tables(self, summary: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
        """``per_category``: one row per category, one column per alpha."""
        alphas = [str(a) for a in self.scoring.alphas]
        rows = [[name, *(v[a] for a in alphas)] for name, v in summary["per_category"].items()]
        return {"per_category": (["name", *alphas], rows)}

    def visual(self, record: dict[str, Any], batch: dict[str, Any], prediction: Any) -> Image.Image:
        from sdzero.tasks.viz import draw_matches

        return draw_matches(
            batch["src_img"],
            batch["trg_img"],
            batch["src_kps"],
            torch.tensor(record["pred_kps"]),
            batch["trg_kps"],
        )
