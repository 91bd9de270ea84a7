"""Dataset-level mean IoU for semantic segmentation (the mmsegmentation definition), deduplicated.

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
from torchmetrics.utilities.data import dim_zero_cat

from sdzero.metrics.pck import exact_in, first_rows


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

    Each image's confusion counts are kept sparsely (only its non-zero ``(gt, pred)`` cells, a few
    dozen numbers an image), so an image updated twice with the same ``index`` (Lightning's distributed
    sampler pads ranks by repeating samples) is counted once: :meth:`compute` keeps the first update of
    each index, in rank order after a sync. Updates without an index are never deduplicated. States are
    1-D ``cat`` tensors of the metric's float dtype, because torchmetrics stands in an empty 1-D tensor
    of that dtype for a rank that saw no image and ``all_gather`` needs the same dtype on every process.

    :param class_names: one name per class; class ``c`` is ``class_names[c]``.
    :param ignore_index: the ground-truth label of void pixels (not a class index), or None.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    index: list[Tensor]
    num_cells: list[Tensor]
    cell: list[Tensor]
    count: list[Tensor]

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
        exact_in(self.dtype, self.num_classes**2, "number of confusion cells")
        # Per update: the image's dataset index (-1: none) and how many cells it contributes; then
        # the cells (gt * C + pred) and their pixel counts, concatenated image after image.
        for name in ("index", "num_cells", "cell", "count"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, pred: Any, target: Any, index: Any = None) -> None:
        """Accumulate images.

        :param pred: ``(H, W)`` or ``(B, H, W)`` predicted class indices in ``[0, C)``.
        :param target: same shape, ground-truth class indices in ``[0, C)`` or ``ignore_index``.
        :param index: the images' dataset indices (dedupe keys, integers >= 0): an int for one image,
            else a sequence or tensor ``(B,)``; None skips deduplication.
        """
        pred = _as_label_maps(pred, "pred")
        target = _as_label_maps(target, "target")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got {tuple(pred.shape)} "
                f"and {tuple(target.shape)}"
            )
        num_images, num_classes = len(pred), self.num_classes
        indices = self._indices(index, num_images)
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
        exact_in(self.dtype, target.shape[1] * target.shape[2], "pixels per image")

        image = torch.arange(num_images, device=pred.device)[:, None, None].expand_as(pred)
        key = (image * num_classes + target) * num_classes + pred
        counts = torch.bincount(key[valid], minlength=num_images * num_classes**2)
        counts = counts.view(num_images, num_classes**2)
        image_of_cell, cell = torch.nonzero(counts, as_tuple=True)

        self.index.append(self._state(indices))
        self.num_cells.append(self._state(torch.bincount(image_of_cell, minlength=num_images)))
        self.cell.append(self._state(cell))
        self.count.append(self._state(counts[image_of_cell, cell]))

    def _indices(self, index: Any, num_images: int) -> Tensor:
        """Dataset indices ``(B,)`` as int64, -1 for updates without one."""
        if index is None:
            return torch.full((num_images,), -1)
        indices = torch.as_tensor(index).flatten()
        if indices.dtype == torch.bool or indices.is_floating_point() or len(indices) != num_images:
            raise ValueError(f"index must be {num_images} integer(s), one per image, got {index}")
        if len(indices) and indices.min() < 0:
            raise ValueError(f"index must be >= 0, got {indices.tolist()}")
        for i in indices.tolist():
            exact_in(self.dtype, i, "index")
        return indices

    def _state(self, values: Tensor) -> Tensor:
        return values.to(device=self.device, dtype=self.dtype)

    def confusion_matrix(self) -> Tensor:
        """The confusion matrix ``(C, C)`` int64 (rows: ground truth, columns: prediction) of the
        deduplicated updates held by this process; after a sync (``sync_context()``), of all ranks."""
        num_classes = self.num_classes
        if len(self.index) == 0:  # a list, or one tensor after a sync
            return torch.zeros(num_classes, num_classes, dtype=torch.long, device=self.device)
        index = dim_zero_cat(self.index).long()
        num_cells = dim_zero_cat(self.num_cells).long()
        keep = (first_rows(index) == torch.arange(len(index), device=index.device)) | (index < 0)
        keep_cell = torch.repeat_interleave(keep, num_cells)
        cell = dim_zero_cat(self.cell).long()[keep_cell]
        count = dim_zero_cat(self.count).double()[keep_cell]
        matrix = torch.bincount(cell, weights=count, minlength=num_classes**2)
        return matrix.round().long().view(num_classes, num_classes)

    def compute(self) -> dict[str, Any]:
        """``{"miou": % over classes with a non-empty union, "per_class_iou": {name: % or None},
        "num_images": distinct images}``; ``None`` marks classes absent from both GT and prediction."""
        if len(self.index) == 0:  # a list, or one tensor after a sync
            raise RuntimeError("MeanIoU.compute() called before any update: no image was scored")
        matrix = self.confusion_matrix().double()
        tp = matrix.diagonal()
        union = matrix.sum(dim=0) + matrix.sum(dim=1) - tp
        present = union > 0
        if not present.any():
            raise RuntimeError("MeanIoU.compute(): every scored pixel was ignore_index")
        iou = 100.0 * tp / union.clamp(min=1)
        index = dim_zero_cat(self.index).long()
        num_images = len(index[index >= 0].unique()) + int((index < 0).sum())
        return {
            "miou": float(iou[present].mean()),
            "per_class_iou": {
                name: float(v) if p else None
                for name, v, p in zip(self.class_names, iou.tolist(), present.tolist(), strict=True)
            },
            "num_images": num_images,
        }
