"""Semantic correspondence: PCK on keypoint pairs, for any method that predicts target points.

A prediction is ``(N, 2)`` target points ``(x, y)`` in pixels of the ORIGINAL target image, one per
source keypoint of the pair. Errors are measured in ``frame``: ``original`` (target pixels) or
``resized`` (the target stretched/letterboxed to ``image_size``², as the official Hedlin code
measures); ``threshold`` names the length alpha multiplies (:func:`~sdzero.metrics.pck.threshold_size`,
plus ``bbox-target-xscale``, the official CUB quirk: the target box's longer side in original pixels
times the x-axis scale only, defined in the resized frame).

A sample's ``extra`` (SPair-71k: ``kps_ids``, ``mirror``, the difficulty levels) is kept in its
record, so the breakdowns of :class:`~sdzero.metrics.pck_breakdown.PCKBreakdown` are recomputable
from the records alone. ``protocol`` names the scoring preset the run used
(:mod:`sdzero.tasks.protocols`); the runner sets it from the config's top-level ``protocol``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdzero.metrics.pck import THRESHOLD_KINDS, labelled_rows, point_hits, threshold_size
from sdzero.metrics.pck_breakdown import DIFFICULTY_LEVELS, LEVEL_NAMES, PCKBreakdown
from sdzero.tasks.base import Task
from sdzero.tasks.frames import ModelFrame
from sdzero.tasks.match_viz import Outcome, draw_matches
from sdzero.tasks.protocols import AVERAGES, get_protocol

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

    def __init__(
        self, scoring: Scoring, categories: Sequence[str], protocol: str | None = None
    ) -> None:
        """``categories``: every category of the split (the datamodule's ``category_names``);
        ``protocol``: the name of the scoring preset the config applied, or None."""
        self.scoring = scoring
        self.protocol = protocol
        kind = "bbox-target" if scoring.threshold == XSCALE else scoring.threshold
        self.metric = PCKBreakdown(
            categories, alphas=scoring.alphas, threshold=kind, inclusive=scoring.inclusive
        )

    def record(self, batch: dict[str, Any], prediction: torch.Tensor) -> dict[str, Any]:
        """``prediction``: ``(N, 2)`` target points in original target pixels. The sample's
        non-empty ``extra`` is kept as the record's ``extra``."""
        extra = {"extra": dict(batch["extra"])} if batch.get("extra") else {}
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
            **extra,
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

    def record_complete(self, record: dict[str, Any], predictions: Path | None) -> bool:
        """Whether a record read back holds every field :meth:`update` reads, with its type:
        ``category`` a string, ``threshold_size`` a number > 0 (NaN allowed: no box), the point
        lists ``(N, 2)`` numbers (NaN for points without ground truth) with one prediction per
        source point, the sizes two positive integers."""
        try:
            n = len(record["src_kps"])
            points = [record[k] for k in ("src_kps", "trg_kps", "pred_kps")]
            sizes = [record["src_size"], record["trg_size"]]
            ok = isinstance(record["category"], str) and _number(record["threshold_size"])
            ok = ok and all(_points(p, n) for p in points)
            ok = ok and all(_size(v) for v in sizes)
            return ok and isinstance(record.get("extra", {}), dict)
        except (KeyError, TypeError):
            return False

    def update(
        self,
        record: dict[str, Any],
        batch: dict[str, Any],
        prediction: Any = None,
        predictions: Path | None = None,
    ) -> None:
        pred, target = self.scoring_points(record)
        extra = record.get("extra", {})
        self.metric.update(
            pred,
            target,
            category=record["category"],
            threshold_size=record["threshold_size"],
            kps_ids=extra.get("kps_ids"),
            difficulty={k: extra[k] for k in DIFFICULTY_LEVELS if k in extra},
        )

    def summary(self, computed: dict[str, Any]) -> dict[str, Any]:
        """The contract's keys, then ``inclusive``, ``per_category_point``, ``pck_category_mean``,
        ``pck_point_category_mean``; ``by_difficulty`` and ``per_keypoint`` when the records carry
        them; ``protocol`` and its ``averages`` when a preset was applied."""
        optional = [key for key in ("by_difficulty", "per_keypoint") if key in computed]
        preset = {}
        if self.protocol is not None:
            preset = {"protocol": self.protocol, "averages": list(self.averages)}
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
            "inclusive": self.scoring.inclusive,
            "per_category_point": computed["per_category_point"],
            "pck_category_mean": computed["pck_category_mean"],
            "pck_point_category_mean": computed["pck_point_category_mean"],
            **{key: computed[key] for key in optional},
            **preset,
        }

    @property
    def averages(self) -> tuple[str, ...]:
        """The ``metrics.json`` averages the protocol reports, headline first (all four without
        one)."""
        return AVERAGES if self.protocol is None else get_protocol(self.protocol).averages

    def tables(self, summary: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
        """``per_category`` and ``per_category_point``: one row per category, one column per
        alpha; ``by_difficulty``: one row per factor level (per pair, then pooled);
        ``per_keypoint``: one row per category and keypoint id (pooled)."""
        alphas = [str(a) for a in self.scoring.alphas]
        tables = {
            key: (
                ["name", *alphas],
                [[n, *(v[a] for a in alphas)] for n, v in summary[key].items()],
            )
            for key in ("per_category", "per_category_point")
        }
        if "by_difficulty" in summary:
            columns = ["factor", "level", "name", "num_pairs", "num_points"]
            columns += [f"pck@{a}" for a in alphas] + [f"pck_point@{a}" for a in alphas]
            rows = [
                [factor, int(level), LEVEL_NAMES[factor][int(level)], v["num_pairs"]]
                + [v["num_points"], *(v["pck"][a] for a in alphas)]
                + [v["pck_point"][a] for a in alphas]
                for factor, levels in summary["by_difficulty"].items()
                for level, v in levels.items()
            ]
            tables["by_difficulty"] = (columns, rows)
        if "per_keypoint" in summary:
            rows = [
                [name, int(kid), v["num_points"], *(v["pck_point"][a] for a in alphas)]
                for name, ids in summary["per_keypoint"].items()
                for kid, v in ids.items()
            ]
            tables["per_keypoint"] = (["category", "kps_id", "num_points", *alphas], rows)
        return tables

    def charts(self, summary: dict[str, Any]) -> dict[str, Image.Image]:
        """``{"pck_breakdown.png": bar chart}``: per-image and per-point PCK at the headline alpha
        by difficulty level (when the records carry levels) and by category."""
        from sdzero.tasks.charts import breakdown_chart

        return {"pck_breakdown.png": breakdown_chart(summary, self.headline_alpha)}

    @property
    def headline_alpha(self) -> str:
        """The alpha charts show: 0.1 (every paper's table has it) when scored, else the largest."""
        alphas = [str(a) for a in self.scoring.alphas]
        return "0.1" if "0.1" in alphas else max(alphas, key=float)

    def point_hits(self, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labelled (N,), hits (A, N))`` bool: which points of a record have a ground truth
        (a target row of NaN has none) and whether each prediction is correct at each alpha, by
        the PCK rule the metric scores with (scoring frame, the record's ``threshold_size``;
        False where unlabelled)."""
        pred, target = self.scoring_points(record)
        labelled = labelled_rows(target)
        hits = torch.zeros(len(self.scoring.alphas), len(target), dtype=torch.bool)
        hits[:, labelled] = point_hits(
            pred[labelled],
            target[labelled],
            record["threshold_size"],
            self.scoring.alphas,
            self.scoring.inclusive,
        )
        return labelled, hits

    def outcome(self, record: dict[str, Any], batch: dict[str, Any]) -> Outcome:
        """What the picture of a record shows: its ground truth and its hits at
        :attr:`headline_alpha`, with the tolerance converted to original target pixels."""
        alphas = [str(a) for a in self.scoring.alphas]
        row = alphas.index(self.headline_alpha)
        radius = self.scoring.alphas[row] * float(record["threshold_size"])
        sx, sy = (
            self._frame(record["trg_size"]).scale if self.scoring.frame == "resized" else (1, 1)
        )
        labelled, hits = self.point_hits(record)
        return Outcome(
            gt=torch.tensor(record["trg_kps"], dtype=torch.float32).reshape(-1, 2),
            labelled=labelled,
            hits=hits[row],
            alpha=self.scoring.alphas[row],
            tolerance=(radius / sx, radius / sy),
        )

    def visual_title(self, record: dict[str, Any]) -> list[str]:
        """The title lines of a record's picture: pair id and category, the pair's PCK at every
        alpha (over its points with ground truth), the rule the markers follow."""
        labelled, hits = self.point_hits(record)
        n = int(labelled.sum())
        scores = " | ".join(
            f"alpha {a:g}: {int(h.sum())}/{n}"
            + (f" ({100 * float(h.sum()) / n:.0f}%)" if n else "")
            for a, h in zip(self.scoring.alphas, hits, strict=True)
        )
        alpha, rule = self.headline_alpha, "<=" if self.scoring.inclusive else "<"
        return [
            f"{record['id']}  ({record['category']})",
            f"PCK of this pair: {scores}",
            f"markers at alpha {alpha}: correct when the error {rule} {alpha} x "
            f"{float(record['threshold_size']):.1f} px ({self.scoring.threshold}, measured in the "
            f"{self.scoring.frame} frame)",
        ]

    def visual(self, record: dict[str, Any], batch: dict[str, Any], prediction: Any) -> Image.Image:
        """Source | target with numbered points, ground truth vs prediction, correct/wrong at
        :attr:`headline_alpha` (:mod:`sdzero.tasks.match_viz`), titled by :meth:`visual_title`."""
        pred = torch.tensor(record["pred_kps"], dtype=torch.float32).reshape(-1, 2)
        outcome, lines = self.outcome(record, batch), self.visual_title(record)
        return draw_matches(
            batch["src_img"], batch["trg_img"], batch["src_kps"], pred, outcome, lines
        )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _points(value: Any, n: int) -> bool:
    """``value`` is ``n`` points ``[x, y]`` of numbers."""
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(p, list) and len(p) == 2 and all(map(_number, p)) for p in value)
    )


def _size(value: Any) -> bool:
    """``value`` is ``[w, h]``, positive integers."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )
