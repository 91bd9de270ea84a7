"""Stable Diffusion features for any method: images -> noised VAE latents -> one UNet pass, cut
after the last layer read, with a prompt embedding.

- :func:`diffused_latents`: VAE posterior sample, DDPM-noised to a timestep with Gaussian noise;
- :func:`unet_features`: one UNet pass through the feature tap (queries of cross-attention layers,
  outputs of any UNet module);
- :func:`query_features`: queries of chosen layers upsampled to the largest grid and concatenated
  (OVDiff's SD features);
- :func:`up_block_features`: outputs of UNet up blocks (DIFT's ``up_ft_index``, SD+DINO's layers).

Grids are latent grids: ``(h, w) = (H/8, W/8)`` for ``(H, W)`` images, row-major.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from sdzero.backbones.sd_model import StableDiffusion
from sdzero.backbones.tap import Captured, FeatureTap


def diffused_latents(
    sd: StableDiffusion,
    images: torch.Tensor,
    timestep: int,
    *,
    generators: Sequence[torch.Generator] | None = None,
    noise_generators: Sequence[torch.Generator] | None = None,
    copies: int = 1,
) -> torch.Tensor:
    """``(B, 3, H, W)`` images in [0, 1] -> ``(B * copies, 4, H/8, W/8)`` latents at
    ``timestep`` (row ``b * copies + k``: copy ``k`` of image ``b``).

    The latent is a VAE posterior *sample* (times the scaling factor), forward-diffused as
    ``sqrt(abar_t) x + sqrt(1 - abar_t) eps`` with Gaussian ``eps``. ``generators``: one per
    row for its posterior sample; ``noise_generators``: one per row for its noise, each a
    ``(1, 4, h, w)`` draw in the VAE's dtype (as diffusers draws the sample); by default the
    same generators continue. Without generators both draws come from the global RNG
    (``randn_like``, as DIFT's official code). ``copies``: each image is encoded once and its
    posterior sampled per copy (:meth:`StableDiffusion.encode_images`), the same as passing
    ``copies`` repeats of it (DIFT's ensemble) without the repeated VAE encodes.
    """
    rows = len(images) * copies
    what = f"{len(images)} images" + (f" x {copies} copies" if copies > 1 else "")
    gens = None if generators is None else list(generators)
    if gens is not None and len(gens) != rows:
        raise ValueError(f"{len(gens)} generators for {what}")
    latents = sd.encode_images(images, sample=True, generator=gens, copies=copies)
    noise_gens = gens if noise_generators is None else list(noise_generators)
    if noise_gens is None:
        return sd.add_noise(latents, timestep, torch.randn_like(latents))
    if len(noise_gens) != rows:
        raise ValueError(f"{len(noise_gens)} noise generators for {what}")
    shape, dtype = (1, *latents.shape[1:]), sd.vae.dtype
    noise = torch.cat([torch.randn(shape, generator=g, dtype=dtype) for g in noise_gens])
    return sd.add_noise(latents, timestep, noise)


def unet_features(
    sd: StableDiffusion,
    latents: torch.Tensor,
    timestep: int,
    context: torch.Tensor,
    *,
    queries: Sequence[str] = (),
    outputs: Sequence[str] = (),
    truncate: bool = True,
    unet_kwargs: Mapping[str, Any] | None = None,
) -> Captured:
    """One UNet pass on ``latents`` ``(B, 4, h, w)`` at ``timestep`` with the prompt embedding
    ``context`` (``(B, 77, D)``, or ``(1, 77, D)`` for every latent), through the feature tap:
    ``queries`` of attention layers (module paths, see :func:`~sdzero.backbones.attention.
    resolve_layers`) and ``outputs`` of UNet modules; the pass stops after the last one.
    ``unet_kwargs`` go to the UNet call (e.g. the ``added_cond_kwargs`` an SDXL UNet needs)."""
    context = context.to(latents.dtype).expand(latents.shape[0], -1, -1)
    t = torch.tensor(timestep, device=latents.device)
    extra = dict(unet_kwargs or {})
    with FeatureTap(sd.unet, queries=queries, outputs=outputs, truncate=truncate) as tap:
        return tap.run(
            lambda: sd.unet(latents, t, encoder_hidden_states=context, **extra).sample,
            grid=tuple(latents.shape[-2:]),
        )


def query_features(
    sd: StableDiffusion,
    latents: torch.Tensor,
    timestep: int,
    context: torch.Tensor,
    layers: Sequence[str],
    *,
    truncate: bool = True,
) -> torch.Tensor:
    """Queries of attention ``layers`` (module paths, in the order given) as one float32 map
    ``(B, sum C, h_max, w_max)``: each layer's ``(B, h*w, C)`` queries bilinearly upsampled to the
    largest grid (the latent grid when the first down layers are read), unnormalised."""
    got = unet_features(sd, latents, timestep, context, queries=layers, truncate=truncate)
    target = max((got.hw[p] for p in layers), key=lambda hw: hw[0] * hw[1])
    maps = []
    for path in layers:
        q = got.queries[path].float()
        q = q.transpose(1, 2).reshape(q.shape[0], q.shape[2], *got.hw[path])
        maps.append(F.interpolate(q, size=target, mode="bilinear", align_corners=False))
    return torch.cat(maps, dim=1)


def up_block_features(
    sd: StableDiffusion,
    latents: torch.Tensor,
    timestep: int,
    context: torch.Tensor,
    blocks: Sequence[int],
    *,
    truncate: bool = True,
) -> list[torch.Tensor]:
    """Outputs of UNet up blocks ``blocks`` (indices of ``unet.up_blocks``, in the order given),
    each ``(B, C_i, h_i, w_i)`` as the block returns it, its upsampler included (DIFT's
    ``up_ft_index``: 1 is 1/16 of the image for SD; the pass stops after the last block read)."""
    count = len(sd.unet.up_blocks)
    bad = [b for b in blocks if not 0 <= int(b) < count]
    if bad or not blocks:
        raise ValueError(f"up blocks {list(blocks)}: expected indices in 0..{count - 1}")
    names = [f"up_blocks.{int(b)}" for b in blocks]
    got = unet_features(sd, latents, timestep, context, outputs=names, truncate=truncate)
    return [got.outputs[name] for name in names]
