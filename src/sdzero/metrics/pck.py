"""PCK@alpha (percentage of correct keypoints) for semantic correspondence, as small summed state.

A predicted target keypoint is correct when its L2 distance to the ground truth is at most
``alpha * threshold_size`` (``<=``, as the official Hedlin code and DIFT count; ``<`` with
``inclusive=False``, as SD-DINO counts). ``threshold_size`` is a length in the frame where errors are
measured; :func:`threshold_size` lists the conventions of the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.nn import Module
from torchmetrics import Metric

ThresholdKind = Literal[
    "bbox-target", "bbox-source", "bbox-keypoints", "bbox-keypoints-padded", "image"
]
THRESHOLD_KINDS: tuple[str, ...] = get_args(ThresholdKind)


def labelled_rows(target: Any) -> Tensor:
    """``(N,)`` bool: which points of ``target`` ``(N, 2)`` have a ground truth. A row of NaN is
    a query point without one (``data.query_points=grid:N``): recorded, never scored."""
    return ~torch.isnan(torch.as_tensor(target, dtype=torch.float64).reshape(-1, 2)).all(dim=1)


def _as_points(value: Any, name: str, unlabelled: bool = False) -> Tensor:
    """``value`` as a finite ``(N, 2)`` float64 CPU tensor; float64 keeps ties at the threshold exact.
    ``unlabelled``: rows of NaN (points without ground truth) are allowed too."""
    points = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64)
    if points.numel() == 0:
        points = points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(
            f"{name} must have shape (N, 2) as (x, y) pixels, got {tuple(points.shape)}"
        )
    known = labelled_rows(points) if unlabelled else slice(None)
    if not torch.isfinite(points[known]).all():
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
        kps = _as_points(trg_kps, "trg_kps", unlabelled=True)
        kps = kps[labelled_rows(kps)]
        if len(kps) == 0:
            raise ValueError(f"PCK threshold {kind!r} needs at least one target keypoint")
        low = kps.min(dim=0).values
        if kind == "bbox-keypoints-padded":
            low = low.clamp(max=-1.0)
        size = float((kps.max(dim=0).values - low).max())
    if not size > 0:
        raise ValueError(f"PCK threshold {kind!r} gives size {size}; expected a positive length")
    return size


def point_hits(
    pred: Any, target: Any, size: float, alphas: Sequence[float], inclusive: bool = True
) -> Tensor:
    """The PCK rule per point: ``(A, N)`` bool, ``hits[a, i]`` when the L2 distance of ``pred[i]``
    to ``target[i]`` (``(N, 2)`` pixels of one frame) is ``<= alphas[a] * size`` (``<`` when not
    ``inclusive``)."""
    distance = torch.linalg.vector_norm(
        _as_points(pred, "pred") - _as_points(target, "target"), dim=1
    )
    limits = torch.tensor(tuple(alphas), dtype=torch.float64)[:, None] * float(size)
    return distance[None] <= limits if inclusive else distance[None] < limits


# `PCK.update` takes an argument named like the function.
_threshold_size = threshold_size


class PCK(Metric):
    """PCK@alpha over keypoint pairs, as per-category sums over a fixed category axis.

    One :meth:`update` per pair. Every state is a fixed-shape sum (``dist_reduce_fx="sum"``), so ranks
    merge by adding their states and a rank that scored no pair contributes zeros. With ``C``
    categories and ``A`` alphas:

    - ``num_pairs`` ``(C,)`` int64: pairs with at least one keypoint;
    - ``percent_sum`` ``(C, A)`` float64: the sum over those pairs of the pair's percentage correct;
    - ``correct`` ``(C, A)`` int64 and ``num_points`` ``(C,)`` int64: correct and scored keypoints;
    - ``num_empty_pairs`` ``()`` int64: pairs without keypoints, which have no PCK and are left out of
      every mean and of ``num_pairs`` (they need no threshold inputs).
    - ``num_unlabelled`` ``()`` int64: query points without ground truth (target rows of NaN):
      never scored; a pair with only such points counts as empty.

    :param categories: every category the pairs may have (e.g. the datamodule's
        ``category_names``), the same on every rank.
    :param alphas: the alphas to report, each > 0.
    :param threshold: one of :data:`THRESHOLD_KINDS`, see :func:`threshold_size`.
    :param inclusive: count ``distance <= alpha * size`` as correct (official Hedlin, DIFT); ``False``
        counts ``<`` (SD-DINO, GeoAware).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    num_pairs: Tensor
    percent_sum: Tensor
    correct: Tensor
    num_points: Tensor
    num_empty_pairs: Tensor
    num_unlabelled: Tensor

    def __init__(
        self,
        categories: Sequence[str],
        alphas: Sequence[float] = (0.05, 0.1, 0.15),
        threshold: ThresholdKind = "bbox-target",
        inclusive: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(categories, str):
            raise ValueError(f"categories must be a list of names, got the string {categories!r}")
        categories = tuple(categories)
        if not categories or any(not isinstance(c, str) or not c for c in categories):
            raise ValueError(
                f"categories must be non-empty strings, at least one, got {categories}"
            )
        if len(set(categories)) != len(categories):
            raise ValueError(f"categories must be distinct, got {categories}")
        alphas = tuple(float(a) for a in alphas)
        if not alphas or any(not a > 0 for a in alphas) or len(set(alphas)) != len(alphas):
            raise ValueError(f"alphas must be distinct positive numbers, got {alphas}")
        _check_kind(threshold)
        self.categories = categories
        self._category_row = {name: row for row, name in enumerate(categories)}
        self.alphas = alphas
        self.threshold = threshold
        self.inclusive = inclusive
        shape = (len(categories), len(alphas))
        self.add_state("num_pairs", torch.zeros(len(categories), dtype=torch.long), "sum")
        self.add_state("percent_sum", torch.zeros(shape, dtype=torch.float64), "sum")
        self.add_state("correct", torch.zeros(shape, dtype=torch.long), "sum")
        self.add_state("num_points", torch.zeros(len(categories), dtype=torch.long), "sum")
        self.add_state("num_empty_pairs", torch.zeros((), dtype=torch.long), "sum")
        self.add_state("num_unlabelled", torch.zeros((), dtype=torch.long), "sum")

    float64_states: tuple[str, ...] = ("percent_sum",)
    """States that stay float64 whatever the module's dtype."""

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> Module:
        """Move the states with the module, but keep :attr:`float64_states` float64:
        ``module.to(dtype)`` (Lightning's ``*-true`` precisions) would round the sums."""
        this = super()._apply(fn, exclude_state=(*exclude_state, *self.float64_states))
        for name in self.float64_states:
            setattr(this, name, getattr(this, name).to(this.device))
            this._defaults[name] = this._defaults[name].to(this.device)
        return this

    def update(
        self,
        pred: Any,
        target: Any,
        *,
        category: str,
        src_bbox: Any = None,
        trg_bbox: Any = None,
        trg_size: Any = None,
        threshold_size: float | None = None,
    ) -> None:
        """Score one pair.

        :param pred: ``(N, 2)`` predicted target keypoints, (x, y) pixels of the scoring frame.
        :param target: ``(N, 2)`` ground-truth target keypoints in the same frame.
        :param category: the pair's category, one of ``categories``.
        :param src_bbox, trg_bbox: ``[x1, y1, x2, y2]`` boxes in the scoring frame.
        :param trg_size: ``(w, h)`` of the target image in the scoring frame.
        :param threshold_size: the length alpha multiplies; when given it replaces the one computed
            from the metric's ``threshold`` kind (prediction records store it).
        """
        self._score(
            pred,
            target,
            category,
            src_bbox=src_bbox,
            trg_bbox=trg_bbox,
            trg_size=trg_size,
            threshold_size=threshold_size,
        )

    def _score(
        self, pred: Any, target: Any, category: str, **threshold_inputs: Any
    ) -> tuple[int, Tensor] | None:
        """Check and score one pair into the state (see :meth:`update`); returns its category row and
        its hits ``(A, N)`` bool over its points with ground truth, or None for a pair without."""
        threshold_size = threshold_inputs.pop("threshold_size")
        pred = _as_points(pred, "pred")
        target = _as_points(target, "target", unlabelled=True)
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape (N, 2), got {tuple(pred.shape)} "
                f"and {tuple(target.shape)}"
            )
        if not isinstance(category, str) or category not in self._category_row:
            raise ValueError(
                f"unknown category {category!r}; this PCK scores {list(self.categories)}"
            )
        row = self._category_row[category]
        known = labelled_rows(target)
        self.num_unlabelled += int((~known).sum())
        pred, target = pred[known], target[known]
        if len(target) == 0:  # no PCK, so no threshold is needed
            self.num_empty_pairs += 1
            return None
        if threshold_size is None:
            size = _threshold_size(self.threshold, trg_kps=target, **threshold_inputs)
        else:
            size = float(threshold_size)
            if not size > 0 or size == float("inf"):
                raise ValueError(f"threshold_size must be a positive length, got {threshold_size}")

        hits = point_hits(pred, target, size, self.alphas, self.inclusive)
        correct = hits.sum(dim=1)  # (A,)
        self.num_pairs[row] += 1
        self.num_points[row] += len(target)
        self.correct[row] += correct.to(self.device)
        self.percent_sum[row] += (100.0 * correct.double() / len(target)).to(self.device)
        return row, hits

    def compute(self) -> dict[str, Any]:
        """PCK in percent.

        Returns ``{"pck": {alpha: mean over pairs}, "pck_point": {alpha: pooled over points},
        "per_category": {name: {alpha: mean over the category's pairs}}, "num_pairs", "num_points",
        "num_empty_pairs"}`` and, when there were any, ``"num_unlabelled_points"``; alpha keys are
        strings such as ``"0.1"``; ``per_category`` holds the categories with at least one scored pair, sorted by name.
        """
        num_pairs = int(self.num_pairs.sum())
        num_empty = int(self.num_empty_pairs)
        if num_pairs + num_empty == 0:
            raise RuntimeError("PCK.compute() called before any update: no pair was scored")
        if num_pairs == 0:
            raise RuntimeError("PCK.compute(): no scored pair has any keypoint")
        num_points = int(self.num_points.sum())
        unlabelled = (
            {"num_unlabelled_points": int(self.num_unlabelled)} if self.num_unlabelled else {}
        )
        per_category = {
            name: self._by_alpha(self.percent_sum[row] / self.num_pairs[row])
            for name, row in sorted(self._category_row.items())
            if self.num_pairs[row] > 0
        }
        return {
            "pck": self._by_alpha(self.percent_sum.sum(dim=0) / num_pairs),
            "pck_point": self._by_alpha(100.0 * self.correct.sum(dim=0).double() / num_points),
            "per_category": per_category,
            "num_pairs": num_pairs,
            "num_points": num_points,
            "num_empty_pairs": num_empty,
            **unlabelled,
        }

    def _by_alpha(self, values: Tensor) -> dict[str, float]:
        """``{"0.1": value, ...}`` from one value ``(A,)`` per alpha."""
        return {str(a): float(v) for a, v in zip(self.alphas, values.tolist(), strict=True)}
