"""The query-point check every correspondence entry point shares (light: torch only, so
``sdzero match`` checks its points before any method module or model loads)."""

from __future__ import annotations

import torch

from sdzero.errors import InputError


def check_query_points(
    points: torch.Tensor, width: int, height: int, image: str = "source image"
) -> None:
    """:class:`InputError` unless every ``(x, y)`` of ``points`` ``(N, 2)`` (pixels of the original
    source image, edges included) lies in the ``width`` x ``height`` image named ``image``."""
    outside = (
        (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (points[:, 1] > height)
    )
    outside |= ~torch.isfinite(points).all(dim=1)  # NaN compares False: not inside either
    if outside.any():
        bad = points[outside][0].tolist()
        raise InputError(
            f"query point {bad} lies outside the {width}x{height} (w x h) {image}; expected "
            f"0 <= x <= {width} and 0 <= y <= {height}"
        )
