"""The query-point check every correspondence entry point shares (plain Python, so ``sdzero
match`` checks its points against the image's size before torch or any method module loads)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sdzero.errors import InputError


def check_query_points(
    points: Sequence[Sequence[float]] | Any, width: int, height: int, image: str = "source image"
) -> None:
    """:class:`InputError` unless every ``(x, y)`` of ``points`` (``(N, 2)``: a tensor or pairs of
    numbers; pixels of the original source image, edges included) lies in the ``width`` x
    ``height`` image named ``image``."""
    rows = points.tolist() if hasattr(points, "tolist") else points
    for x, y in rows:
        # NaN compares False: not inside either
        if not (math.isfinite(x) and math.isfinite(y) and 0 <= x <= width and 0 <= y <= height):
            raise InputError(
                f"query point {[float(x), float(y)]} lies outside the {width}x{height} (w x h) "
                f"{image}; expected 0 <= x <= {width} and 0 <= y <= {height}"
            )
