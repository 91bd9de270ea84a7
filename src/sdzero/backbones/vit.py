"""Frozen ViT feature extractors (OVDiff's DINO and CLIP facets) and the shared weight loader.

``build_vit_extractor("dino_vitb8")`` gives the attention keys of DINO ViT-B/8's last block and
``build_vit_extractor("clip_vitb16")`` those of OpenAI CLIP ViT-B/16's block -2, on the patch grid,
as OVDiff's prototypes use them. ``tiny_vit8`` / ``tiny_clip16`` are small random models with the
same code paths, for tests and demos.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer as OpenClipViT
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import Tensor, nn

from sdzero.backbones.errors import WeightsNotFoundError
from sdzero.backbones.tap import FeatureTap
from sdzero.errors import ConfigError

logger = logging.getLogger(__name__)

# OVDiff normalises CLIP inputs with ImageNet statistics too; "clip" is the quirk-free option.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}
FACETS = ("key", "token")


@dataclass(frozen=True)
class ViTSpec:
    """One named backbone: ``library`` ("timm" | "open_clip"), its architecture name there, the
    open_clip pretrained tag, OVDiff's default block, architecture overrides (tiny models), and the
    command that caches the pretrained weights on a machine with network (None: random only)."""

    library: str
    arch: str
    tag: str | None
    block: int
    overrides: dict[str, Any] = field(default_factory=dict)
    download: str | None = None


VIT_MODELS: dict[str, ViTSpec] = {
    "dino_vitb8": ViTSpec(
        "timm",
        "vit_base_patch8_224.dino",
        None,
        -1,
        download="python -c \"import timm; timm.create_model('vit_base_patch8_224.dino', "
        'pretrained=True)"',
    ),
    "clip_vitb16": ViTSpec(
        "open_clip",
        "ViT-B-16",
        "openai",
        -2,
        download="python -c \"import open_clip; open_clip.create_model('ViT-B-16', "
        "pretrained='openai')\"",
    ),
    "tiny_vit8": ViTSpec(
        "timm",
        "vit_base_patch8_224.dino",
        None,
        -1,
        {"embed_dim": 32, "depth": 3, "num_heads": 2, "img_size": 32},
    ),
    "tiny_clip16": ViTSpec(
        "open_clip",
        "ViT-B-16",
        None,
        -2,
        {
            "embed_dim": 16,
            "vision_cfg": {
                "image_size": 32,
                "patch_size": 16,
                "width": 32,
                "layers": 3,
                "head_width": 16,
            },
            "text_cfg": {
                "context_length": 77,
                "vocab_size": 49408,
                "width": 32,
                "heads": 2,
                "layers": 2,
            },
        },
    ),
}


def get_vit_spec(name: str) -> ViTSpec:
    """The named backbone; ``ValueError`` listing the known names otherwise."""
    if name not in VIT_MODELS:
        raise ConfigError(
            f"unknown ViT backbone {name!r} (method.extractors dino:<vit> / clip:<vit>, "
            f"method.clip_model); expected one of {sorted(VIT_MODELS)}"
        )
    return VIT_MODELS[name]


def load_backbone_model(
    name: str, weights: str = "pretrained", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Build the named backbone frozen in eval mode: a timm ``VisionTransformer`` or a full
    open_clip ``CLIP`` model (both towers).

    ``weights``: "pretrained" (the usual hub weights, from the local cache when offline),
    "random" (loud warning: features are meaningless) or a path to a local checkpoint file
    (a timm state dict for DINO, an open_clip state dict for CLIP). Raises
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


def interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int], force: bool = False) -> Tensor:
    """Resample learned position embeddings ``(1 + g*g, C)`` (class token first, square grid)
    to ``(1 + h*w, C)`` for a ``grid = (h, w)`` patch grid; unchanged at the native grid unless
    ``force``.

    Bicubic with DINO's convention (``interpolate_pos_encoding`` of facebookresearch/dino, which
    OVDiff's extractors inherit): scale factors ``(h + 0.1) / g`` instead of an output size, which
    moves the sampling points slightly compared with a size-based resize. That code skips the
    resampling only when the token count is native *and* the input image is square in pixels;
    ``force`` (a non-square image) reproduces the second condition.
    """
    num_patches, dim = pos_embed.shape[0] - 1, pos_embed.shape[1]
    native = math.isqrt(num_patches)
    if native * native != num_patches:
        raise ValueError(f"expected a square grid of position embeddings, got {num_patches}")
    height, width = grid
    if (height, width) == (native, native) and not force:
        return pos_embed
    patch_pos = pos_embed[1:].reshape(1, native, native, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos.float(),
        scale_factor=((height + 0.1) / native, (width + 0.1) / native),
        mode="bicubic",
        align_corners=False,
        recompute_scale_factor=False,
    ).to(pos_embed.dtype)
    return torch.cat([pos_embed[:1], patch_pos.permute(0, 2, 3, 1).reshape(height * width, dim)])


class ViTFeatureExtractor(nn.Module):
    """Dense features of one block of a frozen ViT on its patch grid.

    ``forward(images)``: (B, 3, H, W) float in [0, 1], H, W >= p (``patch_size``) -> (B, dim,
    H // p, W // p); the last H mod p rows and W mod p columns never reach a patch, as with the
    official stride-p patch convolution. ``facet="key"``: the block's attention keys, heads
    concatenated (OVDiff); ``facet="token"``: the block's output tokens. The class token is
    dropped; position embeddings are resampled for any grid (``interpolate_pos_embed``); the
    blocks after ``block`` never run, nor, for keys, the block's own attention and MLP.
    ``model`` is a timm ``VisionTransformer`` built with ``dynamic_img_size=True`` or an open_clip
    vision tower (``clip.visual``); ``mean``/``std`` normalise the [0, 1] input.
    """

    def __init__(
        self,
        model: nn.Module,
        block: int,
        facet: str = "key",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__()
        if isinstance(model, TimmViT):
            if not model.dynamic_img_size or model.num_prefix_tokens != 1 or model.no_embed_class:
                raise ValueError(
                    "expected a timm VisionTransformer with one class token, class position "
                    "embedding and dynamic_img_size=True (timm.create_model(..., "
                    "dynamic_img_size=True))"
                )
            blocks, patch = model.blocks, model.patch_embed.patch_size
        elif isinstance(model, OpenClipViT):
            if not model.transformer.batch_first:
                raise ValueError("expected an open_clip vision tower with batch_first blocks")
            blocks, patch = model.transformer.resblocks, model.patch_size
        else:
            raise TypeError(
                f"expected a timm VisionTransformer or an open_clip VisionTransformer, got "
                f"{type(model).__name__}"
            )
        if patch[0] != patch[1]:
            raise ValueError(f"expected square patches, got {tuple(patch)}")
        if not -len(blocks) <= block < len(blocks):
            raise ValueError(f"block={block} is out of range for a ViT with {len(blocks)} blocks")
        if facet not in FACETS:
            raise ValueError(f"facet={facet!r}; expected one of {FACETS}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"expected 3-channel mean/std, got mean={mean}, std={std}")
        self.model = model
        self.block = block % len(blocks)
        self.facet = facet
        self.patch_size = int(patch[0])
        self._is_timm = isinstance(model, TimmViT)
        self.dim = int(self._dim(blocks[self.block]))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _dim(self, block: nn.Module) -> int:
        if self.facet == "token":
            return self.model.embed_dim if self._is_timm else self.model.transformer.width
        return block.attn.qkv.out_features // 3 if self._is_timm else block.attn.embed_dim

    def _blocks(self) -> nn.ModuleList | nn.Sequential:
        return self.model.blocks if self._is_timm else self.model.transformer.resblocks

    def _embed(self, images: Tensor, force_pos: bool) -> Tensor:
        """Normalised (B, 3, H, W), patch multiples -> tokens (B, 1 + h*w, C) entering the first
        block; ``force_pos``: resample position embeddings even at the native grid.

        Training-only dropouts (position / patch dropout) are left out.
        """
        model = self.model
        if self._is_timm:
            patches = model.patch_embed(images)  # (B, h, w, C) under dynamic_img_size
            cls_token, pos_embed, pre_norm = model.cls_token, model.pos_embed[0], model.norm_pre
        else:
            patches = model.conv1(images).permute(0, 2, 3, 1)
            cls_token, pos_embed, pre_norm = (
                model.class_embedding,
                model.positional_embedding,
                model.ln_pre,
            )
        batch, height, width, dim = patches.shape
        tokens = torch.cat(
            [
                cls_token.reshape(1, 1, dim).expand(batch, 1, dim).to(patches.dtype),
                patches.flatten(1, 2),
            ],
            dim=1,
        )
        pos = interpolate_pos_embed(pos_embed, (height, width), force=force_pos)
        tokens = tokens + pos.to(patches.dtype)
        return pre_norm(tokens)

    def _run_blocks(self, tokens: Tensor) -> Tensor:
        for block in self._blocks():
            tokens = block(tokens)
        return tokens

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, dim, H // patch_size, W // patch_size)."""
        check_images(images, self.patch_size)
        batch, _, height, width = images.shape
        grid = (height // self.patch_size, width // self.patch_size)
        # Same patches as the official convolution; timm's patch embedding rejects a remainder.
        kept = images[..., : grid[0] * self.patch_size, : grid[1] * self.patch_size]
        # DINO's rule: only a square image at the native grid keeps its position embeddings.
        tokens = self._embed((kept - self.mean) / self.std, force_pos=height != width)
        # The tap stops the blocks once the chosen facet exists (keys: before that block's
        # attention and MLP run).
        kind = "keys" if self.facet == "key" else "outputs"
        prefix = "blocks" if self._is_timm else "transformer.resblocks"
        path = f"{prefix}.{self.block}"
        with FeatureTap(self.model, **{kind: [path]}) as tap:
            features = getattr(tap.run(lambda: self._run_blocks(tokens)), kind)[path]
        return features[:, 1:].transpose(1, 2).reshape(batch, self.dim, *grid)


def build_vit_extractor(
    name: str,
    weights: str = "pretrained",
    block: int | None = None,
    facet: str = "key",
    normalization: str = "imagenet",
) -> ViTFeatureExtractor:
    """The named extractor (``VIT_MODELS``): ``block`` defaults to OVDiff's (-1 DINO, -2 CLIP),
    ``normalization`` to ImageNet statistics for both, as OVDiff does ("clip" for CLIP's own)."""
    spec = get_vit_spec(name)
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization={normalization!r}; expected one of {sorted(NORMALIZATIONS)}"
        )
    model = load_backbone_model(name, weights)
    # The CLIP text tower is not needed for image features; keeping only .visual frees it.
    visual = model.visual if spec.library == "open_clip" else model
    mean, std = NORMALIZATIONS[normalization]
    return ViTFeatureExtractor(
        visual, spec.block if block is None else block, facet=facet, mean=mean, std=std
    )
