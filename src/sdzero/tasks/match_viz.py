"""The correspondence picture: source | target, numbered points, ground truth vs prediction.

Styles (distinct in shape as well as colour, so they also read in grey):

* source query point: yellow disc, numbered ``1..N``;
* ground-truth target point: hollow black-and-white ring with the same number;
* prediction: a cross with the same number, joined to its ground truth by a line, and
  **green ``+`` with a solid line** when it is correct at the drawn alpha,
  **red ``x`` with a dashed line** when it is not; a dotted ellipse around the ground truth shows
  the tolerance (``alpha * threshold size``, converted to target pixels);
* without a ground truth (``sdzero match``): a blue ``+``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from sdzero.tasks.viz import (
    PAD,
    Box,
    LegendEntry,
    Swatch,
    as_pil,
    display_scale,
    enlarged,
    font,
    legend,
    stack,
    title,
)

SOURCE = (255, 205, 0)
CORRECT = (0, 160, 0)
WRONG = (230, 20, 20)
NEUTRAL = (30, 110, 255)
OUTLINE = (0, 0, 0)


@dataclass(frozen=True)
class Outcome:
    """How the predictions of a pair scored at the drawn ``alpha``: ``gt`` ``(N, 2)`` ground-truth
    target points (x, y) in original target pixels, ``labelled`` ``(N,)`` bool (the points that
    have one; the others are drawn as plain predictions), ``hits`` ``(N,)`` bool (the task's PCK
    rule; False where unlabelled), ``tolerance`` the radii ``(rx, ry)`` of the correct region in
    original target pixels."""

    gt: torch.Tensor
    labelled: torch.Tensor
    hits: torch.Tensor
    alpha: float
    tolerance: tuple[float, float]

    def states(self) -> list[bool | None]:
        """Per point: True (correct), False (wrong) or None (no ground truth)."""
        return [
            bool(h) if k else None
            for h, k in zip(self.hits.tolist(), self.labelled.tolist(), strict=True)
        ]


def disc(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, colour: tuple) -> None:
    draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=OUTLINE, width=2)


def ring(draw: ImageDraw.ImageDraw, x: float, y: float, r: float) -> None:
    """The ground-truth marker: a hollow ring, black outside, white inside."""
    draw.ellipse((x - r, y - r, x + r, y + r), outline=OUTLINE, width=5)
    draw.ellipse((x - r + 2, y - r + 2, x + r - 2, y + r - 2), outline=(255, 255, 255), width=2)


def cross(
    draw: ImageDraw.ImageDraw, x: float, y: float, r: float, colour: tuple, upright: bool
) -> None:
    """A thick cross with a black halo: ``+`` when ``upright``, else ``x``."""
    d = r if upright else r / math.sqrt(2) * 1.2
    arms = [((x - d, y), (x + d, y)), ((x, y - d), (x, y + d))]
    if not upright:
        arms = [((x - d, y - d), (x + d, y + d)), ((x - d, y + d), (x + d, y - d))]
    width = max(3, round(r / 2.5))
    for ends in arms:
        draw.line(ends, fill=OUTLINE, width=width + 4)
    for ends in arms:
        draw.line(ends, fill=colour, width=width)


def dashed(draw: ImageDraw.ImageDraw, a: tuple, b: tuple, colour: tuple, width: int) -> None:
    length = math.dist(a, b)
    steps = max(1, int(length // 6))
    for k in range(0, steps, 2):
        t0, t1 = k / steps, min(1.0, (k + 1) / steps)
        p0 = (a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0)
        p1 = (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)
        draw.line((p0, p1), fill=colour, width=width)


def dotted_ellipse(draw: ImageDraw.ImageDraw, box: Box | tuple, colour: tuple) -> None:
    for start in range(0, 360, 24):
        draw.arc(box, start, start + 12, fill=colour, width=2)


def number(
    draw: ImageDraw.ImageDraw, x: float, y: float, r: float, k: int, below: bool = False
) -> None:
    """Label ``k`` on a white tag up and right of a marker at ``(x, y)`` of radius ``r`` (down and
    left when ``below``: a ground truth's tag stays clear of a nearby prediction's)."""
    text, f = str(k), font(13)
    width = draw.textlength(text, font=f)
    at = (x - r - 3 - width, y + r) if below else (x + r + 3, y - r - 14)
    left, top, right, bottom = draw.textbbox(at, text, font=f)
    draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill="white", outline=OUTLINE)
    draw.text(at, text, fill="black", font=f)


def _swatch(paint) -> Swatch:
    def draw_marker(draw: ImageDraw.ImageDraw, box: Box) -> None:
        x, y, r = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2 - 1
        paint(draw, x, y, r)

    return draw_marker


def match_legend(outcome: Outcome | None) -> list[LegendEntry]:
    """The legend of a picture: the marker of each kind, with the counts of correct and wrong
    predictions and the tolerance when the pair has a ground truth."""
    entries = [
        LegendEntry("source point (numbered)", _swatch(lambda d, x, y, r: disc(d, x, y, r, SOURCE)))
    ]
    if outcome is None:
        paint = _swatch(lambda d, x, y, r: cross(d, x, y, r, NEUTRAL, True))
        return [*entries, LegendEntry("prediction (same number)", paint)]
    states = outcome.states()
    counts = {state: states.count(state) for state in (True, False, None)}
    rx, ry = outcome.tolerance
    radius = f"{rx:.1f}" if math.isclose(rx, ry) else f"{rx:.1f} x {ry:.1f}"
    entries += [
        LegendEntry("ground truth", _swatch(lambda d, x, y, r: ring(d, x, y, r))),
        LegendEntry(
            f"correct prediction ({counts[True]})",
            _swatch(lambda d, x, y, r: cross(d, x, y, r, CORRECT, True)),
        ),
        LegendEntry(
            f"wrong prediction ({counts[False]})",
            _swatch(lambda d, x, y, r: cross(d, x, y, r, WRONG, False)),
        ),
        LegendEntry(
            f"tolerance alpha={outcome.alpha:g}: {radius} target px",
            _swatch(lambda d, x, y, r: dotted_ellipse(d, (x - r, y - r, x + r, y + r), OUTLINE)),
        ),
    ]
    if counts[None]:
        paint = _swatch(lambda d, x, y, r: cross(d, x, y, r, NEUTRAL, True))
        entries.append(LegendEntry(f"prediction without ground truth ({counts[None]})", paint))
    return entries


def draw_matches(
    src: torch.Tensor,
    trg: torch.Tensor,
    src_pts: torch.Tensor,
    pred_pts: torch.Tensor,
    outcome: Outcome | None = None,
    lines: Sequence[str] = (),
) -> Image.Image:
    """Source and target ``(3, H, W)`` uint8 images side by side (small ones enlarged), ``lines``
    as the title, a legend below.

    ``src_pts`` ``(N, 2)``: query points in original source pixels; ``pred_pts`` ``(N, 2)``: their
    predictions in original target pixels; ``outcome``: the ground truth and whether each
    prediction is correct (styles in the module docstring).
    """
    a, b = as_pil(src), as_pil(trg)
    sa, sb = display_scale(*a.size), display_scale(*b.size)
    a, b = enlarged(a, sa), enlarged(b, sb)
    canvas = Image.new("RGB", (a.width + PAD + b.width, max(a.height, b.height)), "white")
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + PAD, 0))
    draw = ImageDraw.Draw(canvas)
    r = max(6.0, max(canvas.size) / 90)
    x0 = a.width + PAD

    def on_target(point: torch.Tensor) -> tuple[float, float]:
        return x0 + float(point[0]) * sb, float(point[1]) * sb

    src_xy = [(float(p[0]) * sa, float(p[1]) * sa) for p in src_pts]
    pred_xy = [on_target(p) for p in pred_pts]
    states = [None] * len(pred_xy) if outcome is None else outcome.states()
    gt_xy = {}
    if outcome is not None:
        gt_xy = {k: on_target(p) for k, p in enumerate(outcome.gt) if states[k] is not None}
        rx, ry = (t * sb for t in outcome.tolerance)
    for k, (gx, gy) in gt_xy.items():
        colour = CORRECT if states[k] else WRONG
        dotted_ellipse(draw, (gx - rx, gy - ry, gx + rx, gy + ry), colour)
        if states[k]:
            draw.line(((gx, gy), pred_xy[k]), fill=colour, width=3)
        else:
            dashed(draw, (gx, gy), pred_xy[k], colour, 3)
    for gx, gy in gt_xy.values():
        ring(draw, gx, gy, r)
    for k, (x, y) in enumerate(src_xy):
        disc(draw, x, y, r * 0.8, SOURCE)
        number(draw, x, y, r * 0.8, k + 1)
    for k, ((x, y), hit) in enumerate(zip(pred_xy, states, strict=True)):
        colour = NEUTRAL if hit is None else CORRECT if hit else WRONG
        cross(draw, x, y, r, colour, upright=hit is not False)
        number(draw, x, y, r, k + 1)
    for k, (gx, gy) in gt_xy.items():
        number(draw, gx, gy, r, k + 1, below=True)
    parts = [title(lines, canvas.width)] if lines else []
    return stack([*parts, canvas, legend(match_legend(outcome), canvas.width)])
