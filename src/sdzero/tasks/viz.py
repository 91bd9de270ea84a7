"""Building blocks of the result pictures: fonts, titles, legends, the random-weights stamp.

The pictures themselves are drawn by :mod:`sdzero.tasks.match_viz` (correspondence) and
:mod:`sdzero.tasks.label_viz` (segmentation). Everything is PIL with its bundled font (ASCII text
only: the font has no Greek letters), so drawing needs no extra dependency and no display.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_SIDE = 400  # pictures show each image with its longer side at least this many pixels
PAD = 8
TEXT_SIZE = 15
RANDOM_WEIGHTS_STAMP = "RANDOM WEIGHTS - numbers meaningless"
STAMP_RED = (200, 0, 0)

Box = tuple[int, int, int, int]
Swatch = Callable[[ImageDraw.ImageDraw, Box], None]


@lru_cache(maxsize=16)
def font(size: int = TEXT_SIZE) -> ImageFont.FreeTypeFont:
    """PIL's bundled scalable font at ``size`` pixels."""
    return ImageFont.load_default(size=size)


def as_pil(image: torch.Tensor | np.ndarray) -> Image.Image:
    """A ``(3, H, W)`` uint8 tensor or an ``(H, W, 3)`` uint8 array as an RGB image."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(image).astype(np.uint8), "RGB")


def png(image: Image.Image) -> bytes:
    """``image`` encoded as PNG (for :func:`~sdzero.records.write_bytes_atomic`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def display_scale(w: int, h: int) -> float:
    """The factor an image of ``w x h`` pixels is drawn at: small images are enlarged to
    :data:`MIN_SIDE` so markers, numbers and labels stay readable; large ones are kept."""
    return max(1.0, MIN_SIDE / max(w, h, 1))


def enlarged(image: Image.Image, scale: float, resample: int = Image.BILINEAR) -> Image.Image:
    """``image`` resized by ``scale`` (both sides rounded)."""
    if scale == 1.0:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, resample)


def text_width(text: str, size: int = TEXT_SIZE) -> int:
    left, _, right, _ = font(size).getbbox(text)
    return int(right - left)


def wrap(text: str, width: int, size: int = TEXT_SIZE) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide (a longer word stays
    whole on its own line)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and text_width(f"{lines[-1]} {word}", size) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def title(lines: Sequence[str], width: int, size: int = TEXT_SIZE + 1) -> Image.Image:
    """White strip ``width`` wide with ``lines`` (wrapped) in black, the first one larger."""
    wrapped = [
        (part, s)
        for i, text in enumerate(lines)
        for s in [size + 3 if i == 0 else size]
        for part in wrap(text, width - 2 * PAD, s)
    ]
    height = PAD + sum(round(s * 1.35) for _, s in wrapped) + PAD // 2
    strip = Image.new("RGB", (width, height), "white")
    draw, y = ImageDraw.Draw(strip), PAD
    for text, s in wrapped:
        draw.text((PAD, y), text, fill="black", font=font(s))
        y += round(s * 1.35)
    return strip


@dataclass(frozen=True)
class LegendEntry:
    """One legend item: ``swatch`` draws the marker or colour into a square box, then ``label``."""

    label: str
    swatch: Swatch


def filled(colour: tuple[int, int, int]) -> Swatch:
    """A swatch that is a square of ``colour`` with a grey outline."""

    def draw_square(draw: ImageDraw.ImageDraw, box: Box) -> None:
        draw.rectangle(box, fill=colour, outline=(90, 90, 90))

    return draw_square


def legend(entries: Sequence[LegendEntry], width: int, size: int = TEXT_SIZE) -> Image.Image:
    """White strip at least ``width`` wide: the entries left to right, wrapping into rows (wider
    than ``width`` only when one entry alone is wider)."""
    side, gap = size + 5, 3 * PAD
    widths = [side + PAD // 2 + text_width(e.label, size) for e in entries]
    width = max([width, *(w + 2 * PAD for w in widths)])
    rows: list[list[int]] = [[]]
    x = PAD
    for i, w in enumerate(widths):
        if rows[-1] and x + w > width - PAD:
            rows.append([])
            x = PAD
        rows[-1].append(i)
        x += w + gap
    row_h = side + PAD
    strip = Image.new("RGB", (width, PAD + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        x, y = PAD, PAD + r * row_h
        for i in row:
            entries[i].swatch(draw, (x, y, x + side, y + side))
            draw.text((x + side + PAD // 2, y + 2), entries[i].label, fill="black", font=font(size))
            x += widths[i] + gap
    return strip


def stack(parts: Sequence[Image.Image]) -> Image.Image:
    """``parts`` one below the other, left-aligned, on white."""
    canvas = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    y = 0
    for part in parts:
        canvas.paste(part, (0, y))
        y += part.height
    return canvas


def stamp_lines(width: int) -> tuple[int, list[str]]:
    """Font size and lines of the random-weights banner on a picture ``width`` pixels wide."""
    size = int(min(48, max(18, width // 22)))
    return size, wrap(RANDOM_WEIGHTS_STAMP, width - 2 * PAD, size)


def stamp_height(width: int) -> int:
    """Height of the random-weights banner on a picture ``width`` pixels wide."""
    size, lines = stamp_lines(width)
    return round(size * (0.4 + 1.2 * len(lines)))


def stamp_random_weights(image: Image.Image) -> Image.Image:
    """``image`` below a red banner saying :data:`RANDOM_WEIGHTS_STAMP` in large white letters
    (wrapped on narrow pictures), all framed in red: a picture of a random-weight run cannot be
    mistaken for a result."""
    size, lines = stamp_lines(image.width)
    banner = Image.new("RGB", (image.width, stamp_height(image.width)), STAMP_RED)
    draw = ImageDraw.Draw(banner)
    for k, line in enumerate(lines):
        left = max(PAD, (image.width - text_width(line, size)) // 2)
        draw.text((left, round(size * (0.2 + 1.2 * k))), line, fill="white", font=font(size))
    out = stack([banner, image])
    ImageDraw.Draw(out).rectangle((0, 0, out.width - 1, out.height - 1), outline=STAMP_RED, width=4)
    return out
