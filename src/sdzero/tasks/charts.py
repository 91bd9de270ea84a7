"""Bar charts of a correspondence run's ``metrics.json`` breakdowns, drawn with PIL alone."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageFont

from sdzero.metrics.pck_breakdown import LEVEL_NAMES

IMAGE_COLOUR, POINT_COLOUR = (52, 101, 164), (245, 121, 0)
LABEL_W, BAR_W, VALUE_W, ROW_H, PAD = 220, 460, 60, 22, 10


def breakdown_rows(summary: dict[str, Any], alpha: str) -> list[tuple[str, list[tuple]]]:
    """``[(section title, [(label, per-image PCK, per-point PCK), ...]), ...]`` at ``alpha``: one
    section per difficulty factor (levels named, with their pair counts) when the summary has
    ``by_difficulty``, then one of the categories."""
    sections = []
    for factor, levels in summary.get("by_difficulty", {}).items():
        rows = [
            (
                f"{LEVEL_NAMES[factor][int(level)]} ({v['num_pairs']} pairs)",
                v["pck"][alpha],
                v["pck_point"][alpha],
            )
            for level, v in levels.items()
        ]
        sections.append((factor.replace("_", " "), rows))
    categories = [
        (name, v[alpha], summary["per_category_point"][name][alpha])
        for name, v in summary["per_category"].items()
    ]
    categories.append(
        (
            "mean of categories",
            summary["pck_category_mean"][alpha],
            summary["pck_point_category_mean"][alpha],
        )
    )
    sections.append(("category", categories))
    return sections


def breakdown_chart(summary: dict[str, Any], alpha: str) -> Image.Image:
    """Horizontal bars, 0-100 %: for each row of :func:`breakdown_rows` the per-image PCK (blue)
    above the per-point PCK (orange), each with its value."""
    sections = breakdown_rows(summary, alpha)
    font = ImageFont.load_default()
    rows = sum(len(r) for _, r in sections)
    height = PAD + ROW_H * (2 + len(sections) + rows) + PAD
    image = Image.new("RGB", (LABEL_W + BAR_W + VALUE_W + 2 * PAD, height), "white")
    draw = ImageDraw.Draw(image)
    title = (
        f"{summary.get('dataset', 'correspondence')}: PCK@{alpha} per image (blue) and per "
        f"point (orange), {summary['num_pairs']} pairs"
    )
    draw.text((PAD, PAD), title, fill="black", font=font)
    y = PAD + ROW_H
    x0 = PAD + LABEL_W
    for heading, entries in sections:
        y += ROW_H // 2
        draw.text((PAD, y), heading, fill="black", font=font)
        y += ROW_H // 2 + 4
        for label, per_image, per_point in entries:
            draw.text((PAD + 8, y + 4), label, fill="black", font=font)
            for k, (value, colour) in enumerate(
                ((per_image, IMAGE_COLOUR), (per_point, POINT_COLOUR))
            ):
                top = y + 1 + k * (ROW_H // 2 - 1)
                right = x0 + BAR_W * max(0.0, min(float(value), 100.0)) / 100.0
                draw.rectangle([x0, top, right, top + ROW_H // 2 - 3], fill=colour)
                draw.text((x0 + BAR_W + 6, top - 1), f"{value:.1f}", fill=colour, font=font)
            y += ROW_H
    draw.line([x0, PAD + ROW_H, x0, y], fill="grey")
    return image
