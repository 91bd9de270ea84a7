"""Why a pixel got its label: the prototype that decided it, and the support image region behind it.

The final scores average many (extractor, window) pairs, so no single prototype decides a pixel;
the *winner* is the pair whose score for the pixel's label is highest at that pixel, and within it the
best-matching prototype of that channel (a foreground prototype of the label's class, or on the
background channel a background prototype of some kept class). Its support image and region come
from :class:`~sdzero.segmentation.prototypes.Prototypes` (``fg_image``/``fg_region`` etc.).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from sdzero.segmentation.inference import Segmentation, labels_from_scores

KINDS = {0: "class mean", 1: "per-image mean", 2: "k-means centre"}
PANEL_HEIGHT = 320


@dataclass(frozen=True)
class Winner:
    """The prototype that decided a pixel: ``owner`` (label index) and row ``prototype`` in its
    ``fg``/``bg`` (``side``), from ``extractor``, with similarity ``score``; ``label`` the pixel's."""

    extractor: str
    label: int
    owner: int
    side: str
    prototype: int
    score: float


def _winners(seg: Segmentation, ys: Tensor, xs: Tensor, channels: Tensor) -> dict[str, Tensor]:
    """Winning pair per working-frame pixel ``(ys, xs)`` for channel ``channels`` (all ``(N,)``);
    a pair reads its maps at the feature cell nearest to the pixel."""
    if not seg.pairs:
        raise RuntimeError("explanations need a segmentation run with explain=True")
    best = torch.full(ys.shape, -float("inf"))
    out = {
        k: torch.full(ys.shape, -1, dtype=torch.long) for k in ("extractor", "owner", "prototype")
    }
    for pair in seg.pairs:
        w = pair.window
        (gh, gw), (h, wd) = pair.values.shape[-2:], w.size
        inside = (xs >= w.x1) & (xs < w.x2) & (ys >= w.y1) & (ys < w.y2)
        cy = ((ys - w.y1).clamp(0, h - 1) * gh) // h
        cx = ((xs - w.x1).clamp(0, wd - 1) * gw) // wd
        value = torch.where(inside, pair.values[channels, cy, cx].cpu(), -float("inf"))
        better = value > best
        best = torch.where(better, value, best)
        out["extractor"][better] = pair.extractor
        out["owner"][better] = pair.owner[channels, cy, cx].cpu()[better]
        out["prototype"][better] = pair.prototype[channels, cy, cx].cpu()[better]
    return {**out, "score": best}


def winner_maps(seg: Segmentation) -> dict[str, Tensor]:
    """Per working-frame pixel ``(h, w)``: ``extractor`` (index into ``seg.extractors``), ``owner``,
    ``prototype`` and ``score`` of the winner for the pixel's working-frame label."""
    height, width = seg.scores.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return _winners(seg, ys, xs, labels_from_scores(seg.scores, (height, width)).cpu())


