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
speed. The other exact levers: the UNet stops after the last read layer (``truncate``), each
distinct crop of an image is VAE-encoded once per pair (:class:`LatentCache`), up front in batches
with ``prefetch_batch`` (:mod:`.crop_plan`). Options beyond exact, off by default: ``autocast``,
``crop_encoder`` (:mod:`.crop_encoder`), ``checkpointing``, ``shared_crop`` (one crop per step for
the restarts of a point), early stopping (:class:`EarlyStop`) and ``flip_target``.
:meth:`PromptCorrespondence.step_maps` and :meth:`PromptCorrespondence.readout` take crops and
noise as arguments so another implementation can be fed identical inputs and compared.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from sdzero.backbones.attention import AttentionCapture, resolve_layers
from sdzero.backbones.sd import sample_noise
from sdzero.correspondence.crop_encoder import CropEncoder, crop_encoder
from sdzero.correspondence.crop_plan import fit_boxes
from sdzero.correspondence.crops import (
    corner_crops,
    crop_size,
    cut_and_resize,
    random_crop_around,
    to_crop_frame,
)
from sdzero.correspondence.early_stop import EarlyStop
from sdzero.correspondence.fit_config import AUTOCAST, FitConfig
from sdzero.correspondence.latent_cache import Box, LatentCache
from sdzero.correspondence.refine import mirror_x
from sdzero.progress import Progress, progress
from sdzero.seeding import keyed_generator


def gaussian_targets(
    points_xy: torch.Tensor, size: int, sigma: float, grid: str = "index"
) -> torch.Tensor:
    """Peak-1 Gaussians ``(B, size, size)`` centred at ``points_xy`` ``(B, 2)`` (crop-frame px).

    ``grid="index"`` evaluates pixel ``(i, j)`` at the integer coordinates ``(j, i)``, as the
    official ``gaussian_circle`` does; ``"center"`` at the pixel centre ``(j + 0.5, i + 0.5)``,
    consistent with the pixel-edge frame of the points (the official target sits half a pixel off).
    """
    shift = {"index": 0.0, "center": 0.5}[grid]
    grid_xy = torch.arange(size, dtype=points_xy.dtype, device=points_xy.device) + shift
    dx = (grid_xy[None, :] - points_xy[:, :1]) ** 2  # (B, W)
    dy = (grid_xy[None, :] - points_xy[:, 1:]) ** 2  # (B, H)
    return torch.exp(-(dy[:, :, None] + dx[:, None, :]) / (2 * sigma**2))


def item_generator(seed: int, sample_index: int, point: int, embedding: int) -> torch.Generator:
    """The random stream of one (sample, query point, embedding) item, independent of batching."""
    return keyed_generator(int(seed), int(sample_index), int(point), int(embedding))


