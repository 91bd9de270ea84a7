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
speed. The other exact levers: the UNet stops after the last read layer (``truncate``) and each
distinct crop of an image is VAE-encoded once per pair (:class:`LatentCache`). Options beyond exact,
off by default: ``autocast`` (bf16/fp16), ``checkpointing``, ``shared_crop`` (one crop per step for
the restarts of a query point) and early stopping (:class:`EarlyStop`).
:meth:`PromptCorrespondence.step_maps` and :meth:`PromptCorrespondence.readout` take crops and
noise as arguments so another implementation can be fed identical inputs and compared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
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
from sdzero.seeding import keyed_generator

Box = tuple[int, int, int]
AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
GAUSSIAN_GRIDS = ("index", "center")


@dataclass(frozen=True)
class FitConfig:
    """Hyper-parameters of the fitting loop: each is a ``method.*`` key, and these defaults (the
    official code's: SD 1.4, DDIM-50 grid, ``eval/eval.py``'s digits) are its only definition."""

    steps: int = 129  # Adam steps per embedding
    lr: float = 0.0023755632081200314  # Adam learning rate (the official digits of a tuned value)
    num_embeddings: int = 5  # independent random restarts per query point (averaged at readout)
    inference_crops: int = 20  # target crops per embedding: 4 corners, then around the argmax
    layers: tuple[int | str, ...] = (7, 8, 9, 10)  # of the 16 cross-attention layers (or paths):
    # up 16x16 x3 + first up 32x32 (the official "layers 5-8" of the maps with <= 32^2 queries)
    heads: tuple[int, ...] | None = (4, 5, 6, 7)  # official quirk: attn[h // 2:]; None = all
    sigma: float = 27.97853316316864  # Gaussian target std, px at S=512 (scaled with image_size)
    gaussian_grid: str = "index"  # target at pixel indices 0..S-1 (official) | "center" (i + 0.5)
    opt_timestep: int = 140  # t while optimising: timesteps[-8] of the DDIM-50 grid
    infer_timestep: int = 40  # t at inference: the official code hard-codes timesteps[-3]
    noise: str = "uniform"  # official quirk: torch.rand_like, U[0, 1) | "gaussian": N(0, 1)
    crop_fraction: float = (
        0.9316549294381423  # crop side / image side (official 93.165...%: 477 px)
    )
    crop_margin: float = 0.15  # the query stays >= this fraction of the crop side from its border
    image_size: int = 512  # model frame side S
    token: int = 1  # the conditioning token whose map is supervised and read
    batch_size: int = 5  # (query, embedding) items per UNet call (bounds memory); 0 = all of a pair
    truncate: bool = True  # stop the UNet after the last read layer (exact: same maps, same grads)
    cache_latents: bool = True  # encode each distinct crop of an image once (exact)
    # Options beyond exact, off by default (their measured effects: README, "Speed options"):
    autocast: str | None = None  # "bf16" | "fp16" (GPU): UNet and VAE under torch.autocast
    checkpointing: bool = False  # gradient checkpointing: less memory, one more partial forward
    shared_crop: bool = False  # one crop per step for all restarts of a query point
    early_stop_patience: int = 0  # > 0: an item stops after this many steps without improvement
    early_stop_delta: float = 0.01  # relative improvement of the loss EMA that resets patience

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
        if self.gaussian_grid not in GAUSSIAN_GRIDS:
            raise ValueError(
                f"method.gaussian_grid must be one of {GAUSSIAN_GRIDS}, got {self.gaussian_grid!r}"
            )
        if self.noise not in {"uniform", "gaussian"}:
            raise ValueError(f"method.noise must be 'uniform' or 'gaussian', got {self.noise!r}")
        if not 0 < self.crop_margin < 0.5:
            raise ValueError(f"method.crop_margin must lie in (0, 0.5), got {self.crop_margin}")
        if self.autocast not in AUTOCAST:
            raise ValueError(
                f"method.autocast must be one of {sorted(AUTOCAST, key=str)}, got {self.autocast!r}"
            )
        if self.early_stop_patience < 0 or not 0 <= self.early_stop_delta < 1:
            raise ValueError(
                "method.early_stop_patience must be >= 0 and method.early_stop_delta in [0, 1), "
                f"got {self.early_stop_patience}, {self.early_stop_delta}"
            )
        crop_size(self.image_size, self.crop_fraction)


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


