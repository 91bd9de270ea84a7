"""Support sets: images of one class, generated with Stable Diffusion or read from a folder.

Generated sets follow OVDiff's ``sample_support_set.py``: DPM-Solver++ (2M) from the backbone's
betas, ``steps`` steps, classifier-free guidance ``guidance_scale``, prompt "A good picture of a
{name}" with the official negative prompt, a CPU generator re-seeded per class, batches of 8. Each
image's initial latent is its own draw from that generator, in image order: what the pipeline draws
for a batch of one and, a 512 px latent having a multiple of 16 values (torch's CPU normal fill works
in blocks of 16), for the official batches of 8 too; so the images do not depend on the batch size
(up to float rounding). Each image comes with an attribution map ("DAAM"): the cross-attention of the class-name tokens, see
:class:`AttributionAccumulator`. Both are cached as files and reused (:class:`GeneratedSupport`).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdzero.backbones.attention import AttentionCapture, cross_attention_layers
from sdzero.backbones.sd import StableDiffusion
from sdzero.errors import MissingFileError
from sdzero.progress import progress
from sdzero.records import write_bytes_atomic, write_json_atomic
from sdzero.segmentation.settings import OVDIFF

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = "A good picture of a {}"
NEGATIVE_PROMPT = "text, low quality, blurry, cartoon, meme, low resolution, bad, poor, faded"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_FORMAT = 1


@dataclass
class SupportSet:
    """``images`` ``(N, 3, H, W)`` float in [0, 1]; ``attribution`` ``(N, H, W)`` in [0, 1] or None
    (images from a folder); ``paths``: the image files (empty if never written)."""

    class_name: str
    images: torch.Tensor
    attribution: torch.Tensor | None
    paths: list[str]


def class_token_positions(tokenizer: Any, template: str, name: str) -> list[int]:
    """Positions of ``name``'s tokens in the tokenised ``template.format(name)`` (BOS at 0).

    The name is located right after the template's prefix, so a name that also occurs in the
    template (e.g. "a") is not confused with it. ``ValueError`` if it is not found or truncated.
    """
    if template.count("{}") != 1:
        raise ValueError(f"prompt template must contain exactly one '{{}}', got {template!r}")
    prefix = template.split("{}")[0].strip()
    name_ids = tokenizer(name, add_special_tokens=False).input_ids
    if not name_ids:
        raise ValueError(f"class name {name!r} has no tokens")
    start = 1 + (len(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 0)
    ids = tokenizer(template.format(name), truncation=True).input_ids
    if ids[start : start + len(name_ids)] != name_ids:
        raise ValueError(
            f"tokens of {name!r} not found at position {start} of the prompt "
            f"{template.format(name)!r} (prompt too long for {len(ids)} tokens?)"
        )
    return list(range(start, start + len(name_ids)))


def normalise_attribution(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """OVDiff's DAAM normalisation: ``(N, h, w)`` -> ``(N, *size)``: min-max per image, bilinear
    to ``size``, min-max again. A constant map becomes all zeros."""

    def minmax(x: torch.Tensor) -> torch.Tensor:
        lo = x.amin((1, 2), keepdim=True)
        return (x - lo) / (x.amax((1, 2), keepdim=True) - lo).clamp(min=1e-12)

    up = F.interpolate(
        minmax(maps.float())[:, None], size=size, mode="bilinear", align_corners=False
    )
    return minmax(up[:, 0])


class AttributionAccumulator:
    """``AttentionCapture`` callback summing class-token attention over layers and steps.

    Each capture ``(B_cfg, heads, h*w, 77)`` contributes its conditional half (the second half
    when ``cfg``), the ``tokens`` columns, bicubically resized to ``grid``, clamped at 0 and
    averaged over heads. :meth:`maps` returns the mean over captures, then over tokens:
    ``(B, *grid)``.
    """

    def __init__(self, tokens: list[int], grid: tuple[int, int], cfg: bool) -> None:
        self.tokens = tokens
        self.grid = grid
        self.cfg = cfg
        self.total: torch.Tensor | None = None
        self.count = 0

    def __call__(self, path: str, kind: str, probs: torch.Tensor) -> None:
        if self.cfg:
            probs = probs[probs.shape[0] // 2 :]
        b, heads, n, _ = probs.shape
        side = math.isqrt(n)
        if side * side != n:
            raise RuntimeError(f"{path}: {n} attention positions are not a square grid")
        maps = probs[..., self.tokens].float().permute(0, 1, 3, 2).reshape(b, -1, side, side)
        maps = F.interpolate(maps, size=self.grid, mode="bicubic", align_corners=False).clamp(min=0)
        maps = maps.view(b, heads, len(self.tokens), *self.grid).mean(1)
        self.total = maps if self.total is None else self.total + maps
        self.count += 1

    def maps(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no cross-attention was captured")
        return (self.total / self.count).mean(1)


@torch.no_grad()
def sample_support_set(
    sd: StableDiffusion,
    name: str,
    num_support: int = OVDIFF.num_support,
    guidance_scale: float = OVDIFF.guidance_scale,
    steps: int = OVDIFF.sampling_steps,
    size: int = 512,
    prompt_template: str = PROMPT_TEMPLATE,
    negative_prompt: str = NEGATIVE_PROMPT,
    seed: int = OVDIFF.support_seed,
    batch_size: int = OVDIFF.sample_batch,
) -> SupportSet:
    """Sample ``num_support`` images of ``name`` with their attribution maps (``paths`` empty).

    ``sd`` needs its text encoder. Images are ``(N, 3, size, size)``; attribution is computed on
    the latent grid (64² at 512 px, OVDiff's fixed 64²) and normalised by
    :func:`normalise_attribution`. The pipeline runs ``batch_size`` images at a time (the UNet
    sees ``2 * batch_size`` with guidance); image ``i``'s initial latent ``(1, 4, size/8, size/8)``
    is the ``i``-th such draw of a CPU generator seeded ``seed``, whatever the batch size.
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from diffusers.utils.torch_utils import randn_tensor

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"class name must be a non-empty string, got {name!r}")
    if num_support < 1 or batch_size < 1 or steps < 1 or size % 8:
        raise ValueError(
            f"need num_support, batch_size, steps >= 1 and size a multiple of 8; got "
            f"{num_support}, {batch_size}, {steps}, {size}"
        )
    if sd.text_encoder is None or sd.tokenizer is None:
        raise ValueError("support sampling needs Stable Diffusion loaded with text_encoder=True")
    tokens = class_token_positions(sd.tokenizer, prompt_template, name)
    pipe = StableDiffusionPipeline(
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        unet=sd.unet,
        # steps_offset=1 as in the SD hub configs (the pipeline would force it, with a warning);
        # DPM-Solver's default "linspace" spacing ignores it.
        scheduler=DPMSolverMultistepScheduler.from_config(sd.scheduler.config, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    grid = (size // pipe.vae_scale_factor,) * 2
    generator = torch.Generator().manual_seed(seed)
    # One draw per image, as the pipeline draws a batch of one (a batched draw equals them only
    # when an image's latent has a multiple of 16 values).
    latent_shape = (1, sd.unet.config.in_channels, *grid)
    initial = [
        randn_tensor(latent_shape, generator=generator, dtype=sd.text_encoder.dtype)
        for _ in range(num_support)
    ]
    layers = cross_attention_layers(sd.unet)
    images, maps = [], []
    desc = f"support images of {name!r} ({num_support} x {steps} steps)"
    with progress(desc, num_support * steps, "steps") as report:

        def step_done(pipe: Any, step: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            report.advance(len(tensors["latents"]))  # one denoising step of each batch image
            return tensors

        for start in range(0, num_support, batch_size):
            n = min(batch_size, num_support - start)
            acc = AttributionAccumulator(tokens, grid, cfg=guidance_scale > 1)
            # The pipeline runs the UNet itself; the capture's callback sees every layer and step.
            with AttentionCapture(sd.unet, layers, truncate=False, callback=acc):
                out = pipe(
                    prompt=[prompt_template.format(name)] * n,
                    negative_prompt=[negative_prompt] * n,
                    height=size,
                    width=size,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    latents=torch.cat(initial[start : start + n]),
                    output_type="pt",
                    callback_on_step_end=step_done,
                )
            images.append(out.images.float().cpu())
            maps.append(acc.maps().cpu())
            report.note(f"{start + n}/{num_support} images")
    attribution = normalise_attribution(torch.cat(maps), (size, size))
    return SupportSet(name, _quantise(torch.cat(images)), attribution, [])


def _quantise(images: torch.Tensor) -> torch.Tensor:
    # Exactly what PNG files hold, so a freshly sampled set equals its cached copy.
    return (images.clamp(0, 1) * 255).round() / 255


def _to_png(image: torch.Tensor) -> bytes:
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _read_image(path: Path, size: int | None) -> torch.Tensor:
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        if size is not None and rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255


def load_support_folder(folder: str | Path, name: str, size: int = 512) -> SupportSet:
    """User support images ``<folder>/<name>/*.{png,jpg,jpeg}`` (sorted), resized to ``size``²
    (aspect not kept, like generated ones); no attribution, so the ``attention`` and ``cutler``
    mask proposers cannot run on them (use ``saliency`` or ``full``)."""
    directory = Path(folder) / name
    files = sorted(p for p in directory.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MissingFileError(
            f"method.support_folder: no support images for class {name!r}: expected {'/'.join(IMAGE_SUFFIXES)} files in "
            f"{directory}"
        )
    images = torch.stack([_read_image(p, size) for p in files])
    return SupportSet(name, images, None, [str(p) for p in files])


def slug(text: str) -> str:
    """A short file-name-safe form of ``text`` (letters, digits, underscores)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "x"


def settings_hash(settings: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able settings dict (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class GeneratedSupport:
    """Support source ``name -> SupportSet`` sampling with SD, cached under ``cache_root``.

    One folder per class and settings, ``<cache_root>/<name>-<hash>/``: ``000.png``...,
    ``attribution.pt`` and ``support.json`` (written last, so a folder without it is incomplete
    and is resampled). ``cache_root=None`` samples every time. Keyword arguments: those of
    :func:`sample_support_set`.
    """

    def __init__(self, sd: StableDiffusion, cache_root: str | Path | None, **sampling: Any) -> None:
        self.sd = sd
        self.cache_root = None if cache_root is None else Path(cache_root)
        self.sampling = sampling
        bound = inspect.signature(sample_support_set).bind(sd, "", **sampling)
        bound.apply_defaults()
        self._settings = {
            "source": "generated",
            "backbone": sd.source,
            "arch": sd.arch,
            "dtype": str(sd.dtype),
            **{k: v for k, v in bound.arguments.items() if k not in ("sd", "name")},
        }

    def settings(self, name: str) -> dict[str, Any]:
        """Everything ``name``'s support set depends on (cache keys)."""
        return {"class": name, **self._settings}

    def folder(self, name: str) -> Path:
        return self.cache_root / f"{slug(name)}-{settings_hash(self.settings(name))}"

    def __call__(self, name: str) -> SupportSet:
        if self.cache_root is None:
            return sample_support_set(self.sd, name, **self.sampling)
        folder = self.folder(name)
        cached = self._load(folder, name)
        if cached is not None:
            return cached
        support = sample_support_set(self.sd, name, **self.sampling)
        paths = [folder / f"{i:03d}.png" for i in range(len(support.images))]
        for path, image in zip(paths, support.images, strict=True):
            write_bytes_atomic(path, _to_png(image))
        buffer = io.BytesIO()
        torch.save(support.attribution.clone(), buffer)
        write_bytes_atomic(folder / "attribution.pt", buffer.getvalue())
        manifest = {"format": CACHE_FORMAT, "count": len(paths), **self.settings(name)}
        write_json_atomic(folder / "support.json", manifest)
        support.paths = [str(p) for p in paths]
        return support

    def _load(self, folder: Path, name: str) -> SupportSet | None:
        manifest = folder / "support.json"
        if not manifest.is_file():
            return None
        try:
            meta = json.loads(manifest.read_text())
            paths = [folder / f"{i:03d}.png" for i in range(meta["count"])]
            images = torch.stack([_read_image(p, None) for p in paths])
            attribution = torch.load(folder / "attribution.pt", weights_only=True)
            if attribution.shape != (len(paths), *images.shape[-2:]):
                raise ValueError(f"attribution shape {tuple(attribution.shape)}")
        except Exception as err:  # any unreadable cache (torn file, bad pickle) is resampled
            log.warning("support cache %s is unreadable (%s); resampling", folder, err)
            return None
        return SupportSet(name, images, attribution, [str(p) for p in paths])


class FolderSupport:
    """Support source ``name -> SupportSet`` reading ``<folder>/<name>/`` (no attribution)."""

    def __init__(self, folder: str | Path, size: int = 512) -> None:
        self.folder = Path(folder)
        self.size = size

    def settings(self, name: str) -> dict[str, Any]:
        """The class folder's path, size and files (name, bytes, mtime): edits change the key."""
        files = sorted(
            p for p in (self.folder / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES
        )
        return {
            "source": "folder",
            "class": name,
            "folder": str((self.folder / name).resolve()),
            "size": self.size,
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        }

    def __call__(self, name: str) -> SupportSet:
        return load_support_folder(self.folder, name, self.size)
