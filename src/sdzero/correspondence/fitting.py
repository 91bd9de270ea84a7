"""The prompt-optimisation fitting loop of Hedlin et al. (NeurIPS 2023), as the official code runs it.

Frames: the *model frame* is the image stretched (or letterboxed, see ``frames.py``) to ``S×S`` pixels,
``(x, y)`` with pixel ``(i, j)`` covering ``[i, i+1) × [j, j+1)``. A *crop frame* is a crop of it resized
back to ``S×S``.

Per query point, ``num_embeddings`` conditioning tensors ``(77, D)`` drawn from N(0, 1) (fed to the UNet
directly, the text encoder bypassed) are optimised with Adam so that the cross-attention map of token 1,
averaged over the read heads and bilinearly upsampled to ``S×S``, matches a peak-1 Gaussian at the
query, in every read layer (mean of per-layer MSEs), each step on a fresh random crop with fresh noise.
Inference applies each embedding to the target over ``inference_crops`` crops (4 corners, then random
crops around the running argmax), accumulating maps on a sum/count canvas; the readout averages the
embeddings, applies a spatial softmax per layer, averages the layers and takes the argmax (+0.5 px).

All (query, embedding) items are batched through the UNet; each item has its own random generator and
its own loss term (losses are summed, never averaged across items), so batching changes nothing but
speed. :meth:`PromptCorrespondence.step_maps` and :meth:`PromptCorrespondence.readout` take crops and
noise as arguments so another implementation can be fed identical inputs and compared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdzero.backbones.attention import AttentionCapture, resolve_layers
from sdzero.backbones.sd import sample_noise
from sdzero.correspondence.crops import (
    corner_crops,
    crop_size,
    cut_and_resize,
    random_crop_around,
    to_crop_frame,
)

Box = tuple[int, int, int]


@dataclass(frozen=True)
class FitConfig:
    """Hyper-parameters; the defaults are the official code's (SD 1.4, DDIM-50 grid)."""

    steps: int = 129
    lr: float = 2.3756e-3
    num_embeddings: int = 5
    inference_crops: int = 20
    layers: tuple[int | str, ...] = (7, 8, 9, 10)
    heads: tuple[int, ...] | None = (4, 5, 6, 7)
    sigma: float = 27.98  # px at S=512; scaled with image_size
    opt_timestep: int = 140  # timesteps[-8] of the DDIM-50 grid
    infer_timestep: int = 40  # timesteps[-3], hard-coded for inference by the official code
    noise: str = "uniform"  # the official code noises with torch.rand_like (U[0, 1))
    crop_fraction: float = 0.9317
    crop_margin: float = 0.15
    image_size: int = 512
    token: int = 1
    batch_size: int = 0  # items per UNet call; 0 = all (query points × embeddings) of a pair
    truncate: bool = True  # stop the UNet after the last read layer (exact: same maps, same grads)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.num_embeddings < 1 or self.inference_crops < 1:
            raise ValueError(
                "method.steps >= 0, method.num_embeddings >= 1, method.inference_crops >= 1"
            )
        if self.inference_crops < 4 and self.inference_crops != 1:
            raise ValueError(
                "method.inference_crops must be 1 (one corner) or >= 4 (4 corners first)"
            )
        if self.image_size % 64:
            raise ValueError(f"method.image_size must be a multiple of 64, got {self.image_size}")
        if self.noise not in {"uniform", "gaussian"}:
            raise ValueError(f"method.noise must be 'uniform' or 'gaussian', got {self.noise!r}")
        if not 0 < self.crop_margin < 0.5:
            raise ValueError(f"method.crop_margin must lie in (0, 0.5), got {self.crop_margin}")
        crop_size(self.image_size, self.crop_fraction)


