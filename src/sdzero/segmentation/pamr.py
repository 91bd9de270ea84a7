"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020), OVDiff's optional post-process.

Each pixel ``i`` gets affinities to its 8 neighbours ``j`` on 3x3 rings at several dilations:
``k_ij = -|I_i - I_j| / (eps + 0.1 * sigma_i)``, averaged over the colour channels, where ``sigma_i``
is the standard deviation of the colours sampled on all rings around ``i`` (centre included), then
softmax-normalised over the neighbours. The score maps are refined ``num_iter`` times by
``m_i <- sum_j a_ij m_j``. Borders replicate the edge pixels. OVDiff runs it with 10 iterations and
dilations 1, 2, 4, 8, 12, 24 on the image resized to a 448 short side.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# The 8 ring offsets (dy, dx) of a 3x3 neighbourhood, centre excluded.
_RING = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def _shifted(x: Tensor, dilations: Sequence[int]) -> list[Tensor]:
    """``x`` (B, C, H, W) read at every ring offset of every dilation, borders replicated."""
    height, width = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, [d, d, d, d], mode="replicate")
        for dy, dx in _RING:
            out.append(
                padded[..., d + dy * d : d + dy * d + height, d + dx * d : d + dx * d + width]
            )
    return out


def pamr_affinity(image: Tensor, dilations: Sequence[int]) -> Tensor:
    """Neighbour weights ``(B, 8 * len(dilations), H, W)`` summing to 1 over dim 1.

    :param image: ``(B, 3, H, W)`` float colours (any scale: the std normalisation removes it).
    """
    neighbours = torch.stack(_shifted(image, dilations), dim=2)  # (B, 3, N, H, W)
    # The centre counts once per dilation, as in the paper's per-ring local statistics.
    samples = torch.cat([neighbours, image[:, :, None].expand(-1, -1, len(dilations), -1, -1)], 2)
    sigma = samples.std(dim=2, keepdim=True)
    logits = -(neighbours - image[:, :, None]).abs() / (1e-8 + 0.1 * sigma)
    return torch.softmax(logits.mean(dim=1), dim=1)


def pamr(
    image: Tensor,
    scores: Tensor,
    num_iter: int = 10,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
) -> Tensor:
    """Refine score maps with image-adaptive local averaging.

    :param image: ``(B, 3, H, W)`` float image (e.g. 0-255 RGB).
    :param scores: ``(B, K, H, W)`` score maps in the same pixel frame.
    :returns: ``(B, K, H, W)`` refined scores (each a convex combination of its neighbours).
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    if scores.ndim != 4 or scores.shape[0] != image.shape[0]:
        raise ValueError(
            f"scores must be (B, K, H, W) with B={image.shape[0]}, got {tuple(scores.shape)}"
        )
    if scores.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"scores {tuple(scores.shape[-2:])} and image {tuple(image.shape[-2:])} must share (H, W)"
        )
    if num_iter < 0 or not dilations or min(dilations) < 1:
        raise ValueError(
            f"need num_iter >= 0 and dilations >= 1, got {num_iter}, {list(dilations)}"
        )
    weights = pamr_affinity(image.float(), dilations)[:, None]  # (B, 1, N, H, W)
    refined = scores.float()
    for _ in range(num_iter):
        # Summed one neighbour at a time: stacking all of them would cost N times the score memory.
        total = torch.zeros_like(refined)
        for n, shifted in enumerate(_shifted(refined, dilations)):
            total += weights[:, :, n] * shifted
        refined = total
    return refined
