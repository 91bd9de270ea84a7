"""Crop placement of the official correspondence code, in the model frame (the image resized to S×S).

A crop is an integer square box ``(x0, y0, size)`` in model-frame pixels; it is cut out and resized
back to S×S before the VAE. Every random draw takes an explicit ``torch.Generator`` so that each
(query point, embedding) has its own stream and batching cannot change the draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_size(image_size: int, crop_fraction: float) -> int:
    """Side of the square crops: ``int(S * fraction)`` (477 px for 512 and the official 93.165…%)."""
    size = int(image_size * crop_fraction)
    if not 0 < size <= image_size:
        raise ValueError(
            f"method.crop_fraction={crop_fraction} gives a crop of {size} px for S={image_size}"
        )
    return size


def _offset_range(q: float, size: int, image_size: int, margin: int) -> tuple[int, int]:
    """Integer offsets of a crop of ``size`` that keep coordinate ``q`` at least ``margin`` px from
    its borders, as the official ``crop_image``: both real bounds clamped to ``[0, S - size]``, then
    truncated with ``int()``. Near the image border the range collapses to the nearest feasible
    offset (the bounds never cross while ``margin < size / 2``)."""
    far = image_size - size
    lo = min(max(0.0, q - size + margin), far)
    hi = min(max(0.0, q - margin), far)
    return int(lo), int(hi)


def random_crop_around(
    point_xy: tuple[float, float],
    image_size: int,
    size: int,
    margin_fraction: float,
    generator: torch.Generator,
) -> tuple[int, int, int]:
    """A random crop containing ``point_xy`` (model frame) at least ``margin_fraction * size`` px
    from every crop border when possible (the official 15% rule); uniform over the valid offsets."""
    margin = int(size * margin_fraction)
    box = []
    for q in point_xy:
        lo, hi = _offset_range(float(q), size, image_size, margin)
        box.append(int(torch.randint(lo, hi + 1, (1,), generator=generator).item()))
    return box[0], box[1], size


def corner_crops(image_size: int, size: int) -> list[tuple[int, int, int]]:
    """The four corner crops in the official order: top-left, bottom-left, top-right, bottom-right
    (the x offset varies slowest; the official code crops around the points (0, 0), (0, S), (S, 0),
    (S, S))."""
    far = image_size - size
    return [(0, 0, size), (0, far, size), (far, 0, size), (far, far, size)]


def cut_and_resize(
    images: torch.Tensor, boxes: list[tuple[int, int, int]], out_size: int
) -> torch.Tensor:
    """Cut box ``i`` out of ``images[i]`` and resize it bilinearly to ``out_size``².

    :param images: ``(B, 3, S, S)`` or ``(1, 3, S, S)`` (shared by all boxes).
    :return: ``(len(boxes), 3, out_size, out_size)``.
    """
    crops = []
    for i, (x0, y0, size) in enumerate(boxes):
        img = images[i if images.shape[0] > 1 else 0]
        crop = img[:, y0 : y0 + size, x0 : x0 + size].unsqueeze(0)
        if size != out_size:
            crop = F.interpolate(
                crop, size=(out_size, out_size), mode="bilinear", align_corners=False
            )
        crops.append(crop)
    return torch.cat(crops).clamp(0, 1)


def to_crop_frame(point_xy: torch.Tensor, box: tuple[int, int, int], out_size: int) -> torch.Tensor:
    """Map ``(..., 2)`` model-frame points into the resized crop's frame (pixel-edge convention)."""
    x0, y0, size = box
    offset = point_xy.new_tensor([x0, y0])
    return (point_xy - offset) * (out_size / size)
