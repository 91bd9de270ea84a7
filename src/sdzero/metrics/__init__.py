"""Benchmark metrics as torchmetrics Metrics: PCK for correspondence, dataset mIoU for segmentation."""

from sdzero.metrics.miou import MeanIoU
from sdzero.metrics.pck import PCK, THRESHOLD_KINDS, ThresholdKind, threshold_size

__all__ = ["PCK", "THRESHOLD_KINDS", "MeanIoU", "ThresholdKind", "threshold_size"]
