"""Segmentation pictures: image | ground truth | prediction panels, and a prediction overlay.

Classes have fixed colours (:func:`class_palette`): a class named ``background`` is black (and
left untinted in overlays), the others spread hues; pixels outside the classes (the ground truth's
``ignore_index``) are white.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdzero.metrics.miou import MeanIoU
from sdzero.tasks.viz import (
    PAD,
    LegendEntry,
    as_pil,
    display_scale,
    enlarged,
    filled,
    font,
    legend,
    stack,
    title,
)

BACKGROUND = "background"
IGNORED = (255, 255, 255)
OVERLAY_ALPHA = 0.5


def class_palette(class_names: Sequence[str]) -> np.ndarray:
    """``(C, 3)`` uint8 colours, one per class: ``background`` black, class ``c`` the hue
    ``c * golden ratio`` (neighbouring indices far apart)."""
    hues = [(c * 0.618034) % 1.0 for c in range(len(class_names))]
    palette = np.array([colorsys.hsv_to_rgb(h, 0.8, 0.9) for h in hues]) * 255
    for c, name in enumerate(class_names):
        if name == BACKGROUND:
            palette[c] = 0
    return palette.round().astype(np.uint8)


def colourise(labels: torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """``(H, W)`` class indices -> ``(H, W, 3)`` uint8 palette colours (white outside the classes)."""
    values = labels.detach().cpu().numpy()
    out = np.full((*values.shape, 3), IGNORED, dtype=np.uint8)
    inside = (values >= 0) & (values < len(palette))
    out[inside] = palette[values[inside]]
    return out


def image_iou(
    pred: torch.Tensor, label: torch.Tensor, class_names: Sequence[str], ignore_index: int | None
) -> dict[str, Any]:
    """The task's IoU on one image alone (:class:`~sdzero.metrics.miou.MeanIoU`, not synced
    across ranks): ``{"miou": % or None, "per_class_iou": {name: % or None}}``, None where no
    pixel is scored (a class absent from both maps; every pixel ignored)."""
    metric = MeanIoU(class_names, ignore_index, sync_on_compute=False)
    metric.update(pred.cpu(), label.cpu())
    if not bool(metric.confmat.sum()):
        return {"miou": None, "per_class_iou": dict.fromkeys(class_names)}
    computed = metric.compute()
    return {"miou": computed["miou"], "per_class_iou": computed["per_class_iou"]}


def class_legend(
    per_class_iou: dict[str, float | None], palette: np.ndarray, ignored: bool
) -> list[LegendEntry]:
    """One entry per class present (IoU not None, in class order) with its colour and IoU, then
    ``ignored`` pixels when the ground truth has some."""
    entries = [
        LegendEntry(f"{name}: IoU {iou:.1f}%", filled(tuple(int(v) for v in palette[c])))
        for c, (name, iou) in enumerate(per_class_iou.items())
        if iou is not None
    ]
    if ignored:
        entries.append(LegendEntry("ignored (not scored)", filled(IGNORED)))
    return entries


def _panel(image: Image.Image, heading: str) -> Image.Image:
    head = Image.new("RGB", (image.width, 24), "white")
    ImageDraw.Draw(head).text((2, 4), heading, fill="black", font=font(16))
    return stack([head, image])


def draw_segmentation(
    image: torch.Tensor,
    label: torch.Tensor,
    pred: torch.Tensor,
    class_names: Sequence[str],
    ignore_index: int | None,
    sample_id: str = "",
) -> Image.Image:
    """Image ``(3, H, W)`` uint8 | ground truth ``(H, W)`` | prediction ``(H, W)`` (class
    indices at the image's size), each titled; above, the image's IoU (mean over the classes
    present in either map); below, a legend of those classes with their colours and IoUs."""
    scores = image_iou(pred, label, class_names, ignore_index)
    palette = class_palette(class_names)
    scale = display_scale(image.shape[2], image.shape[1])
    panels = [enlarged(as_pil(image), scale)]
    for labels in (label, pred):
        panels.append(enlarged(as_pil(colourise(labels, palette)), scale, Image.NEAREST))
    panels = [
        _panel(p, h) for p, h in zip(panels, ("image", "ground truth", "prediction"), strict=True)
    ]
    row = Image.new("RGB", (sum(p.width for p in panels) + PAD * 2, panels[0].height), "white")
    for k, p in enumerate(panels):
        row.paste(p, (k * (p.width + PAD), 0))
    present = [v for v in scores["per_class_iou"].values() if v is not None]
    headline = (
        "no scored pixel"
        if scores["miou"] is None
        else f"IoU of this image: {scores['miou']:.1f}% (mean over the {len(present)} classes "
        "in the ground truth or the prediction)"
    )
    ignored = ignore_index is not None and bool((label == ignore_index).any())
    entries = class_legend(scores["per_class_iou"], palette, ignored)
    return stack([title([sample_id, headline], row.width), row, legend(entries, row.width)])


def blend(image: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> np.ndarray:
    """``(H, W, 3)`` uint8: each pixel of the ``(3, H, W)`` uint8 image mixed with its class's
    colour, ``(1 - a) * pixel + a * colour`` rounded, ``a`` = :data:`OVERLAY_ALPHA`; pixels of
    ``background`` (and outside the classes) keep the image's colour."""
    pixels = image.detach().cpu().permute(1, 2, 0).numpy().astype(np.float64)
    values = labels.detach().cpu().numpy()
    tint = (values >= 0) & (values < len(class_names))
    names = np.array(list(class_names), dtype=object)
    tint[tint] = names[values[tint]] != BACKGROUND
    colours = class_palette(class_names).astype(np.float64)
    out = pixels.copy()
    out[tint] = (1 - OVERLAY_ALPHA) * pixels[tint] + OVERLAY_ALPHA * colours[values[tint]]
    return out.round().astype(np.uint8)


def overlay_legend(labels: torch.Tensor, class_names: Sequence[str]) -> list[LegendEntry]:
    """One entry per class the map holds, in class order: its colour and pixel share."""
    counts = torch.bincount(labels.flatten().cpu(), minlength=len(class_names))
    palette = class_palette(class_names)
    return [
        LegendEntry(
            f"{name} ({100 * float(counts[c]) / labels.numel():.1f}%"
            + (", untinted)" if name == BACKGROUND else ")"),
            filled(IGNORED if name == BACKGROUND else tuple(int(v) for v in palette[c])),
        )
        for c, name in enumerate(class_names)
        if counts[c] > 0
    ]


def draw_overlay(
    image: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
) -> Image.Image:
    """The prediction over the image: :func:`blend` at the image's own size (top left, every
    pixel of it the blend), a legend of the classes below it."""
    top = as_pil(blend(image, labels, class_names))
    return stack([top, legend(overlay_legend(labels, class_names), top.width)])
