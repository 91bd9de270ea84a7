"""Dataset-level mean IoU for semantic segmentation (the mmsegmentation definition).

Intersection and union are accumulated over the whole split per class (one confusion matrix), pixels
labelled ``ignore_index`` in the ground truth are dropped, IoU = TP / (TP + FP + FN), and mIoU is the
mean over the classes whose union is not empty (present in the ground truth or in the prediction);
a class predicted but absent from the ground truth therefore counts as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


def _as_label_maps(value: Any, name: str) -> Tensor:
    """``value`` as an integer ``(B, H, W)`` tensor of class indices (a single ``(H, W)`` map gets B=1)."""
    maps = torch.as_tensor(value).detach()
    if maps.dtype == torch.bool or maps.is_floating_point() or maps.is_complex():
        raise TypeError(f"{name} must hold integer class indices, got dtype {maps.dtype}")
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3:
        raise ValueError(f"{name} must have shape (H, W) or (B, H, W), got {tuple(maps.shape)}")
    return maps.long()


class MeanIoU(Metric):
    """mIoU over a dataset: one confusion matrix, ``ignore_index`` dropped, nanmean over classes.

    States are sums (``dist_reduce_fx="sum"``): ``confmat`` ``(C, C)`` int64 (rows: ground truth,
    columns: prediction) and ``num_images`` ``()`` int64, so ranks merge by adding their states and a
    rank that saw no image contributes zeros.

    :param class_names: one name per class; class ``c`` is ``class_names[c]``.
    :param ignore_index: the ground-truth label of void pixels (not a class index), or None.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    confmat: Tensor
    num_images: Tensor

    def __init__(
        self, class_names: Sequence[str], ignore_index: int | None = 255, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        class_names = list(class_names)
        if not class_names or any(not isinstance(n, str) for n in class_names):
            raise ValueError(f"class_names must be a non-empty list of strings, got {class_names}")
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be distinct, got {class_names}")
        if ignore_index is not None and 0 <= ignore_index < len(class_names):
            raise ValueError(
                f"ignore_index={ignore_index} is also the class {class_names[ignore_index]!r}; "
                f"it must lie outside [0, {len(class_names)})"
            )
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.ignore_index = ignore_index
        num_classes = self.num_classes
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), "sum")
        self.add_state("num_images", torch.zeros((), dtype=torch.long), "sum")

    def update(self, pred: Any, target: Any) -> None:
        """Accumulate images.

        :param pred: ``(H, W)`` or ``(B, H, W)`` predicted class indices in ``[0, C)``.
        :param target: same shape, ground-truth class indices in ``[0, C)`` or ``ignore_index``.
        """
        pred = _as_label_maps(pred, "pred")
        target = _as_label_maps(target, "target")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got {tuple(pred.shape)} "
                f"and {tuple(target.shape)}"
            )
        num_classes = self.num_classes
        if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
            raise ValueError(
                f"pred holds class indices in [{int(pred.min())}, {int(pred.max())}]; "
                f"expected [0, {num_classes})"
            )
        valid = torch.ones_like(target, dtype=torch.bool)
        if self.ignore_index is not None:
            valid = target != self.ignore_index
        labels = target[valid]
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)].unique().tolist()
            raise ValueError(
                f"target holds labels {bad[:10]}; expected class indices in [0, {num_classes}) "
                f"or ignore_index={self.ignore_index}"
            )
        cells = labels * num_classes + pred.to(labels.device)[valid]
        counts = torch.bincount(cells, minlength=num_classes**2).view(num_classes, num_classes)
        self.confmat += counts.to(self.device)
        self.num_images += len(pred)

    def confusion_matrix(self) -> Tensor:
        """The confusion matrix ``(C, C)`` int64 (rows: ground truth, columns: prediction) of the
        updates held by this process; after a sync (``sync_context()``), of all ranks."""
        return self.confmat.clone()

    def compute(self) -> dict[str, Any]:
        """``{"miou": % over classes with a non-empty union, "per_class_iou": {name: % or None},
        "num_images": images scored}``; ``None`` marks classes absent from both GT and prediction."""
        if int(self.num_images) == 0:
            raise RuntimeError("MeanIoU.compute() called before any update: no image was scored")
        matrix = self.confmat.double()
        tp = matrix.diagonal()
        union = matrix.sum(dim=0) + matrix.sum(dim=1) - tp
        present = union > 0
        if not present.any():
            raise RuntimeError("MeanIoU.compute(): every scored pixel was ignore_index")
        iou = 100.0 * tp / union.clamp(min=1)
        return {
            "miou": float(iou[present].mean()),
            "per_class_iou": {
                name: float(v) if p else None
                for name, v, p in zip(self.class_names, iou.tolist(), present.tolist(), strict=True)
            },
            "num_images": int(self.num_images),
        }
