"""Stable Diffusion features as SD+DINO takes them through ODISE (github Junyi42/sd-dino,
``third_party/ODISE``: ``FeatureExtractorBackbone.slide_forward`` and ``LdmExtractor`` with
``decoder_only=True``).

The ``S x S`` image is cut into square windows of side ``window`` (stride ``window``, the last
one moved back to end at the border: offsets 0 and 448 for 960 and 512), each window is VAE
encoded (posterior mean), noised to the timestep with one fixed noise tensor, and passed once
through the UNet; each read layer's window maps are placed on the image's grid and averaged
where windows overlap.

A read layer is named as ODISE names it: an index of the LDM UNet's output blocks (12 for SD
1.x/2.x: 3 per up block), and the feature is that block's *input* before the skip connection is
concatenated, i.e. the output of the block before it (:func:`output_block_input`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sdzero.backbones.sd_features import unet_features
from sdzero.backbones.sd_model import StableDiffusion

NOISE_GRID = 64  # ODISE draws its shared noise on the 512 px latent grid of SD v1 / v2-base


def window_offsets(size: int, window: int) -> list[int]:
    """Start offsets (pixels) of the windows along one side of ``size`` (ODISE's slide rule; one
    window of the whole side when ``window >= size``)."""
    crop = min(window, size)
    count = max(size - crop + crop - 1, 0) // crop + 1
    return [max(min(i * crop + crop, size) - crop, 0) for i in range(count)]


def output_block_input(unet: nn.Module, index: int) -> str:
    """Module path of a diffusers UNet whose output is the input of LDM output block ``index``:
    ``mid_block`` for 0; else the last part of output block ``index - 1`` (up block ``b``,
    sub-block ``j``): its upsampler when it has one, else its attention, else its resnet."""
    if index == 0:
        return "mid_block"
    counts = [len(block.resnets) for block in unet.up_blocks]
    if not 0 < index < sum(counts):
        raise ValueError(
            f"method.unet_blocks: output block {index} does not exist; this UNet has "
            f"{sum(counts)} (0..{sum(counts) - 1})"
        )
    b, k = 0, index - 1
    while k >= counts[b]:
        k, b = k - counts[b], b + 1
    block = unet.up_blocks[b]
    if k == counts[b] - 1 and block.upsamplers is not None:
        return f"up_blocks.{b}.upsamplers.0"
    if getattr(block, "attentions", None) is not None:
        return f"up_blocks.{b}.attentions.{k}"
    return f"up_blocks.{b}.resnets.{k}"


def shared_noise(seed: int, grid: int) -> torch.Tensor:
    """ODISE's one noise tensor ``(1, 4, grid, grid)``: a standard normal ``(1, 4, 64, 64)`` from a
    CPU generator seeded by ``seed``, resized bicubically (``align_corners=False``) to ``grid``
    when it differs from 64."""
    noise = torch.randn(1, 4, NOISE_GRID, NOISE_GRID, generator=torch.Generator().manual_seed(seed))
    if grid == NOISE_GRID:
        return noise
    return F.interpolate(noise, size=(grid, grid), mode="bicubic", align_corners=False)


@torch.no_grad()
def windowed_features(
    sd: StableDiffusion,
    image: torch.Tensor,
    *,
    window: int,
    timestep: int,
    context: torch.Tensor,
    blocks: Sequence[int],
    noise_seed: int,
    window_batch: int = 0,
) -> list[torch.Tensor]:
    """``(1, 3, S, S)`` image in [0, 1] -> one float32 map ``(C_i, S / s_i, S / s_i)`` per
    output-block index of ``blocks`` (stride ``s_i``), averaged over the windows (see the module
    docstring); ``context``: the ``(1, 77, D)`` prompt embedding; ``window_batch``: windows per
    UNet call (0 = all; speed only)."""
    size = image.shape[-1]
    offsets = [(y, x) for y in window_offsets(size, window) for x in window_offsets(size, window)]
    crop = min(window, size)
    crops = torch.cat([image[..., y : y + crop, x : x + crop] for y, x in offsets])
    names = [output_block_input(sd.unet, int(i)) for i in blocks]
    noise = shared_noise(noise_seed, crop // 8)
    step = window_batch or len(crops)
    got: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for start in range(0, len(crops), step):
        latents = sd.encode_images(crops[start : start + step])
        noisy = sd.add_noise(latents, timestep, noise.to(latents).expand_as(latents))
        outputs = unet_features(sd, noisy, timestep, context, outputs=names).outputs
        for name in names:
            out = outputs[name]
            got[name].append((out[0] if isinstance(out, tuple) else out).float())
    maps = []
    for name in names:
        per_window = torch.cat(got[name])
        stride = crop // per_window.shape[-1]
        total = per_window.new_zeros(per_window.shape[1], size // stride, size // stride)
        count = per_window.new_zeros(1, size // stride, size // stride)
        for (y, x), part in zip(offsets, per_window, strict=True):
            rows, cols = (
                slice(y // stride, (y + crop) // stride),
                slice(x // stride, (x + crop) // stride),
            )
            total[:, rows, cols] += part
            count[:, rows, cols] += 1
        maps.append(total / count)
    return maps
