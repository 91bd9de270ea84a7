"""SD+DINO's square input: the image's longer side scaled to ``S`` with PIL's LANCZOS filter and the
image centred on a black ``S x S`` canvas (Junyi42/sd-dino, ``utils_correspondence.resize`` with
``edge=False``; keypoints as its ``preprocess_kps_pad``).

Points map as the official keypoints do: ``x_model = x * S / max(w, h) + offset_x`` (likewise y),
where the offset is half the padding, rounded down, on the shorter axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sdzero.tasks.frames import resized


@dataclass(frozen=True)
class CentredFrame:
    """Geometry of one ``w x h`` image in the ``size x size`` centred frame (the interface of
    :class:`~sdzero.tasks.frames.ModelFrame` that the correspondence base reads)."""

    w: int
    h: int
    size: int

    @property
    def content_wh(self) -> tuple[int, int]:
        """Size of the resized image inside the frame (the shorter side rounded half to even,
        as ``np.around``)."""
        if self.h <= self.w:
            return self.size, int(np.around(self.size * self.h / self.w))
        return int(np.around(self.size * self.w / self.h)), self.size

    @property
    def offset(self) -> tuple[int, int]:
        """``(x, y)`` model pixels of the content's top-left corner."""
        cw, ch = self.content_wh
        return (self.size - cw) // 2, (self.size - ch) // 2

    @property
    def scale(self) -> float:
        return self.size / max(self.w, self.h)

    def to_model(self, points_xy: torch.Tensor) -> torch.Tensor:
        """``(N, 2)`` original pixels -> model frame."""
        return points_xy * self.scale + points_xy.new_tensor(self.offset)

    def to_original(self, points_xy: torch.Tensor) -> torch.Tensor:
        """``(N, 2)`` model frame -> original pixels."""
        return (points_xy - points_xy.new_tensor(self.offset)) / self.scale

    def image(self, image_u8: torch.Tensor) -> torch.Tensor:
        """``(3, h, w)`` uint8 -> ``(1, 3, S, S)`` float in [0, 1]: PIL LANCZOS on the uint8
        image, pasted centred on black, divided by 255."""
        cw, ch = self.content_wh
        content = resized(image_u8, (cw, ch), Image.Resampling.LANCZOS)
        canvas = torch.zeros(3, self.size, self.size)
        x0, y0 = self.offset
        canvas[:, y0 : y0 + ch, x0 : x0 + cw] = content
        return canvas[None]