def winner_at(seg: Segmentation, x: int, y: int) -> Winner:
    """The winner for original-image pixel ``(x, y)`` and its final label."""
    height, width = seg.image_size
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"pixel ({x}, {y}) lies outside the {width}x{height} (w x h) image")
    lh, lw = seg.labels.shape
    label = int(seg.labels[y * lh // height, x * lw // width])
    sh, sw = seg.scores.shape[-2:]
    ys, xs = torch.tensor([y * sh // height]), torch.tensor([x * sw // width])
    found = {k: v.item() for k, v in _winners(seg, ys, xs, torch.tensor([label])).items()}
    side = "bg" if label == seg.background_index else "fg"
    extractor = seg.extractors[found["extractor"]]
    return Winner(extractor, label, found["owner"], side, found["prototype"], found["score"])


@dataclass(frozen=True)
class Explanation:
    """A pixel ``(x, y)`` (original-image pixels), its label, and the deciding prototype: its class,
    kind, support image (None for a prototype no single image explains) and region ``(gh, gw)``."""

    x: int
    y: int
    label_name: str
    winner: Winner
    owner_name: str
    kind: str
    support_image: str | None
    region: Tensor | None

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description."""
        w = self.winner
        return {
            "pixel": [self.x, self.y],
            "label": self.label_name,
            "prototype": {
                "class": self.owner_name,
                "side": "foreground" if w.side == "fg" else "background",
                "kind": self.kind,
                "extractor": w.extractor,
                "index": w.prototype,
                "similarity": round(w.score, 4),
                "support_image": self.support_image,
            },
        }


def explain_pixel(
    seg: Segmentation,
    x: int,
    y: int,
    prototypes: Mapping[int, Mapping[str, Any]],
    class_names: Sequence[str],
) -> Explanation:
    """Explain original-image pixel ``(x, y)``.

    :param prototypes: ``{label index: {extractor name: Prototypes}}`` as scored.
    """
    w = winner_at(seg, x, y)
    if w.owner < 0 or w.prototype < 0:
        return Explanation(x, y, class_names[w.label], w, "none", "none", None, None)
    proto = prototypes[w.owner][w.extractor]
    kind = int(getattr(proto, f"{w.side}_kind")[w.prototype])
    image = int(getattr(proto, f"{w.side}_image")[w.prototype])
    support = proto.support[image] if image >= 0 else None
    region = getattr(proto, f"{w.side}_region")[w.prototype] if image >= 0 else None
    owner = class_names[w.owner]
    return Explanation(
        x, y, class_names[w.label], w, owner, KINDS.get(kind, str(kind)), support, region
    )


def _fit(image: Image.Image) -> Image.Image:
    width = max(1, round(image.width * PANEL_HEIGHT / image.height))
    return image.resize((width, PANEL_HEIGHT), Image.Resampling.BILINEAR)


def render_explanation(image: Tensor, explanation: Explanation, path: str | Path) -> None:
    """PNG: the test image ``(3, H, W)`` uint8 with the pixel marked | the support image, dimmed
    outside the prototype's region, and a caption naming the label, class and prototype kind."""
    test = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    scale = PANEL_HEIGHT / test.height
    test = _fit(test)
    draw = ImageDraw.Draw(test)
    cx, cy, r = (explanation.x + 0.5) * scale, (explanation.y + 0.5) * scale, 8
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(255, 255, 0), width=3)
    draw.line((cx - 2 * r, cy, cx + 2 * r, cy), fill=(255, 255, 0), width=1)
    draw.line((cx, cy - 2 * r, cx, cy + 2 * r), fill=(255, 255, 0), width=1)

    support_path = explanation.support_image
    if support_path is not None and Path(support_path).is_file():
        with Image.open(support_path) as img:
            support = np.asarray(img.convert("RGB"), dtype=np.float32)
        if explanation.region is not None:
            region = Image.fromarray(explanation.region.cpu().numpy().astype(np.uint8) * 255)
            mask = np.asarray(region.resize(support.shape[1::-1], Image.Resampling.NEAREST)) > 0
            support[~mask] *= 0.3  # dim what the prototype does not stand for
        right = _fit(Image.fromarray(support.astype(np.uint8)))
    else:
        right = Image.new("RGB", (PANEL_HEIGHT, PANEL_HEIGHT), (90, 90, 90))
        note = "no single support image" if support_path is None else "support image not found"
        ImageDraw.Draw(right).text((10, PANEL_HEIGHT // 2), note, fill=(255, 255, 255))

    w = explanation.winner
    side = "foreground" if w.side == "fg" else "background"
    caption = (
        f"pixel ({explanation.x}, {explanation.y}) -> {explanation.label_name}   decided by: "
        f"{explanation.owner_name} {side} prototype #{w.prototype} ({explanation.kind}, "
        f"{w.extractor}, cos {w.score:.3f})"
    )
    canvas = Image.new("RGB", (test.width + right.width + 10, PANEL_HEIGHT + 30), (255, 255, 255))
    canvas.paste(test, (0, 30))
    canvas.paste(right, (test.width + 10, 30))
    ImageDraw.Draw(canvas).text((5, 8), caption, fill=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
