"""SD+DINO (Zhang et al., NeurIPS 2023, "A Tale of Two Features"): ``method=sd_dino``, zero-shot.

As the official ``pck_spair_pascal.py`` runs it (github Junyi42/sd-dino, defaults of its
arguments): the image's longer side scaled to 960 px and centred on black (:mod:`centred_frame`);
Stable Diffusion 1.5 at t=100 on 512 px sliding windows with ODISE's fixed noise, the inputs of
LDM output blocks 2, 5 and 8 (1/64, 1/32 and 1/16 of the side; :mod:`sd_windows`); DINOv2
ViT-B/14 patch tokens of its last block on the same picture at 840 px (60x60 patches, the grid of
block 8). For each pair: each SD layer reduced to 256 dimensions by a PCA over both images' cells
(co-PCA), the layers fused coarse to fine, SD and DINO each L2-normalised and concatenated with
weight 1 (:mod:`fusion`). A source point reads the descriptor of the patch holding it; its match
is the target patch of highest similarity, reported at that patch's centre pixel in the official
convention (``14 j + 6.5`` DINO pixels: half a DINO pixel left/up of the patch centre).

Co-PCA mixes the two images, so no descriptor is per image: :meth:`SDDINO.features` returns the
per-image raw parts (the SD layer maps and the DINO tokens, packed), which go through the feature
cache, and :meth:`SDDINO.pair_descriptors` fuses them per pair. Matching is the feature methods'
(:class:`~sdzero.correspondence.matching.FeatureMatching`) with the source patch's own descriptor
(:meth:`SDDINO.query_descriptors`) and the reported point moved by ``method.patch_offset``.

GeoAware-SC's zero-shot setting (Zhang et al., CVPR 2024; github Junyi42/GeoAware-SC,
``configs/eval_zero_shot_spair.yaml``, ``preprocess_map.py``, ``pck_train.py``) runs on the same
parts with ``method.timestep=50`` and ``method.fusion=concat`` (no PCA: the raw 640 + 1280 + 1280
SD channels and the 768 DINO channels, see :mod:`fusion`), reports the patch centre
(``patch_offset=0``: ``14 j + 7``) and adds its test-time pose alignment and window soft-argmax
(``method.flip_align`` and the others, :mod:`sdzero.correspondence.refine`): the mirrored source
is fused with the target as its own pair (with co-PCA: its own projection of the two).
``experiment=geoaware_zs`` holds those values.

Stated differences from the official code:

- **The conditioning.** The official UNet is conditioned by ODISE's *trained implicit captioner*
  (a CLIP ViT-L/14-336 image embedding through two learned projections added to the empty
  prompt's embedding and to the time embedding; weights from ODISE's COCO checkpoint). sdzero
  loads no ODISE weights: the UNet sees the embedding of ``method.prompt`` (default ``""``, the
  empty prompt the captioner adds to) and no time-embedding offset.
- **Random streams.** The noise is reproduced exactly (``method.noise_seed``, like ODISE's
  ``manual_seed(42)`` draw shared by every window and image). ``torch.pca_lowrank`` draws its
  random projection from the global stream, which the official code seeds once and consumes
  pair after pair; here each pair's three draws are seeded from the run seed, the two image
  names and the layer (:func:`pca_seed`), so a pair's result does not depend on what ran before.
- **The DINO picture** is the 960 px frame resized to 840 (bicubic, antialiased), not a second
  LANCZOS resize of the original; nearest neighbours by cosine, not L2 (the same argmax, since
  every fused descriptor has the same norm, up to float ties).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sdzero.backbones.vit_features import FACETS, build_vit_extractor
from sdzero.correspondence.centred_frame import CentredFrame
from sdzero.correspondence.fusion import (
    FUSIONS,
    PCA_SOLVERS,
    co_pca,
    fuse_descriptors,
    fuse_layers,
    pack,
    stack_layers,
    unpack,
)
from sdzero.correspondence.matching import FeatureMatching, FeatureSettings, cell_of
from sdzero.correspondence.sd_windows import windowed_features
from sdzero.errors import ConfigError
from sdzero.evaluation import SmokeTest
from sdzero.seeding import keyed_generator
from sdzero.settings import build_settings
from sdzero.tasks.frames import ModelFrame

OUTPUT_BLOCKS = 12  # LDM output blocks of an SD 1.x/2.x UNet (3 per up block)
TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class SDDINOSettings(FeatureSettings):
    """Every ``method.*`` key of ``sd_dino``; defaults are the official zero-shot SPair settings
    (``pck_spair_pascal.py`` arguments, ODISE's ``LdmExtractor``), scoring included."""

    resize: str = "letterbox"  # letterbox: centred on black, LANCZOS (official) | stretch
    pck_alphas: tuple[float, ...] = (0.01, 0.05, 0.1)  # the official report
    pck_inclusive: bool = False  # a hit is error < alpha * box side (official)
    image_size: int = 960  # side of the SD picture (official --SIZE), a multiple of 64
    sd_window: int = 512  # side of ODISE's sliding UNet windows (its backbone_in_size)
    timestep: int = 100  # t of the noised latents (--TIMESTEP)
    unet_blocks: tuple[int, ...] = (2, 5, 8)  # LDM output blocks read, coarse to fine (--INDICES)
    fusion: str = "co_pca"  # co_pca: per-pair co-PCA (official) | concat: raw layers (GeoAware-SC)
    pca_dims: tuple[int, ...] = (256, 256, 256)  # co-PCA dimensions per read block (--PCA_DIMS)
    pca_solver: str = "lowrank"  # lowrank: torch.pca_lowrank (official) | svd: exact
    layer_weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # --WEIGHT[0:3], see fusion.fuse_layers
    sd_weight: float = 1.0  # weight of the normalised SD part (--WEIGHT[3]); 0: DINO only
    dino_weight: float = 1.0  # weight of the normalised DINO part (--WEIGHT[4]); 0: SD only
    prompt: str = ""  # UNet prompt, may hold {category} ("" = ODISE's base; see the module doc)
    noise_seed: int = 42  # seed of ODISE's shared noise draw
    dino_model: str = "dinov2_vitb14"  # a sdzero.backbones.vit name (--MODEL_SIZE base)
    dino_weights: str = "pretrained"  # pretrained | random | a checkpoint file
    dino_size: int = 840  # side of the DINO picture (official 840: 60x60 patches of 14)
    dino_block: int = -1  # block read (official layer 11 of ViT-S/B, 23 of L, 39 of g: the last)
    dino_facet: str = "token"  # token: the block's output tokens (official) | key
    window_batch: int = 0  # SD windows per UNet call (0: all of an image's); speed only
    patch_offset: float = -0.5  # DINO px added to a matched patch's centre (official 14 j + 6.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("image_size", "sd_window"):
            if getattr(self, key) < 64 or getattr(self, key) % 64:
                raise ConfigError(
                    f"method.{key} must be a multiple of 64, got {getattr(self, key)}"
                )
        if not 0 <= self.timestep < TRAIN_TIMESTEPS:
            raise ConfigError(f"method.timestep must lie in 0..999, got {self.timestep}")
        blocks = self.unet_blocks
        if (
            not blocks
            or any(not 0 <= b < OUTPUT_BLOCKS for b in blocks)
            or sorted(blocks) != list(blocks)
        ):
            raise ConfigError(
                f"method.unet_blocks must be increasing output-block indices in 0..11, got {list(blocks)}"
            )
        for key in ("pca_dims", "layer_weights"):
            if len(getattr(self, key)) != len(blocks):
                raise ConfigError(
                    f"method.{key} needs one value per method.unet_blocks entry ({len(blocks)}), "
                    f"got {list(getattr(self, key))}"
                )
        if any(d < 1 for d in self.pca_dims):
            raise ConfigError(f"method.pca_dims must be >= 1, got {list(self.pca_dims)}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"method.fusion must be one of {list(FUSIONS)}, got {self.fusion!r}")
        if self.pca_solver not in PCA_SOLVERS:
            raise ConfigError(
                f"method.pca_solver must be one of {list(PCA_SOLVERS)}, got {self.pca_solver!r}"
            )
        if self.sd_weight < 0 or self.dino_weight < 0 or self.sd_weight + self.dino_weight == 0:
            raise ConfigError("method.sd_weight and method.dino_weight must be >= 0, not both 0")
        try:
            self.prompt.format(category="cat")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"method.prompt={self.prompt!r} may hold no placeholder but {{category}}"
            ) from err
        if self.dino_size < 14:
            raise ConfigError(f"method.dino_size must be >= 14, got {self.dino_size}")
        if self.dino_facet not in FACETS:
            raise ConfigError(
                f"method.dino_facet must be one of {list(FACETS)}, got {self.dino_facet!r}"
            )
        if self.window_batch < 0:
            raise ConfigError(
                f"method.window_batch must be >= 0 (0 = all), got {self.window_batch}"
            )


def pca_seed(seed: int, src_name: str, trg_name: str, layer: int) -> int:
    """The seed of ``torch.pca_lowrank``'s draws for ``layer`` of the pair (``src_name``,
    ``trg_name``) in a run seeded ``seed``."""
    names = [
        int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "little") >> 1
        for n in (src_name, trg_name)
    ]
    return keyed_generator(int(seed), *names, int(layer)).initial_seed()