def gaussian_targets(points_xy: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Peak-1 Gaussians ``(B, size, size)`` centred at ``points_xy`` ``(B, 2)``, evaluated at pixel centres."""
    grid = torch.arange(size, dtype=points_xy.dtype, device=points_xy.device) + 0.5
    dx = (grid[None, :] - points_xy[:, :1]) ** 2  # (B, W)
    dy = (grid[None, :] - points_xy[:, 1:]) ** 2  # (B, H)
    return torch.exp(-(dy[:, :, None] + dx[:, None, :]) / (2 * sigma**2))


def item_generator(seed: int, sample_index: int, point: int, embedding: int) -> torch.Generator:
    """The random stream of one (sample, query point, embedding) item, independent of batching."""
    key = f"{seed}:{sample_index}:{point}:{embedding}".encode()
    value = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator().manual_seed(value)


class PromptCorrespondence:
    """The method on a loaded :class:`~sdzero.backbones.sd.StableDiffusion` (frozen)."""

    def __init__(self, sd, cfg: FitConfig) -> None:
        self.sd = sd
        self.cfg = cfg
        self.size = cfg.image_size
        self.crop = crop_size(cfg.image_size, cfg.crop_fraction)
        self.sigma = cfg.sigma * cfg.image_size / 512
        self.cond_shape = (77, int(sd.unet.config.cross_attention_dim))

    @property
    def device(self) -> torch.device:
        return next(self.sd.unet.parameters()).device

    # ------------------------------------------------------------------ one UNet evaluation
    def encode_crops(self, images: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
        """VAE latents ``(B, 4, S/8, S/8)`` of the crops (posterior mean), no gradient."""
        with torch.no_grad():
            crops = cut_and_resize(images, list(boxes), self.size)
            return self.sd.encode_images(crops.to(self.device, self.sd.vae.dtype))

    def step_maps(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        cond: torch.Tensor,
        timestep: int,
        out_size: int | None = None,
    ) -> torch.Tensor:
        """Token maps of the read layers for noised ``latents``.

        :param latents: ``(B, 4, h, w)`` clean latents of the crops.
        :param noise: ``(B, 4, h, w)`` the noise draw (uniform or Gaussian, as configured).
        :param cond: ``(B, 77, D)`` conditioning tensors.
        :return: ``(B, L, out, out)``: per read layer, the head-mean attention map of ``token``,
            bilinearly upsampled (align_corners=False) to ``out_size`` (default S).
        """
        out = out_size or self.size
        noisy = self.sd.add_noise(latents, timestep, noise)
        with AttentionCapture(
            self.sd.unet, self.cfg.layers, heads=self.cfg.heads, truncate=self.cfg.truncate
        ) as cap:
            got = cap(noisy, timestep, cond.to(noisy.dtype))
        maps = []
        for layer in cap.layers:
            h, w = got.hw[layer]
            m = got.probs[layer][..., self.cfg.token].mean(1).reshape(-1, 1, h, w)
            maps.append(
                F.interpolate(m.float(), size=(out, out), mode="bilinear", align_corners=False)
            )
        return torch.cat(maps, dim=1)

    def draw_noise(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        lat = self.size // 8
        return torch.cat(
            [sample_noise((1, 4, lat, lat), self.cfg.noise, generator=g) for g in generators]
        ).to(self.device)

    @staticmethod
    def step_loss(maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-item loss ``(B,)``: MSE over (layer, pixel), i.e. the mean of the per-layer MSEs."""
        return ((maps - targets[:, None]) ** 2).mean(dim=(1, 2, 3))

    # ------------------------------------------------------------------------- optimisation
    def optimise(
        self, source: torch.Tensor, points: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """Fit one conditioning tensor per item.

        :param source: ``(1, 3, S, S)`` source image in [0, 1], model frame.
        :param points: ``(B, 2)`` the query point of each item, model frame.
        :param generators: one per item (initialisation, crops and noise are drawn from it).
        :return: ``(B, 77, D)`` fitted conditioning tensors (detached).
        """
        cond = torch.stack([torch.randn(self.cond_shape, generator=g) for g in generators])
        cond = cond.to(self.device).requires_grad_(True)
        optimiser = torch.optim.Adam([cond], lr=self.cfg.lr)
        with torch.enable_grad():  # Lightning evaluates under no_grad
            for _ in range(self.cfg.steps):
                boxes = [
                    random_crop_around(
                        tuple(p.tolist()), self.size, self.crop, self.cfg.crop_margin, g
                    )
                    for p, g in zip(points, generators, strict=True)
                ]
                noise = self.draw_noise(generators)
                latents = self.encode_crops(source, boxes)
                targets = torch.stack(
                    [to_crop_frame(p, b, self.size) for p, b in zip(points, boxes, strict=True)]
                )
                targets = gaussian_targets(targets.to(self.device), self.size, self.sigma)
                optimiser.zero_grad(set_to_none=True)
                loss = self.step_loss(
                    self.step_maps(latents, noise, cond, self.cfg.opt_timestep), targets
                )
                loss.sum().backward()  # a sum keeps each item's gradient its own
                optimiser.step()
        return cond.detach()

    # ---------------------------------------------------------------------------- inference
    def infer(
        self, target: torch.Tensor, cond: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """Apply fitted tensors to the target over the inference crops.

        :param target: ``(1, 3, S, S)`` target image in [0, 1], model frame.
        :param cond: ``(B, 77, D)``.
        :return: ``(B, L, S, S)`` per-layer maps on the model frame (sum/count canvas).
        """
        b, s = cond.shape[0], self.size
        corners = corner_crops(s, self.crop)
        n_layers = len(resolve_layers(self.sd.unet, self.cfg.layers))
        total = torch.zeros(b, n_layers, s, s, device=self.device)
        count = torch.zeros(b, 1, s, s, device=self.device)
        corner_latents: dict[Box, torch.Tensor] = {}
        with torch.no_grad():
            for k in range(self.cfg.inference_crops):
                if k < 4:
                    box = corners[k]
                    if box not in corner_latents:  # shared by every item
                        corner_latents[box] = self.encode_crops(target, [box])
                    boxes = [box] * b
                    latents = corner_latents[box].expand(b, -1, -1, -1)
                else:
                    mean = (total.mean(1, keepdim=True) / count.clamp_min(1)).masked_fill(
                        count == 0, -1
                    )
                    flat = mean.flatten(1).argmax(1)
                    peaks = torch.stack([flat % s, flat // s], 1).float().cpu() + 0.5
                    boxes = [
                        random_crop_around(tuple(p.tolist()), s, self.crop, self.cfg.crop_margin, g)
                        for p, g in zip(peaks, generators, strict=True)
                    ]
                    latents = self.encode_crops(target, boxes)
                noise = self.draw_noise(generators)
                maps = self.step_maps(
                    latents, noise, cond, self.cfg.infer_timestep, out_size=self.crop
                )
                for i, (x0, y0, size) in enumerate(boxes):
                    total[i, :, y0 : y0 + size, x0 : x0 + size] += maps[i]
                    count[i, :, y0 : y0 + size, x0 : x0 + size] += 1
        return total / count.clamp_min(1)

    @staticmethod
    def readout(maps: torch.Tensor) -> torch.Tensor:
        """Predicted points from ``(N, E, L, S, S)`` maps: embedding mean, per-layer spatial softmax,
        layer mean, argmax, +0.5 px. Returns ``(N, 2)`` (x, y) in the model frame."""
        n, _, layers, s, _ = maps.shape
        per_layer = maps.mean(1).reshape(n, layers, s * s).softmax(-1)
        flat = per_layer.mean(1).argmax(-1)
        return torch.stack([flat % s, flat // s], -1).float() + 0.5

    # ------------------------------------------------------------------------------ one pair
    def match(
        self,
        source: torch.Tensor,
        target: torch.Tensor,
        points: torch.Tensor,
        seed: int,
        index: int = 0,
    ) -> torch.Tensor:
        """Predict target points for ``points`` ``(N, 2)`` (model frame) of ``source``.

        :param source, target: ``(1, 3, S, S)`` images in [0, 1], model frame.
        :param seed: run seed; with ``index`` (the sample's dataset index) it fixes every random draw.
        :return: ``(N, 2)`` (x, y) predictions in the model frame.
        """
        n, e = points.shape[0], self.cfg.num_embeddings
        items = [(p, j) for p in range(n) for j in range(e)]
        chunk = self.cfg.batch_size or len(items)
        maps = []
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            gens = [item_generator(seed, index, p, j) for p, j in part]
            pts = points[[p for p, _ in part]].float()
            cond = self.optimise(source, pts, gens)
            maps.append(self.infer(target, cond, gens))
        stacked = torch.cat(maps).reshape(n, e, *maps[0].shape[1:])
        return self.readout(stacked)
