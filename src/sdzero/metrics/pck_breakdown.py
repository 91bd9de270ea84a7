"""PCK with the breakdowns papers report on SPair-71k, as small summed state.

:class:`PCKBreakdown` is :class:`~sdzero.metrics.pck.PCK` plus, for pairs that carry them:

- PCK by difficulty factor and level (SPair-71k's pair annotations: ``viewpoint_variation`` and
  ``scale_variation`` 0-2 = easy/medium/hard; ``truncation`` and ``occlusion`` 0-3 = none, source,
  target, both), per pair and pooled over points;
- PCK per keypoint id (SPair's ``kps_ids``: the slot of each keypoint in its category), pooled;

and, from the base state, per-category pooled PCK and the means over categories of the
per-category means (the "average over categories" of Hedlin's per-category script and SD-DINO).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from sdzero.metrics.pck import PCK, labelled_rows

DIFFICULTY_LEVELS: dict[str, int] = {
    "viewpoint_variation": 3,
    "scale_variation": 3,
    "truncation": 4,
    "occlusion": 4,
}
"""SPair-71k's difficulty factors and their number of levels (values ``0 .. n-1``)."""

LEVEL_NAMES: dict[str, tuple[str, ...]] = {
    "viewpoint_variation": ("easy", "medium", "hard"),
    "scale_variation": ("easy", "medium", "hard"),
    "truncation": ("none", "source", "target", "both"),
    "occlusion": ("none", "source", "target", "both"),
}

NUM_KEYPOINT_IDS = 30
"""Keypoint slots per category (SPair-71k annotates at most 30, ids ``0 .. 29``)."""

FIXED_POINT = 2**40
"""Units per pair of a per-pair fraction summed as an integer: integer sums do not depend on the
order the ranks add them in (float sums do, in the last digit), at a resolution of 1e-12."""