class SDDINO(FeatureMatching):
    """SD+DINO on a frozen Stable Diffusion (``backbone``: the ``backbone.*`` keys) and a frozen
    DINOv2 (``method.dino_*``); ``settings``: the keys of :class:`SDDINOSettings`."""

    settings_class = SDDINOSettings
    # the per-image parts do not depend on these (co-PCA and fusion run per pair)
    non_feature_keys = (
        "fusion",
        "patch_offset",
        "pca_dims",
        "pca_solver",
        "layer_weights",
        "sd_weight",
        "dino_weight",
        "window_batch",
    )
    # the contract runs GeoAware's test-time options on mirrored pairs (the flipped branch)
    smoke_test = SmokeTest(
        "demo_sd_dino",
        (
            "data.num_pairs=3",
            "data.kind=mirror",
            "method.flip_align=true",
            "method.flip_mask=box",
            "method.soft_argmax_window=2",
        ),
        batching=(("method.window_batch=1",),),
    )

    def __init__(self, backbone: dict[str, Any], seed: int = 0, **settings: Any) -> None:
        super().__init__(backbone, seed)
        self.settings = build_settings(SDDINOSettings, settings)
        self.dino = None

    def requirements(self) -> list[Any]:
        """Stable Diffusion and the DINOv2 weights (``method.dino_weights``)."""
        from sdzero.requirements import vit_requirements

        s = self.settings
        return super().requirements() + vit_requirements(
            s.dino_model, s.dino_weights, "method.dino_weights"
        )

    def setup(self, stage: str) -> None:
        """Build the task (under a Trainer), load both backbones and check that their grids agree."""
        super().setup(stage)
        s = self.settings
        self.load_sd(text_encoder=True)
        if self.dino is None:
            self.dino = build_vit_extractor(
                s.dino_model, s.dino_weights, s.dino_block, s.dino_facet
            )
            self.random_weights |= s.dino_weights == "random"
        sd_grid = s.image_size * (1 << (s.unet_blocks[-1] // 3)) // 64
        dino_grid = s.dino_size // self.dino.patch_size
        if sd_grid != dino_grid:
            raise ConfigError(
                f"the finest SD layer (method.unet_blocks[-1]={s.unet_blocks[-1]}) is a {sd_grid}^2 grid "
                f"at method.image_size={s.image_size} but DINO's is {dino_grid}^2 at method.dino_size="
                f"{s.dino_size} (patch {self.dino.patch_size}); they must agree (official: 960 / 840)"
            )

    def frame(self, image: torch.Tensor) -> CentredFrame | ModelFrame:
        """The official centred frame (``method.resize=letterbox``) or the base's stretch."""
        if self.settings.resize == "letterbox":
            return CentredFrame(int(image.shape[2]), int(image.shape[1]), self.settings.image_size)
        return super().frame(image)

    @torch.no_grad()
    def features(self, images: torch.Tensor, names: Sequence[str], category: str) -> torch.Tensor:
        """``(B, 3, S, S)`` [0, 1] model-frame images -> ``(B, N)``: per image its raw parts packed
        (:func:`~sdzero.correspondence.fusion.pack`): the SD maps of ``method.unet_blocks``
        (coarse to fine, ``(C_i, S/s_i, S/s_i)``), then the DINO map ``(D, g, g)``."""
        s = self.settings
        context = self.prompt_embedding(category)
        small = F.interpolate(
            images.float(),
            size=(s.dino_size,) * 2,
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        dino = self.dino(small.clamp(0, 1))
        packed = []
        for b in range(len(images)):
            sd_maps = windowed_features(
                self.sd,
                images[b : b + 1],
                window=s.sd_window,
                timestep=s.timestep,
                context=context,
                blocks=s.unet_blocks,
                noise_seed=s.noise_seed,
                window_batch=s.window_batch,
            )
            packed.append(pack([*sd_maps, dino[b].float()]))
        return torch.stack(packed)

    def pair_descriptors(
        self, src_features: torch.Tensor, trg_features: torch.Tensor, src_name: str, trg_name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair's fused descriptors ``(C, g, g)`` each, from the two images' packed raw parts
        (:meth:`features`): ``method.fusion=co_pca`` projects each SD layer of the two on their
        pooled principal axes (draws seeded by :func:`pca_seed` of the two names) and folds the
        layers; ``concat`` stacks each image's raw layers on its own."""
        s = self.settings
        src_parts, trg_parts = unpack(src_features), unpack(trg_features)
        if s.fusion == "concat":
            sd = [stack_layers(parts[:-1], s.layer_weights) for parts in (src_parts, trg_parts)]
        else:
            reduced = [
                co_pca(a, b, dim, s.pca_solver, pca_seed(self.seed, src_name, trg_name, layer))
                for layer, (a, b, dim) in enumerate(
                    zip(src_parts[:-1], trg_parts[:-1], s.pca_dims, strict=True)
                )
            ]
            sd = [fuse_layers([r[side] for r in reduced], s.layer_weights) for side in (0, 1)]
        src_desc, trg_desc = (
            fuse_descriptors(part, parts[-1], s.sd_weight, s.dino_weight)
            for part, parts in zip(sd, (src_parts, trg_parts), strict=True)
        )
        return src_desc, trg_desc

    def query_descriptors(self, features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """``(N, C)``: the descriptor of the patch holding each source point (model pixels), as
        both official codes index it (``kpts_to_patch_idx``), not a bilinear sample."""
        cells = cell_of(points, tuple(features.shape[-2:]), self.settings.image_size)
        return features.flatten(1)[:, cells].T

    def match_grid(
        self, src_desc: torch.Tensor, trg_desc: torch.Tensor, points: torch.Tensor
    ) -> torch.Tensor:
        """The feature methods' match (argmax patch centre, or window soft-argmax) moved by
        ``method.patch_offset`` DINO pixels on both axes (model pixels out)."""
        s = self.settings
        shift = s.patch_offset * s.image_size / s.dino_size
        return super().match_grid(src_desc, trg_desc, points) + shift
