"""Semantic segmentation: mIoU over a label space, for any method that predicts a label map.

A prediction is ``(H, W)`` int64 class indices at the ground truth's size. Its record is
``{"index", "id", "mask": "masks/<id>.png"}``; the mask (a single-channel 8-bit PNG) is an artifact
written next to the records before the record itself, and read back when a run resumes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdzero.metrics.miou import MeanIoU
from sdzero.tasks.base import Task
from sdzero.tasks.label_viz import draw_segmentation


def mask_path(sample_id: Any) -> str:
    """A record's mask path, relative to ``predictions/``."""
    return f"masks/{sample_id}.png"


def png_bytes(labels: torch.Tensor) -> bytes:
    """``(H, W)`` class indices (< 256) as a single-channel 8-bit PNG."""
    if int(labels.max()) > 255 or int(labels.min()) < 0:
        raise ValueError(f"mask values {int(labels.min())}..{int(labels.max())} do not fit a PNG")
    buffer = io.BytesIO()
    Image.fromarray(labels.cpu().numpy().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def read_mask(path: Path) -> torch.Tensor:
    """A mask PNG back as ``(H, W)`` int64."""
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).astype(np.int64))


class SegmentationTask(Task):
    """Records with mask PNGs, mIoU, ``metrics.json`` and visuals of a segmentation benchmark."""

    name = "segmentation"

    def __init__(self, class_names: Sequence[str], ignore_index: int | None) -> None:
        self.class_names = list(class_names)
        self.metric = MeanIoU(self.class_names, ignore_index)

    def record(self, batch: dict[str, Any], prediction: torch.Tensor) -> dict[str, Any]:
        return {
            "index": int(batch["index"]),
            "id": str(batch["id"]),
            "mask": mask_path(batch["id"]),
        }

    def artifacts(self, record: dict[str, Any], prediction: torch.Tensor) -> dict[str, bytes]:
        return {record["mask"]: png_bytes(prediction)}

    def record_complete(self, record: dict[str, Any], predictions: Path | None) -> bool:
        """A record counts only with its mask (written before the record, atomically)."""
        mask = record.get("mask")
        return bool(mask) and predictions is not None and (predictions / mask).is_file()

    def update(
        self,
        record: dict[str, Any],
        batch: dict[str, Any],
        prediction: torch.Tensor | None = None,
        predictions: Path | None = None,
    ) -> None:
        if prediction is None:  # reused from an earlier, interrupted run: read its mask back
            if predictions is None:
                raise ValueError("a reused segmentation record needs its predictions/ folder")
            prediction = read_mask(predictions / record["mask"])
        self.metric.update(prediction, batch["label"])

    def summary(self, computed: dict[str, Any]) -> dict[str, Any]:
        return {
            "task": "segmentation",
            # Placeholders keep the contract's key order; the runner fills them in.
            "dataset": None,
            "split_size": None,
            "num_images": computed["num_images"],
            "miou": computed["miou"],
            "per_class_iou": computed["per_class_iou"],
            "seconds_per_image": computed["seconds_per_sample"],
        }

    def tables(self, summary: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
        """``per_class_iou``: one row per class."""
        return {
            "per_class_iou": (
                ["name", "iou"],
                [[k, v] for k, v in summary["per_class_iou"].items()],
            )
        }

    def visual(
        self, record: dict[str, Any], batch: dict[str, Any], prediction: torch.Tensor
    ) -> Image.Image:
        """Image | ground truth | prediction, titled, with the image's IoU and a legend of the
        classes present (:func:`~sdzero.tasks.label_viz.draw_segmentation`)."""
        return draw_segmentation(
            batch["image"],
            batch["label"],
            prediction,
            self.class_names,
            self.metric.ignore_index,
            str(record["id"]),
        )
