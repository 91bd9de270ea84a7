"""Side-by-side match drawings: source | target with a line from each query to its prediction."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw


def draw_matches(
    src: torch.Tensor,
    trg: torch.Tensor,
    src_pts: torch.Tensor,
    pred_pts: torch.Tensor,
    gt_pts: torch.Tensor | None = None,
) -> Image.Image:
    """Draw source and target ``(3, H, W)`` uint8 images side by side.

    Points are ``(N, 2)`` (x, y) in each image's original pixels. Each query gets its own colour: a
    dot on the source, a line to its prediction on the target, and (if given) a hollow circle at the
    ground-truth target point.
    """
    a = Image.fromarray(src.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    b = Image.fromarray(trg.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    canvas = Image.new("RGB", (a.width + b.width, max(a.height, b.height)))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width, 0))
    draw = ImageDraw.Draw(canvas)
    r = max(2, round(max(canvas.size) / 150))
    n = len(src_pts)
    for i in range(n):
        colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(n, 1), 0.9, 1.0))
        sx, sy = (float(v) for v in src_pts[i])
        px, py = float(pred_pts[i][0]) + a.width, float(pred_pts[i][1])
        draw.line([(sx, sy), (px, py)], fill=colour, width=max(1, r // 2))
        draw.ellipse([sx - r, sy - r, sx + r, sy + r], fill=colour)
        draw.ellipse([px - r, py - r, px + r, py + r], fill=colour)
        if gt_pts is not None:
            gx, gy = float(gt_pts[i][0]) + a.width, float(gt_pts[i][1])
            draw.ellipse([gx - 2 * r, gy - 2 * r, gx + 2 * r, gy + 2 * r], outline=colour, width=2)
    return canvas