class PCKBreakdown(PCK):
    """PCK plus breakdowns by difficulty level and keypoint id (all sums, ``dist_reduce_fx="sum"``).

    Extra state, with ``L`` = the factors' levels laid end to end (14 for SPair), ``C`` categories,
    ``K`` keypoint ids and ``A`` alphas:

    - ``level_pairs`` ``(L,)``, ``level_fraction`` ``(L, A)``, ``level_correct`` ``(L, A)``,
      ``level_points`` ``(L,)``: pairs, the sum of their fractions correct in
      :data:`FIXED_POINT` units, correct and scored points, per factor level;
    - ``kp_correct`` ``(C, K, A)`` and ``kp_points`` ``(C, K)``: correct and scored keypoints per id.

    :param num_keypoint_ids: ``K``; an id outside ``0 .. K-1`` is an error.
    :param factors: ``{factor name: number of levels}``; default SPair-71k's.
    """

    level_pairs: Tensor
    level_fraction: Tensor
    level_correct: Tensor
    level_points: Tensor
    kp_correct: Tensor
    kp_points: Tensor

    def __init__(
        self,
        categories: Sequence[str],
        *args: Any,
        num_keypoint_ids: int = NUM_KEYPOINT_IDS,
        factors: Mapping[str, int] = DIFFICULTY_LEVELS,
        **kwargs: Any,
    ) -> None:
        super().__init__(categories, *args, **kwargs)
        self.factors = dict(factors)
        offsets, total = {}, 0
        for name, levels in self.factors.items():
            offsets[name], total = total, total + int(levels)
        self._offset = offsets
        self.num_keypoint_ids = int(num_keypoint_ids)
        a, c, k = len(self.alphas), len(self.categories), self.num_keypoint_ids
        long = torch.long
        self.add_state("level_pairs", torch.zeros(total, dtype=long), "sum")
        self.add_state("level_fraction", torch.zeros(total, a, dtype=long), "sum")
        self.add_state("level_correct", torch.zeros(total, a, dtype=long), "sum")
        self.add_state("level_points", torch.zeros(total, dtype=long), "sum")
        self.add_state("kp_correct", torch.zeros(c, k, a, dtype=long), "sum")
        self.add_state("kp_points", torch.zeros(c, k, dtype=long), "sum")

    def _level_rows(self, difficulty: Mapping[str, Any]) -> list[int]:
        rows = []
        for name, value in difficulty.items():
            if name not in self.factors:
                raise ValueError(
                    f"unknown difficulty factor {name!r}; expected one of {list(self.factors)}"
                )
            levels = self.factors[name]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < levels:
                raise ValueError(
                    f"difficulty {name}={value!r}: expected an integer 0..{levels - 1}"
                )
            rows.append(self._offset[name] + value)
        return rows

    def _keypoint_ids(self, kps_ids: Sequence[Any], num_points: int) -> Tensor:
        ids = torch.as_tensor([int(i) for i in kps_ids], dtype=torch.long)
        if len(ids) != num_points:
            raise ValueError(f"kps_ids has {len(ids)} ids for {num_points} keypoints")
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_keypoint_ids):
            raise ValueError(f"kps_ids {ids.tolist()} must lie in 0..{self.num_keypoint_ids - 1}")
        return ids

    def update(
        self,
        pred: Any,
        target: Any,
        *,
        category: str,
        kps_ids: Sequence[Any] | None = None,
        difficulty: Mapping[str, Any] | None = None,
        **threshold_inputs: Any,
    ) -> None:
        """Score one pair (see :meth:`PCK.update`; ``threshold_inputs`` are its ``src_bbox``,
        ``trg_bbox``, ``trg_size`` and ``threshold_size``).

        :param kps_ids: the id of each keypoint with ground truth (in order), or None.
        :param difficulty: ``{factor: level}`` of the pair (any subset of ``factors``), or None.
        """
        rows = self._level_rows(difficulty or {})
        labelled = int(labelled_rows(target).sum())  # ids name the points with ground truth
        ids = None if kps_ids is None else self._keypoint_ids(kps_ids, labelled)
        threshold_inputs.setdefault("threshold_size", None)
        scored = self._score(pred, target, category, **threshold_inputs)
        if scored is None:
            return
        row, hits = scored  # hits: (A, N)
        correct = hits.sum(dim=1).to(self.device)
        points = hits.shape[1]
        fraction = (correct * FIXED_POINT + points // 2) // points  # rounded, in FIXED_POINT units
        for level in rows:
            self.level_pairs[level] += 1
            self.level_points[level] += points
            self.level_correct[level] += correct
            self.level_fraction[level] += fraction
        if ids is not None:
            ids = ids.to(self.device)
            self.kp_points[row].index_add_(0, ids, torch.ones_like(ids))
            self.kp_correct[row].index_add_(0, ids, hits.T.long().to(self.device))

    def compute(self) -> dict[str, Any]:
        """The base result plus ``per_category_point`` ``{name: {alpha: pooled}}``,
        ``pck_category_mean`` / ``pck_point_category_mean`` ``{alpha: unweighted mean over the
        categories with a scored pair}``, and, when pairs carried them, ``by_difficulty``
        ``{factor: {level: {"num_pairs", "num_points", "pck", "pck_point"}}}`` (levels with a pair,
        as strings) and ``per_keypoint`` ``{name: {id: {"num_points", "pck_point"}}}`` (ids with a
        scored point)."""
        result = super().compute()
        scored = self.num_pairs > 0
        pooled = 100.0 * self.correct.double() / self.num_points.clamp(min=1)[:, None]
        names = sorted(self._category_row)
        result["per_category_point"] = {
            name: self._by_alpha(pooled[self._category_row[name]])
            for name in names
            if scored[self._category_row[name]]
        }
        per_pair = self.percent_sum[scored] / self.num_pairs[scored][:, None]
        result["pck_category_mean"] = self._by_alpha(per_pair.mean(dim=0))
        result["pck_point_category_mean"] = self._by_alpha(pooled[scored].mean(dim=0))
        by_difficulty = {}
        for factor, offset in self._offset.items():
            levels = {}
            for level in range(self.factors[factor]):
                row = offset + level
                n = int(self.level_pairs[row])
                if n:
                    levels[str(level)] = {
                        "num_pairs": n,
                        "num_points": int(self.level_points[row]),
                        "pck": self._by_alpha(
                            100.0 * self.level_fraction[row].double() / FIXED_POINT / n
                        ),
                        "pck_point": self._by_alpha(
                            100.0 * self.level_correct[row].double() / self.level_points[row]
                        ),
                    }
            if levels:
                by_difficulty[factor] = levels
        if by_difficulty:
            result["by_difficulty"] = by_difficulty
        per_keypoint = {}
        for name in names:
            row = self._category_row[name]
            ids = torch.nonzero(self.kp_points[row]).flatten().tolist()
            if ids:
                points = self.kp_points[row, ids]
                values = 100.0 * self.kp_correct[row, ids].double() / points.double()[:, None]
                per_keypoint[name] = {
                    str(i): {"num_points": int(n), "pck_point": self._by_alpha(v)}
                    for i, n, v in zip(ids, points.tolist(), values, strict=True)
                }
        if per_keypoint:
            result["per_keypoint"] = per_keypoint
        return result
