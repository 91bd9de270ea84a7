"""Dense features of one block of a frozen ViT (DINO, DINOv2, CLIP) on its patch grid.

``build_vit_extractor("dino_vitb8")`` gives the attention keys of DINO ViT-B/8's last block and
``build_vit_extractor("clip_vitb16")`` those of OpenAI CLIP ViT-B/16's block -2, as OVDiff's
prototypes use them; ``build_vit_extractor("dinov2_vitb14", facet="token")`` the patch tokens of
DINOv2 ViT-B/14's last block, as SD+DINO uses them. The backbones are those of
:mod:`sdzero.backbones.vit`; the block is read through the feature tap, which stops the pass there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.transformer import VisionTransformer as OpenClipViT
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import Tensor, nn

from sdzero.backbones.tap import FeatureTap
from sdzero.backbones.vit import (
    NORMALIZATIONS,
    check_images,
    get_vit_spec,
    interpolate_pos_embed,
    load_backbone_model,
)

FACETS = ("key", "token")


class ViTFeatureExtractor(nn.Module):
    """Dense features of one block of a frozen ViT on its patch grid.

    ``forward(images)``: (B, 3, H, W) float in [0, 1], H, W >= p (``patch_size``) -> (B, dim,
    H // p, W // p); the last H mod p rows and W mod p columns never reach a patch, as with the
    official stride-p patch convolution. ``facet="key"``: the block's attention keys, heads
    concatenated (OVDiff); ``facet="token"``: the block's output tokens (SD+DINO). The class
    token and any register tokens are dropped; position embeddings are resampled for any grid
    (:func:`~sdzero.backbones.vit.interpolate_pos_embed` with ``pos_offset`` and
    ``pos_antialias``); the blocks after ``block`` never run, nor, for keys, the block's own
    attention and MLP. ``model`` is a timm ``VisionTransformer`` built with
    ``dynamic_img_size=True`` (a class token, optional register tokens, position embeddings with
    or without a class row) or an open_clip vision tower (``clip.visual``); ``mean``/``std``
    normalise the [0, 1] input.
    """

    def __init__(
        self,
        model: nn.Module,
        block: int,
        facet: str = "key",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        *,
        pos_offset: float = 0.1,
        pos_antialias: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(model, TimmViT):
            registers = 0 if model.reg_token is None else model.reg_token.shape[1]
            if not model.dynamic_img_size or model.cls_token is None:
                raise ValueError(
                    "expected a timm VisionTransformer with a class token and dynamic_img_size="
                    "True (timm.create_model(..., dynamic_img_size=True))"
                )
            if model.num_prefix_tokens != 1 + registers:
                raise ValueError(f"expected 1 + {registers} prefix tokens")
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
        self.pos_offset = float(pos_offset)
        self.pos_antialias = bool(pos_antialias)
        self._is_timm = isinstance(model, TimmViT)
        self.num_prefix_tokens = int(model.num_prefix_tokens) if self._is_timm else 1
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
        """Normalised (B, 3, H, W), patch multiples -> tokens (B, prefix + h*w, C) entering the
        first block: class token, register tokens, patches; ``force_pos``: resample position
        embeddings even at the native grid.

        Position embeddings go to the class token (when they have a class row) and to the
        patches, never to registers (DINOv2). Training-only dropouts are left out.
        """
        model = self.model
        registers = None
        if self._is_timm:
            patches = model.patch_embed(images)  # (B, h, w, C) under dynamic_img_size
            cls_token, pos_embed, pre_norm = model.cls_token, model.pos_embed[0], model.norm_pre
            class_row, registers = not model.no_embed_class, model.reg_token
        else:
            patches = model.conv1(images).permute(0, 2, 3, 1)
            cls_token, pos_embed, pre_norm = (
                model.class_embedding,
                model.positional_embedding,
                model.ln_pre,
            )
            class_row = True
        batch, height, width, dim = patches.shape
        pos = interpolate_pos_embed(
            pos_embed,
            (height, width),
            force=force_pos,
            offset=self.pos_offset,
            antialias=self.pos_antialias,
            class_row=class_row,
        ).to(patches.dtype)
        cls = cls_token.reshape(1, 1, dim).expand(batch, 1, dim).to(patches.dtype)
        if class_row:
            cls, pos = cls + pos[:1], pos[1:]
        parts = [cls, patches.flatten(1, 2) + pos]
        if registers is not None:
            parts.insert(1, registers.expand(batch, -1, -1).to(patches.dtype))
        return pre_norm(torch.cat(parts, dim=1))

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
        patches = features[:, self.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(batch, self.dim, *grid)


def build_vit_extractor(
    name: str,
    weights: str = "pretrained",
    block: int | None = None,
    facet: str = "key",
    normalization: str = "imagenet",
) -> ViTFeatureExtractor:
    """The named extractor (a :data:`~sdzero.backbones.vit.VIT_MODELS` name): ``block`` defaults
    to the spec's (OVDiff's -1 DINO, -2 CLIP; -1 DINOv2), ``normalization`` to ImageNet
    statistics (as OVDiff does for CLIP too; "clip" for CLIP's own); position embeddings follow
    the spec's rule."""
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
        visual,
        spec.block if block is None else block,
        facet=facet,
        mean=mean,
        std=std,
        pos_offset=spec.pos_offset,
        pos_antialias=spec.pos_antialias,
    )
