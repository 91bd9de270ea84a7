"""PCK@alpha (percentage of correct keypoints) for semantic correspondence, deduplicated by sample.

A predicted target keypoint is correct when its L2 distance to the ground truth is at most
``alpha * threshold_size`` (``<=``, as the official Hedlin code and DIFT count; ``<`` with
``inclusive=False``, as SD-DINO counts). ``threshold_size`` is a length in the frame where errors are
measured; :func:`threshold_size` lists the conventions of the benchmarks.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

ThresholdKind = Literal[
    "bbox-target", "bbox-source", "bbox-keypoints", "bbox-keypoints-padded", "image"
]
THRESHOLD_KINDS: tuple[str, ...] = get_args(ThresholdKind)

MAX_CATEGORY_BYTES = 64
"""Longest category name (UTF-8 bytes) :class:`PCK` can carry across ranks."""


def _as_points(value: Any, name: str) -> Tensor:
    """``value`` as a finite ``(N, 2)`` float64 CPU tensor; float64 keeps ties at the threshold exact."""
    points = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64)
    if points.numel() == 0:
        points = points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(
            f"{name} must have shape (N, 2) as (x, y) pixels, got {tuple(points.shape)}"
        )
    if not torch.isfinite(points).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return points


def _check_kind(kind: str) -> None:
    if kind not in THRESHOLD_KINDS:
        raise ValueError(f"unknown PCK threshold {kind!r}; expected one of {THRESHOLD_KINDS}")


def _box_side(box: Any, name: str) -> float:
    """Longer side of an ``[x1, y1, x2, y2]`` box."""
    coords = torch.as_tensor(box).detach().to(device="cpu", dtype=torch.float64).flatten()
    if coords.numel() != 4:
        raise ValueError(f"{name} must be [x1, y1, x2, y2], got {coords.numel()} numbers")
    x1, y1, x2, y2 = coords.tolist()
    if not (x2 >= x1 and y2 >= y1):
        raise ValueError(f"{name} must be [x1, y1, x2, y2] with x2 >= x1 and y2 >= y1, got {box}")
    return max(x2 - x1, y2 - y1)


def threshold_size(
    kind: str,
    *,
    trg_kps: Any = None,
    src_bbox: Any = None,
    trg_bbox: Any = None,
    trg_size: Any = None,
) -> float:
    """The length that alpha multiplies, in the frame of the given inputs.

    All inputs share one frame (pixels of the original target image, or of the resized one):

    - ``bbox-target``: longer side of ``trg_bbox`` ``[x1, y1, x2, y2]`` (SPair-71k standard, DIFT).
    - ``bbox-source``: longer side of ``src_bbox`` (official Hedlin code on SPair-71k, from CATs).
    - ``bbox-keypoints``: longer side of the tight box around ``trg_kps`` ``(N, 2)`` (PF-Willow).
    - ``bbox-keypoints-padded``: the official PF-Willow code, which pads the keypoints to 40 with
      ``-1`` before taking ``max - min`` per axis; the minimum therefore includes ``-1`` and the size is
      ``max over axes of (kps.max - min(kps.min, -1))``, about ``max(x_max, y_max) + 1``. This is larger
      than the true keypoint box, so PCK comes out inflated.
    - ``image``: ``max(w, h)`` of ``trg_size`` ``(w, h)``.

    Raises ``ValueError`` naming the missing or malformed input, or when the size is not positive.
    """
    _check_kind(kind)
    needed = {
        "bbox-target": ("trg_bbox", trg_bbox),
        "bbox-source": ("src_bbox", src_bbox),
        "bbox-keypoints": ("trg_kps", trg_kps),
        "bbox-keypoints-padded": ("trg_kps", trg_kps),
        "image": ("trg_size", trg_size),
    }
    arg_name, value = needed[kind]
    if value is None:
        raise ValueError(f"PCK threshold {kind!r} needs {arg_name}")
    if kind in ("bbox-target", "bbox-source"):
        size = _box_side(value, arg_name)
    elif kind == "image":
        wh = torch.as_tensor(value).flatten().tolist()
        if len(wh) != 2:
            raise ValueError(f"trg_size must be (w, h), got {value}")
        size = float(max(wh))
    else:
        kps = _as_points(trg_kps, "trg_kps")
        if len(kps) == 0:
            raise ValueError(f"PCK threshold {kind!r} needs at least one target keypoint")
        low = kps.min(dim=0).values
        if kind == "bbox-keypoints-padded":
            low = low.clamp(max=-1.0)
        size = float((kps.max(dim=0).values - low).max())
    if not size > 0:
        raise ValueError(f"PCK threshold {kind!r} gives size {size}; expected a positive length")
    return size


# `PCK.update` takes an argument named like the function.
_threshold_size = threshold_size


def first_rows(index: Tensor) -> Tensor:
    """For each position of ``index`` ``(n,)``, the position ``(n,)`` where its value first occurs."""
    n = len(index)
    uniq, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(n, device=index.device)
    first = torch.full((len(uniq),), n, device=index.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin")[inverse]


def exact_in(dtype: torch.dtype, value: int, what: str) -> None:
    """Raise unless the integer ``value`` survives a round trip through ``dtype``."""
    if int(torch.tensor(value, dtype=dtype).item()) != value:
        raise ValueError(
            f"{what}={value} cannot be stored exactly in the metric's dtype {dtype}; "
            "call metric.set_dtype(torch.float64)"
        )


class PCK(Metric):
    """PCK@alpha over keypoint pairs, each sample counted once even if it is updated twice.

    One :meth:`update` per pair. Lightning's distributed sampler pads ranks by repeating samples,
    so every pair carries its dataset ``index``; :meth:`compute` keeps the first update of each index
    (in rank order after a sync). All states are 1-D tensors of the metric's float dtype gathered with
    ``cat``: torchmetrics stands in an empty 1-D tensor of that dtype for a rank that saw no sample, and
    ``all_gather`` needs the same dtype and rank on every process. Category names travel as their UTF-8
    bytes (at most ``MAX_CATEGORY_BYTES``), so no category list has to be agreed on beforehand.

    A pair with no keypoints has no PCK: it is left out of every mean and of ``num_pairs``, and
    counted in ``num_empty_pairs`` (it needs no threshold inputs).

    :param alphas: the alphas to report, each > 0.
    :param threshold: one of :data:`THRESHOLD_KINDS`, see :func:`threshold_size`.
    :param inclusive: count ``distance <= alpha * size`` as correct (official Hedlin, DIFT); ``False``
        counts ``<`` (SD-DINO, GeoAware).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    index: list[Tensor]
    num_points: list[Tensor]
    correct: list[Tensor]
    category: list[Tensor]

    def __init__(
        self,
        alphas: Sequence[float] = (0.05, 0.1, 0.15),
        threshold: ThresholdKind = "bbox-target",
        inclusive: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        alphas = tuple(float(a) for a in alphas)
        if not alphas or any(not a > 0 for a in alphas) or len(set(alphas)) != len(alphas):
            raise ValueError(f"alphas must be distinct positive numbers, got {alphas}")
        _check_kind(threshold)
        self.alphas = alphas
        self.threshold = threshold
        self.inclusive = inclusive
        for name in ("index", "num_points", "correct", "category"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        pred: Any,
        target: Any,
        *,
        index: int,
        category: str,
        src_bbox: Any = None,
        trg_bbox: Any = None,
        trg_size: Any = None,
        threshold_size: float | None = None,
    ) -> None:
        """Score one pair.

        :param pred: ``(N, 2)`` predicted target keypoints, (x, y) pixels of the scoring frame.
        :param target: ``(N, 2)`` ground-truth target keypoints in the same frame.
        :param index: the pair's dataset index (dedupe key), an integer >= 0.
        :param category: the pair's category name.
        :param src_bbox, trg_bbox: ``[x1, y1, x2, y2]`` boxes in the scoring frame.
        :param trg_size: ``(w, h)`` of the target image in the scoring frame.
        :param threshold_size: the length alpha multiplies; when given it replaces the one computed
            from the metric's ``threshold`` kind (prediction records store it).
        """
        pred = _as_points(pred, "pred")
        target = _as_points(target, "target")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape (N, 2), got {tuple(pred.shape)} "
                f"and {tuple(target.shape)}"
            )
        if isinstance(index, bool):
            raise TypeError(f"index must be an integer, got {index!r}")
        index = operator.index(index)
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        exact_in(self.dtype, index, "index")
        exact_in(self.dtype, len(target), "number of keypoints")
        if not isinstance(category, str) or not category or "\x00" in category:
            raise ValueError(f"category must be a non-empty string without NUL, got {category!r}")
        name = category.encode("utf-8")
        if len(name) > MAX_CATEGORY_BYTES:
            raise ValueError(
                f"category {category!r} is {len(name)} bytes in UTF-8; at most "
                f"{MAX_CATEGORY_BYTES} are supported"
            )
        if len(target) == 0:
            size = 1.0  # an empty pair scores nothing; no threshold is needed
        elif threshold_size is None:
            size = _threshold_size(
                self.threshold,
                trg_kps=target,
                src_bbox=src_bbox,
                trg_bbox=trg_bbox,
                trg_size=trg_size,
            )
        else:
            size = float(threshold_size)
            if not size > 0 or size == float("inf"):
                raise ValueError(f"threshold_size must be a positive length, got {threshold_size}")

        distance = torch.linalg.vector_norm(pred - target, dim=1)
        limits = torch.tensor(self.alphas, dtype=torch.float64)[:, None] * size
        hits = distance[None] <= limits if self.inclusive else distance[None] < limits

        self.index.append(self._state([index]))
        self.num_points.append(self._state([len(target)]))
        self.correct.append(self._state(hits.sum(dim=1)))
        self.category.append(self._state(list(name.ljust(MAX_CATEGORY_BYTES, b"\x00"))))

    def compute(self) -> dict[str, Any]:
        """PCK in percent.

        Returns ``{"pck": {alpha: mean over pairs}, "pck_point": {alpha: pooled over points},
        "per_category": {name: {alpha: mean over the category's pairs}}, "num_pairs", "num_points",
        "num_empty_pairs"}``; alpha keys are strings such as ``"0.1"``, categories sorted by name.
        """
        if len(self.index) == 0:  # a list, or one tensor after a sync
            raise RuntimeError("PCK.compute() called before any update: no pair was scored")
        index = dim_zero_cat(self.index).long()
        num_points = dim_zero_cat(self.num_points).long()
        correct = dim_zero_cat(self.correct).double().view(len(index), len(self.alphas))
        category = dim_zero_cat(self.category).long().view(len(index), MAX_CATEGORY_BYTES)

        first = first_rows(index)
        clash = (num_points != num_points[first]) | (category != category[first]).any(dim=1)
        if clash.any():
            raise ValueError(
                f"PCK: dataset index {int(index[clash][0])} was scored twice with different "
                "keypoint counts or categories; two different pairs share one index"
            )
        unique = first == torch.arange(len(index), device=index.device)
        keep = unique & (num_points > 0)
        names = [bytes(row).rstrip(b"\x00").decode("utf-8") for row in category[keep].tolist()]
        num_points, correct = num_points[keep], correct[keep]
        if not len(num_points):
            raise RuntimeError("PCK.compute(): no scored pair has any keypoint")

        per_pair = 100.0 * correct / num_points[:, None]
        category_means = {}
        for name in sorted(set(names)):
            rows = torch.tensor([n == name for n in names], device=per_pair.device)
            category_means[name] = self._by_alpha(per_pair[rows].mean(dim=0))
        return {
            "pck": self._by_alpha(per_pair.mean(dim=0)),
            "pck_point": self._by_alpha(100.0 * correct.sum(dim=0) / num_points.sum()),
            "per_category": category_means,
            "num_pairs": len(num_points),
            "num_points": int(num_points.sum()),
            "num_empty_pairs": int(unique.sum()) - len(num_points),
        }

    def _by_alpha(self, values: Tensor) -> dict[str, float]:
        """``{"0.1": value, ...}`` from one value ``(A,)`` per alpha."""
        return {str(a): float(v) for a, v in zip(self.alphas, values.tolist(), strict=True)}

    def _state(self, values: Sequence[float] | Tensor) -> Tensor:
        return torch.as_tensor(values).to(device=self.device, dtype=self.dtype)