class PromptCorrespondence:
    """The method on a loaded :class:`~sdzero.backbones.sd.StableDiffusion` (frozen)."""

    def __init__(self, sd, cfg: FitConfig) -> None:
        self.sd = sd
        self.cfg = cfg
        self.size = cfg.image_size
        self.crop = crop_size(cfg.image_size, cfg.crop_fraction)
        self.sigma = cfg.sigma * cfg.image_size / 512
        self.cond_shape = (77, int(sd.unet.config.cross_attention_dim))
        self.steps_taken: torch.Tensor | None = None  # (B,) optimisation steps of the last fit
        self._cap: AttentionCapture | None = None
        self._progress: Progress | None = None  # the running match's report, if any

    @property
    def device(self) -> torch.device:
        return next(self.sd.unet.parameters()).device

    # ------------------------------------------------------------------ one UNet evaluation
    @contextlib.contextmanager
    def capturing(self) -> Iterator[AttentionCapture]:
        """Keep the capture processors installed (across steps, and until backward has run, which
        gradient checkpointing needs); nested uses share one capture."""
        if self._cap is not None:
            yield self._cap
            return
        with AttentionCapture(
            self.sd.unet, self.cfg.layers, heads=self.cfg.heads, truncate=self.cfg.truncate
        ) as cap:
            self._cap = cap
            try:
                yield cap
            finally:
                self._cap = None

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST[self.cfg.autocast]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @functools.cached_property
    def crop_encoder(self) -> CropEncoder:
        """Crops ``(B, 3, S, S)`` in [0, 1] -> latents (``method.crop_encoder``; VAE: exact)."""
        return crop_encoder(self.sd, self.cfg)

    def encode_crops(self, images: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
        """Latents ``(B, 4, S/8, S/8)`` of the crops (:attr:`crop_encoder`), no gradient."""
        with torch.no_grad(), self.autocast():
            return self.crop_encoder(cut_and_resize(images, list(boxes), self.size))

    def latent_cache(self, image: torch.Tensor) -> LatentCache:
        """A :class:`LatentCache` of crops of ``image`` ``(1, 3, S, S)``."""
        return LatentCache(
            lambda boxes: self.encode_crops(image, boxes), enabled=self.cfg.cache_latents
        )

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
        :return: ``(B, L, out, out)`` float32: per read layer, the head-mean attention map of
            ``token``, bilinearly upsampled (align_corners=False) to ``out_size`` (default S).
        """
        out = out_size or self.size
        noisy = self.sd.add_noise(latents, timestep, noise)
        with self.capturing() as cap, self.autocast():
            got = cap(noisy, timestep, cond.to(noisy.dtype))
        maps = []
        for layer in cap.layers:
            h, w = got.hw[layer]
            m = got.probs[layer][..., self.cfg.token].float().mean(1).reshape(-1, 1, h, w)
            maps.append(F.interpolate(m, size=(out, out), mode="bilinear", align_corners=False))
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
    def draw_boxes(
        self,
        points: torch.Tensor,
        generators: Sequence[torch.Generator],
        groups: Sequence[int] | None = None,
    ) -> list[Box]:
        """One random crop around each point; with ``groups`` (``shared_crop``) the first item of a
        group draws the crop for the whole group."""
        boxes: list[Box] = []
        drawn: dict[int, Box] = {}
        for i, (p, g) in enumerate(zip(points, generators, strict=True)):
            group = None if groups is None else groups[i]
            if group is None or group not in drawn:
                box = random_crop_around(
                    tuple(p.tolist()), self.size, self.crop, self.cfg.crop_margin, g
                )
                if group is not None:
                    drawn[group] = box
            boxes.append(box if group is None else drawn[group])
        return boxes

    def _set_checkpointing(self) -> None:
        unet = self.sd.unet
        if self.cfg.checkpointing:
            unet.enable_gradient_checkpointing()
        elif getattr(unet, "is_gradient_checkpointing", False):
            unet.disable_gradient_checkpointing()

    def optimise(
        self,
        source: torch.Tensor,
        points: torch.Tensor,
        generators: Sequence[torch.Generator],
        groups: Sequence[int] | None = None,
        latents: LatentCache | None = None,
        init: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fit one conditioning tensor per item.

        :param source: ``(1, 3, S, S)`` source image in [0, 1], model frame.
        :param points: ``(B, 2)`` the query point of each item, model frame.
        :param generators: one per item (initialisation, crops and noise are drawn from it).
        :param groups: the query point of each item; used by ``shared_crop`` only.
        :param latents: a :meth:`latent_cache` of ``source`` to share across calls.
        :param init: ``(B, 77, D)`` initial tensors instead of the N(0, 1) draws (to feed another
            implementation's draw); the generators still draw the crops and noise.
        :return: ``(B, 77, D)`` fitted conditioning tensors (detached). ``steps_taken`` ``(B,)``
            holds each item's number of steps (< ``steps`` only with early stopping).
        """
        b = len(generators)
        cache = latents or self.latent_cache(source)
        share = groups if self.cfg.shared_crop else None
        drawn = [torch.randn(self.cond_shape, generator=g) for g in generators]
        cond = torch.stack(drawn) if init is None else init.detach().clone()
        cond = cond.to(self.device, torch.float32).requires_grad_(True)
        optimiser = torch.optim.Adam([cond], lr=self.cfg.lr)
        scaler = torch.amp.GradScaler(self.device.type) if self.cfg.autocast == "fp16" else None
        stopper = EarlyStop(b, self.cfg.early_stop_patience, self.cfg.early_stop_delta)
        self._set_checkpointing()
        with torch.enable_grad(), self.capturing():  # Lightning evaluates under no_grad
            for _ in range(self.cfg.steps):
                items = stopper.active()
                if not items:
                    break
                gens = [generators[i] for i in items]
                pts = points[items]
                boxes = self.draw_boxes(
                    pts, gens, None if share is None else [share[i] for i in items]
                )
                noise = self.draw_noise(gens)
                lat = cache(boxes)
                targets = torch.stack(
                    [to_crop_frame(p, box, self.size) for p, box in zip(pts, boxes, strict=True)]
                )
                targets = gaussian_targets(
                    targets.to(self.device), self.size, self.sigma, self.cfg.gaussian_grid
                )
                optimiser.zero_grad(set_to_none=True)
                frozen = None if len(items) == b else cond.detach().clone()
                part = cond if frozen is None else cond[items]
                loss = self.step_loss(
                    self.step_maps(lat, noise, part, self.cfg.opt_timestep), targets
                )
                if scaler is None:
                    loss.sum().backward()  # a sum keeps each item's gradient its own
                    optimiser.step()
                else:
                    scaler.scale(loss.sum()).backward()
                    scaler.step(optimiser)
                    scaler.update()
                if frozen is not None:  # Adam's momentum must not move stopped items
                    with torch.no_grad():
                        keep = torch.ones(b, dtype=torch.bool)
                        keep[items] = False
                        cond[keep] = frozen[keep]
                stopper.update(items, loss)
                self._advance(len(items))
        self.steps_taken = stopper.steps
        self._advance(b * self.cfg.steps - int(stopper.steps.sum()))  # steps early stopping saved
        return cond.detach()

    @contextlib.contextmanager
    def _reporting(self, desc: str, total: int) -> Iterator[Progress]:
        """Report while the block runs: each item's optimisation step and inference crop is a
        unit (:meth:`optimise` and :meth:`infer` advance it)."""
        with progress(desc, total, "steps") as report:
            self._progress = report
            try:
                yield report
            finally:
                self._progress = None

    def _advance(self, units: int) -> None:
        if self._progress is not None:
            self._progress.advance(units)

    # ---------------------------------------------------------------------------- inference
    def infer(
        self,
        target: torch.Tensor,
        cond: torch.Tensor,
        generators: Sequence[torch.Generator],
        latents: LatentCache | None = None,
    ) -> torch.Tensor:
        """Apply fitted tensors to the target over the inference crops.

        :param target: ``(1, 3, S, S)`` target image in [0, 1], model frame.
        :param cond: ``(B, 77, D)``.
        :param latents: a :meth:`latent_cache` of ``target`` to share across calls.
        :return: ``(B, L, S, S)`` per-layer maps on the model frame (sum/count canvas).
        """
        b, s = cond.shape[0], self.size
        cache = latents or self.latent_cache(target)
        corners = corner_crops(s, self.crop)
        n_layers = len(resolve_layers(self.sd.unet, self.cfg.layers))
        total = torch.zeros(b, n_layers, s, s, device=self.device)
        count = torch.zeros(b, 1, s, s, device=self.device)
        with torch.no_grad(), self.capturing():
            for k in range(self.cfg.inference_crops):
                if k < 4:
                    boxes = [corners[k]] * b  # shared by every item: encoded once
                else:
                    mean = (total.mean(1, keepdim=True) / count.clamp_min(1)).masked_fill(
                        count == 0, -1
                    )
                    flat = mean.flatten(1).argmax(1)
                    peaks = torch.stack([flat % s, flat // s], 1).float().cpu() + 0.5
                    boxes = self.draw_boxes(peaks, generators)
                noise = self.draw_noise(generators)
                maps = self.step_maps(
                    cache(boxes), noise, cond, self.cfg.infer_timestep, out_size=self.crop
                )
                for i, (x0, y0, size) in enumerate(boxes):
                    total[i, :, y0 : y0 + size, x0 : x0 + size] += maps[i]
                    count[i, :, y0 : y0 + size, x0 : x0 + size] += 1
                self._advance(b)
        return total / count.clamp_min(1)

    @staticmethod
    def aggregate(maps: torch.Tensor) -> torch.Tensor:
        """The readout's map ``(N, S*S)`` (row-major, sums to 1) of ``(N, E, L, S, S)`` maps:
        embedding mean, per-layer spatial softmax, layer mean."""
        n, _, layers, s, _ = maps.shape
        return maps.mean(1).reshape(n, layers, s * s).softmax(-1).mean(1)

    @classmethod
    def readout(cls, maps: torch.Tensor) -> torch.Tensor:
        """Predicted points from ``(N, E, L, S, S)`` maps: the argmax of :meth:`aggregate`,
        +0.5 px. Returns ``(N, 2)`` (x, y) in the model frame."""
        s = maps.shape[-1]
        flat = cls.aggregate(maps).argmax(-1)
        return torch.stack([flat % s, flat // s], -1).float() + 0.5

    @classmethod
    def peak(cls, maps: torch.Tensor) -> float:
        """Sharpness of a pair's ``(N, E, L, S, S)`` maps: the mean over its N points of the
        maximum of the normalised aggregated map (:meth:`aggregate`)."""
        return cls.aggregate(maps).max(dim=-1).values.mean().item()

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

        With ``flip_target`` the fitted tensors are applied to the target and to the target
        mirrored left-right, each with the same random draws; the mirrored target's predictions
        (mirrored back, ``x -> S - x``) are kept for every point of the pair when its maps are
        strictly sharper (:meth:`peak`). ``self.target_flipped`` says which was kept.
        """
        n, e = points.shape[0], self.cfg.num_embeddings
        items = [(p, j) for p in range(n) for j in range(e)]
        chunk = self.cfg.batch_size or len(items)
        src_latents, trg_latents = self.latent_cache(source), self.latent_cache(target)
        if self.cfg.prefetch_batch:  # exact: the crops the fit will draw, encoded up front
            owner = [p for p, _ in items]
            gens = [item_generator(seed, index, p, j) for p, j in items]
            boxes = fit_boxes(self, points[owner].float(), gens, owner)
            src_latents.prefetch(boxes, self.cfg.prefetch_batch)
        flip = self.cfg.flip_target
        mirrored = target.flip(-1) if flip else None
        mirrored_latents = self.latent_cache(mirrored) if flip else None
        maps, mirrored_maps = [], []
        steps = []
        passes = self.cfg.steps + self.cfg.inference_crops * (2 if flip else 1)
        with self._reporting(f"match {n} points x {e} restarts", len(items) * passes) as report:
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                gens = [item_generator(seed, index, p, j) for p, j in part]
                pts = points[[p for p, _ in part]].float()
                groups = [p for p, _ in part]
                cond = self.optimise(source, pts, gens, groups=groups, latents=src_latents)
                steps.append(self.steps_taken)
                states = [g.get_state() for g in gens]
                maps.append(self.infer(target, cond, gens, latents=trg_latents))
                if flip:
                    twins = [torch.Generator().set_state(state) for state in states]
                    mirrored_maps.append(
                        self.infer(mirrored, cond, twins, latents=mirrored_latents)
                    )
                report.note(f"{(start + len(part)) // e}/{n} points fitted")
        self.steps_taken = torch.cat(steps)
        stacked = torch.cat(maps).reshape(n, e, *maps[0].shape[1:])
        self.target_flipped = False
        if flip:
            stacked_mirrored = torch.cat(mirrored_maps).reshape(stacked.shape)
            self.target_flipped = self.peak(stacked_mirrored) > self.peak(stacked)
            if self.target_flipped:
                return mirror_x(self.readout(stacked_mirrored), self.size)
        return self.readout(stacked)
