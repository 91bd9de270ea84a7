"""The model frame: an original image of ``(w, h)`` pixels mapped onto the ``S×S`` network input.

``stretch`` (the official code) resizes to ``S×S`` without keeping the aspect ratio;
``letterbox`` scales the longer side to ``S`` and pads the rest (right/bottom) with black.
Points map by per-axis scale factors: ``x_model = x_orig * sx``, ``y_model = y_orig * sy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESIZE_MODES = ("stretch", "letterbox")
# PIL filters of the resize to the model frame: bilinear (Hedlin's loaders), bicubic (PIL's default
# for ``Image.resize``, which DIFT's official code relies on).
RESAMPLE_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def resized(image_u8: torch.Tensor, size_wh: tuple[int, int], resample: int) -> torch.Tensor:
    """``(3, h, w)`` uint8 -> ``(3, H, W)`` float in [0, 1] for ``size_wh = (W, H)``: PIL's
    ``resample`` filter on the uint8 image, then divided by 255 (as the official loaders do)."""
    if image_u8.ndim != 3 or image_u8.shape[0] != 3 or image_u8.dtype != torch.uint8:
        raise ValueError(
            f"expected a (3, H, W) uint8 RGB image, got {image_u8.dtype} "
            f"of shape {tuple(image_u8.shape)}"
        )
    pil = Image.fromarray(image_u8.permute(1, 2, 0).cpu().contiguous().numpy())
    if pil.size != tuple(size_wh):
        pil = pil.resize(tuple(size_wh), resample)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div(255)


@dataclass(frozen=True)
class ModelFrame:
    """Geometry of one image: original ``(w, h)``, model side ``size``, ``mode``; ``resample``
    names the PIL filter :meth:`image` resizes with (a key of ``RESAMPLE_FILTERS``)."""

    w: int
    h: int
    size: int
    mode: str = "stretch"
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"method.resize must be one of {RESIZE_MODES}, got {self.mode!r}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(
                f"method.resample must be one of {list(RESAMPLE_FILTERS)}, got {self.resample!r}"
            )

    @property
    def content_wh(self) -> tuple[int, int]:
        """Size of the resized image content inside the ``S×S`` frame."""
        if self.mode == "stretch":
            return self.size, self.size
        s = self.size / max(self.w, self.h)
        return max(1, round(self.w * s)), max(1, round(self.h * s))

    @property
    def scale(self) -> tuple[float, float]:
        cw, ch = self.content_wh
        return cw / self.w, ch / self.h

    def to_model(self, points_xy: torch.Tensor) -> torch.Tensor:
        """``(N, 2)`` original pixels -> model frame."""
        return points_xy * points_xy.new_tensor(self.scale)

    def to_original(self, points_xy: torch.Tensor) -> torch.Tensor:
        """``(N, 2)`` model frame -> original pixels."""
        return points_xy / points_xy.new_tensor(self.scale)

    def box_to_model(self, box: torch.Tensor) -> torch.Tensor:
        """``[x1, y1, x2, y2]`` original pixels -> model frame."""
        sx, sy = self.scale
        return box * box.new_tensor([sx, sy, sx, sy])

    def image(self, image_u8: torch.Tensor) -> torch.Tensor:
        """``(3, h, w)`` uint8 -> ``(1, 3, S, S)`` float in [0, 1].

        Resized as the official loaders do: PIL on the uint8 image (bilinear: torchvision's
        ``Resize`` of a PIL image; bicubic: ``Image.resize``'s default), then divided by 255, so
        the VAE sees the official pixels.
        """
        cw, ch = self.content_wh
        x = resized(image_u8, (cw, ch), RESAMPLE_FILTERS[self.resample])[None]
        if (cw, ch) != (self.size, self.size):
            x = F.pad(x, (0, self.size - cw, 0, self.size - ch))
        return x