class LatentCache:
    """VAE latents of square crops of one image, each distinct box encoded once.

    Exact: the encoder is deterministic (posterior mean), so a cached latent is the one a fresh
    encode would give (up to batch-size-dependent float rounding). The four corner crops of a target
    are shared by every item, and the crops of the source recur across steps, restarts and query
    points (at 512 px there are at most 36² distinct crop offsets).
    """

    def __init__(self, encode: Callable[[list[Box]], torch.Tensor], enabled: bool = True) -> None:
        self.encode = encode
        self.enabled = enabled
        self.store: dict[Box, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __call__(self, boxes: Sequence[Box]) -> torch.Tensor:
        """``(len(boxes), 4, S/8, S/8)``; the missing distinct boxes are encoded in one batch.
        Disabled, nothing is kept between calls (a box repeated within one call is still encoded
        once)."""
        if not self.enabled:
            self.store = {}
        missing = list(dict.fromkeys(b for b in boxes if b not in self.store))
        if missing:
            for box, latent in zip(missing, self.encode(missing), strict=True):
                self.store[box] = latent
        self.misses += len(missing)
        self.hits += len(boxes) - len(missing)
        return torch.stack([self.store[b] for b in boxes])


class EarlyStop:
    """Per-item early stopping on a noisy loss: an exponential moving average (0.9) of each item's
    loss; an item stops after ``patience`` consecutive steps in which the EMA did not fall below
    ``(1 - delta)`` times the EMA of its last significant improvement."""

    def __init__(self, items: int, patience: int, delta: float) -> None:
        self.patience = patience
        self.delta = delta
        self.ema = torch.full((items,), float("nan"))
        self.best = torch.full((items,), float("inf"))
        self.stale = torch.zeros(items, dtype=torch.long)
        self.steps = torch.zeros(items, dtype=torch.long)

    def active(self) -> list[int]:
        if self.patience == 0:
            return list(range(len(self.stale)))
        return torch.nonzero(self.stale < self.patience).flatten().tolist()

    def update(self, items: Sequence[int], losses: torch.Tensor) -> None:
        idx = torch.as_tensor(list(items), dtype=torch.long)
        loss = losses.detach().float().cpu()
        prev = self.ema[idx]
        ema = torch.where(prev.isnan(), loss, 0.9 * prev + 0.1 * loss)
        self.ema[idx] = ema
        improved = ema < self.best[idx] * (1 - self.delta)
        self.best[idx] = torch.where(improved, ema, self.best[idx])
        self.stale[idx] = torch.where(improved, 0, self.stale[idx] + 1)
        self.steps[idx] += 1


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

    def encode_crops(self, images: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
        """VAE latents ``(B, 4, S/8, S/8)`` of the crops (posterior mean), no gradient."""
        with torch.no_grad(), self.autocast():
            crops = cut_and_resize(images, list(boxes), self.size)
            return self.sd.encode_images(crops.to(self.device, self.sd.vae.dtype))

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
        self.steps_taken = stopper.steps
        return cond.detach()

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
        src_latents, trg_latents = self.latent_cache(source), self.latent_cache(target)
        maps = []
        steps = []
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            gens = [item_generator(seed, index, p, j) for p, j in part]
            pts = points[[p for p, _ in part]].float()
            groups = [p for p, _ in part]
            cond = self.optimise(source, pts, gens, groups=groups, latents=src_latents)
            steps.append(self.steps_taken)
            maps.append(self.infer(target, cond, gens, latents=trg_latents))
        self.steps_taken = torch.cat(steps)
        stacked = torch.cat(maps).reshape(n, e, *maps[0].shape[1:])
        return self.readout(stacked)
