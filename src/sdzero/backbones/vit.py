"""ViT backbones: a registry of named specs (DINO, DINOv2, CLIP and tiny test models), their
weight loader, and the position-embedding resampling rule of the DINO family.

A spec names a timm or open_clip architecture, the default block OVDiff / SD+DINO read, and how
position embeddings are resampled for other grids. ``register_vit(name, spec)`` adds one.
Built-in: ``dino_vitb8`` (DINO ViT-B/8), ``clip_vitb16`` (OpenAI CLIP ViT-B/16), ``dinov2_vits14``,
``dinov2_vitb14``, ``dinov2_vits14_reg``, ``dinov2_vitb14_reg`` (DINOv2 hub models, 4 register
tokens for ``_reg``), and ``tiny_vit8``, ``tiny_clip16``, ``tiny_dinov2``, ``tiny_dinov2_reg``:
small random models with the same code paths, for tests and demos.

DINOv2 uses timm's architecture (``vit_*_patch14_dinov2``, ``vit_*_patch14_reg4_dinov2``: patch
14, 518 px pretraining grid, LayerScale; built with LayerScale initialised to 1 as the hub
models). A local checkpoint in the official key layout (``dinov2_vitb14_pretrain.pth``,
``dinov2_vitb14_reg4_pretrain.pth``) loads through timm's checkpoint filter, which converts its
keys: ``mask_token`` (training only) is dropped; with registers ``register_tokens`` becomes
``reg_token``, the class row of ``pos_embed`` is added into ``cls_token`` and ``pos_embed`` keeps
the patch rows (timm's ``no_embed_class`` layout: exact in float32, since that row only ever
meets the class token). Feature extraction: :mod:`sdzero.backbones.vit_features`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
import torch.nn.functional as F
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from torch import Tensor, nn

from sdzero.backbones.errors import WeightsNotFoundError
from sdzero.errors import ConfigError

logger = logging.getLogger(__name__)

# OVDiff normalises CLIP inputs with ImageNet statistics too; "clip" is the quirk-free option.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}


@dataclass(frozen=True)
class ViTSpec:
    """One named backbone: ``library`` ("timm" | "open_clip"), its architecture name there, the
    open_clip pretrained tag, the default block read (OVDiff's; the last for DINOv2, as SD+DINO),
    architecture overrides (tiny models, DINOv2's LayerScale init), the command that caches the
    pretrained weights on a machine with network (None: random only), and the position-embedding
    rule for other grids (:func:`interpolate_pos_embed`'s ``offset`` and ``antialias``; the
    defaults are DINO's and DINOv2's own, ``interpolate_offset=0.1``, no antialias)."""

    library: str
    arch: str
    tag: str | None
    block: int
    overrides: dict[str, Any] = field(default_factory=dict)
    download: str | None = None
    pos_offset: float = 0.1
    pos_antialias: bool = False


VIT_MODELS: dict[str, ViTSpec] = {}


def register_vit(name: str, spec: ViTSpec, *, replace: bool = False) -> ViTSpec:
    """Add ``spec`` to the registry as ``name`` (``ValueError`` if taken, unless ``replace``)."""
    if name in VIT_MODELS and not replace:
        raise ValueError(f"ViT backbone {name!r} is already registered")
    if spec.library not in ("timm", "open_clip"):
        raise ValueError(
            f"ViT backbone {name!r}: library {spec.library!r}; expected timm or open_clip"
        )
    VIT_MODELS[name] = spec
    return spec


def _timm_download(arch: str) -> str:
    return f"python -c \"import timm; timm.create_model('{arch}', pretrained=True)\""


_TINY_TIMM = {"embed_dim": 32, "depth": 3, "num_heads": 2}
_CLIP_DOWNLOAD = (
    "python -c \"import open_clip; open_clip.create_model('ViT-B-16', pretrained='openai')\""
)
_TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
register_vit(
    "dino_vitb8",
    ViTSpec(
        "timm",
        "vit_base_patch8_224.dino",
        None,
        -1,
        download=_timm_download("vit_base_patch8_224.dino"),
    ),
)
register_vit("clip_vitb16", ViTSpec("open_clip", "ViT-B-16", "openai", -2, download=_CLIP_DOWNLOAD))
register_vit(
    "tiny_vit8",
    ViTSpec("timm", "vit_base_patch8_224.dino", None, -1, {**_TINY_TIMM, "img_size": 32}),
)
register_vit("tiny_clip16", ViTSpec("open_clip", "ViT-B-16", None, -2, _TINY_CLIP))


def _dinov2(arch: str, registers: bool, **tiny: Any) -> ViTSpec:
    """DINOv2 as its torch.hub entry points build it: LayerScale initialised to 1, the last block
    read; the register models resample position embeddings to an output size (offset 0) with
    antialiasing. ``tiny``: architecture overrides of a random test model (no download)."""
    rule = {"pos_offset": 0.0, "pos_antialias": True} if registers else {}
    download = None if tiny else _timm_download(arch)
    return ViTSpec("timm", arch, None, -1, {"init_values": 1.0, **tiny}, download, **rule)


_TINY_DINOV2 = {**_TINY_TIMM, "img_size": 56}  # a 4x4 grid of 14 px patches
register_vit("dinov2_vits14", _dinov2("vit_small_patch14_dinov2.lvd142m", False))
register_vit("dinov2_vitb14", _dinov2("vit_base_patch14_dinov2.lvd142m", False))
register_vit("dinov2_vits14_reg", _dinov2("vit_small_patch14_reg4_dinov2.lvd142m", True))
register_vit("dinov2_vitb14_reg", _dinov2("vit_base_patch14_reg4_dinov2.lvd142m", True))
register_vit("tiny_dinov2", _dinov2("vit_small_patch14_dinov2.lvd142m", False, **_TINY_DINOV2))
register_vit(
    "tiny_dinov2_reg", _dinov2("vit_small_patch14_reg4_dinov2.lvd142m", True, **_TINY_DINOV2)
)


def vit_names() -> list[str]:
    """The registered ViT backbone names, sorted."""
    return sorted(VIT_MODELS)


def get_vit_spec(name: str) -> ViTSpec:
    """The named backbone; :class:`ConfigError` listing the known names otherwise."""
    if name not in VIT_MODELS:
        raise ConfigError(
            f"unknown ViT backbone {name!r} (method.extractors dino:<vit> / clip:<vit>, "
            f"method.clip_model); expected one of {vit_names()}"
        )
    return VIT_MODELS[name]


def load_backbone_model(
    name: str, weights: str = "pretrained", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Build the named backbone frozen in eval mode: a timm ``VisionTransformer`` or a full
    open_clip ``CLIP`` model (both towers).

    ``weights``: "pretrained" (the usual hub weights, from the local cache when offline),
    "random" (loud warning: features are meaningless) or a path to a local checkpoint file
    (a timm state dict for DINO, timm's or the official layout for DINOv2, an open_clip state
    dict for CLIP). Raises
    ``WeightsNotFoundError`` when the weights cannot be loaded. ``dtype=torch.float16`` (CLIP
    only) is OpenAI CLIP's half precision, what ``clip.load`` gives on CUDA: open_clip's
    ``precision="fp16"``, linear/conv/attention weights in fp16, layer norms computed in fp32.
    """
    spec = get_vit_spec(name)
    if dtype != torch.float32 and (dtype != torch.float16 or spec.library != "open_clip"):
        raise ValueError(f"backbone {name!r} cannot be built in {dtype}; expected torch.float32")
    if weights == "random":
        logger.warning(
            "RANDOM WEIGHTS for backbone %r: its features are meaningless; use only for tests and "
            "demos, never for reported numbers.",
            name,
        )
        source: str | Path | None = None
    elif weights == "pretrained":
        if spec.download is None:
            raise WeightsNotFoundError(
                f"backbone {name!r} is a test architecture without pretrained weights; expected "
                "weights='random' or a checkpoint path"
            )
        source = "pretrained"
    else:
        source = Path(weights).expanduser()
        if not source.is_file():
            raise WeightsNotFoundError(
                f"weights={weights!r} for backbone {name!r} is neither 'pretrained', 'random' nor "
                "an existing checkpoint file"
            )
    try:
        model = _create(spec, source, dtype)
    except (OSError, RuntimeError) as err:
        if source == "pretrained":
            raise WeightsNotFoundError(
                f"pretrained weights of {name!r} ({spec.arch}) could not be loaded: "
                f"{type(err).__name__}: {err}\nOn a machine with network run\n    {spec.download}\n"
                "and copy the Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME/hub) to "
                "this machine, or pass weights=/path/to/checkpoint. (HF_HUB_OFFLINE=1 skips the "
                "network retries on machines without network.)"
            ) from err
        raise WeightsNotFoundError(
            f"checkpoint {str(source)!r} could not be loaded into backbone {name!r} "
            f"({spec.library} {spec.arch}): {err}"
        ) from err
    return model.eval().requires_grad_(False)


def _create(spec: ViTSpec, source: str | Path | None, dtype: torch.dtype) -> nn.Module:
    """Instantiate ``spec`` offline (source None), from the hub cache ("pretrained") or a file."""
    if spec.library == "timm":
        # Our own position-embedding resampling handles other sizes; dynamic_img_size only
        # lets the patch embedding accept them.
        kwargs = {**spec.overrides, "dynamic_img_size": True}
        if isinstance(source, Path):
            kwargs["pretrained_cfg_overlay"] = {"file": str(source)}
        return timm.create_model(spec.arch, pretrained=source is not None, **kwargs)
    pretrained = spec.tag if source == "pretrained" else source
    # OpenAI CLIP was trained with QuickGELU; the tiny model mirrors it.
    return open_clip.create_model(
        spec.arch,
        pretrained=None if pretrained is None else str(pretrained),
        force_quick_gelu=True,
        precision="fp16" if dtype == torch.float16 else "fp32",
        **spec.overrides,
    )


def check_images(images: Tensor, min_size: int = 1) -> None:
    """Raise ``ValueError`` unless ``images`` is a float (B, 3, H, W) batch with H and W at least
    ``min_size`` pixels."""
    if not (
        isinstance(images, Tensor)
        and images.ndim == 4
        and images.shape[1] == 3
        and images.is_floating_point()
    ):
        got = (
            f"{tuple(images.shape)} {images.dtype}"
            if isinstance(images, Tensor)
            else type(images).__name__
        )
        raise ValueError(f"expected images as a float tensor (B, 3, H, W) in [0, 1], got {got}")
    height, width = images.shape[-2:]
    if min(height, width) < min_size:
        raise ValueError(
            f"image size {height}x{width} (HxW) is smaller than one patch ({min_size} px); "
            f"resize to at least {min_size}x{min_size}"
        )


def interpolate_pos_embed(
    pos_embed: Tensor,
    grid: tuple[int, int],
    force: bool = False,
    *,
    offset: float = 0.1,
    antialias: bool = False,
    class_row: bool = True,
) -> Tensor:
    """Resample learned position embeddings ``(1 + g*g, C)`` (class row first, square grid; no
    class row with ``class_row=False``) to ``(1 + h*w, C)`` for a ``grid = (h, w)`` patch grid,
    row-major; unchanged at the native grid unless ``force``.

    Bicubic, as ``interpolate_pos_encoding`` of facebookresearch/dino and dinov2: with ``offset``
    (DINO's and DINOv2's ``interpolate_offset``, 0.1) the scale factors are ``(h + offset) / g``
    and ``(w + offset) / g`` instead of an output size, which moves the sampling points slightly
    compared with a size-based resize; ``offset=0`` resizes to ``(h, w)`` (DINOv2's register
    models). ``antialias``: DINOv2's ``interpolate_antialias`` (PyTorch's antialiased bicubic,
    whose kernel differs even when upsampling). Those codes skip the resampling only when the
    token count is native *and* the input image is square in pixels; ``force`` (a non-square
    image) reproduces the second condition.
    """
    lead = 1 if class_row else 0
    num_patches, dim = pos_embed.shape[0] - lead, pos_embed.shape[1]
    native = math.isqrt(num_patches)
    if native * native != num_patches:
        raise ValueError(f"expected a square grid of position embeddings, got {num_patches}")
    height, width = grid
    if (height, width) == (native, native) and not force:
        return pos_embed
    if offset:
        scale = ((height + offset) / native, (width + offset) / native)
        how: dict[str, Any] = {"scale_factor": scale, "recompute_scale_factor": False}
    else:
        how = {"size": (height, width)}
    patch_pos = pos_embed[lead:].reshape(1, native, native, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos.float(), mode="bicubic", align_corners=False, antialias=antialias, **how
    ).to(pos_embed.dtype)
    if patch_pos.shape[-2:] != (height, width):
        raise ValueError(
            f"offset={offset} resamples a {native}x{native} grid to "
            f"{tuple(patch_pos.shape[-2:])}, not {height}x{width}"
        )
    rows = patch_pos.permute(0, 2, 3, 1).reshape(height * width, dim)
    return torch.cat([pos_embed[:lead], rows])
