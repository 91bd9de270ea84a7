"""DIFT (Tang et al., NeurIPS 2023, "Emergent Correspondence from Image Diffusion"): ``method=dift``.

An image's features, as the official ``SDFeaturizer4Eval`` computes them (github
Tsingularity/dift, ``src/models/dift_sd.py``): the image resized to ``image_size``² with PIL's
default filter (bicubic) and mapped to [-1, 1]; ``ensemble_size`` copies of it, each VAE-encoded
to a posterior *sample* (times the scaling factor) and noised to ``timestep`` with its own Gaussian
draw (the DDPM forward process of the SD betas); one UNet pass over the copies, each conditioned on
the class prompt's embedding (the text encoder's last hidden state, padded to 77 tokens); the
output of up block ``up_ft_index`` (its upsampler included: 1/16 of the side for index 1),
averaged over the copies. Matching (``eval_spair.py``): both maps upsampled to their original
images, the argmax pixel of cosine similarity
(:func:`~sdzero.correspondence.matching.nearest_pixels`).

An exact speed-up: the official code VAE-encodes the ``ensemble_size`` copies of the image (the
same deterministic encoder on the same pixels: one posterior, encoded ``ensemble_size`` times);
here the image is encoded once and each copy draws its sample from that posterior
(:func:`~sdzero.backbones.sd_features.diffused_latents` with ``copies``). At 768 px on SD 2.1 the
encoder is 2.6 TFLOP an image against 1.1 for the UNet pass of one copy up to block 1, so this
saves 7 of the 8 encodes, about 60% of the official FLOPs per image (``benchmarks/bench_dift.py``).

Random streams (a stated difference): the official code draws the posterior samples and the noise
from torch's global stream, so an image's draws depend on everything computed before it. Here each
copy draws both (posterior sample first, then noise) from its own stream keyed by the run seed,
the image's name and the copy's index (:func:`copy_generator`): the same distributions, different
draws, and an image's features are the same in every pair, batch, shard and resumed run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from sdzero.backbones.sd_features import diffused_latents, up_block_features
from sdzero.correspondence.matching import (
    FeatureMatching,
    FeatureSettings,
)
from sdzero.errors import ConfigError
from sdzero.evaluation import SmokeTest
from sdzero.seeding import keyed_generator
from sdzero.settings import build_settings
from sdzero.tasks.frames import RESAMPLE_FILTERS, ModelFrame

UP_BLOCKS = 4  # up blocks of every SD 1.x/2.x UNet (up_ft_index 0..3)
TRAIN_TIMESTEPS = 1000  # the SD noise schedule's length


@dataclass(frozen=True)
class DIFTSettings(FeatureSettings):
    """Every ``method.*`` key of ``dift``; defaults are the official SPair settings
    (``eval_spair.py`` arguments and ``SDFeaturizer4Eval``)."""

    image_size: int = 768  # side of the square the image is stretched to (official 768 x 768)
    resample: str = "bicubic"  # PIL filter of that resize (bicubic: Image.resize's default)
    timestep: int = 261  # t: the noise level of the latents, 0..999
    up_ft_index: int = 1  # UNet up block read, 0..3 (1: 1/16 of the side, 1280 channels on SD 2.1)
    prompt: str = "a photo of a {category}"  # per-category prompt; "" = the official null prompt
    ensemble_size: int = 8  # noise draws per image, their features averaged
    ensemble_batch: int = 0  # copies per UNet call (0: all of a call's at once); speed only
    match_resolution: str = "image"  # image: argmax pixel of the upsampled maps (official) | cell

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size < 8 or self.image_size % 8:
            raise ConfigError(f"method.image_size must be a multiple of 8, got {self.image_size}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ConfigError(
                f"method.resample must be one of {list(RESAMPLE_FILTERS)}, got {self.resample!r}"
            )
        if not 0 <= self.timestep < TRAIN_TIMESTEPS:
            raise ConfigError(
                f"method.timestep must lie in 0..{TRAIN_TIMESTEPS - 1}, got {self.timestep}"
            )
        if not 0 <= self.up_ft_index < UP_BLOCKS:
            raise ConfigError(
                f"method.up_ft_index must lie in 0..{UP_BLOCKS - 1}, got {self.up_ft_index}"
            )
        try:
            self.prompt.format(category="cat")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"method.prompt={self.prompt!r} must be a text whose only placeholder is "
                f"{{category}} ({type(err).__name__}: {err})"
            ) from err
        if self.ensemble_size < 1:
            raise ConfigError(f"method.ensemble_size must be >= 1, got {self.ensemble_size}")
        if self.ensemble_batch < 0:
            raise ConfigError(
                f"method.ensemble_batch must be >= 0 (0 = all at once), got {self.ensemble_batch}"
            )


def copy_generator(seed: int, name: str, copy: int) -> torch.Generator:
    """The random stream of ensemble copy ``copy`` of the image named ``name`` (CPU): keyed by
    the run seed, the first 63 bits of the name's SHA-256 and the copy index."""
    digest = hashlib.sha256(name.encode()).digest()
    return keyed_generator(int(seed), int.from_bytes(digest[:8], "little") & (2**63 - 1), copy)


class DIFT(FeatureMatching):
    """DIFT on a frozen Stable Diffusion (``backbone``: the ``backbone.*`` keys); ``settings``:
    the keys of :class:`DIFTSettings`."""

    settings_class = DIFTSettings
    non_feature_keys = ("ensemble_batch",)  # it changes no feature
    smoke_test = SmokeTest(
        "demo_dift", ("data.num_pairs=3",), batching=(("method.ensemble_batch=1",),)
    )

    def __init__(self, backbone: dict[str, Any], seed: int = 0, **settings: Any) -> None:
        super().__init__(backbone, seed)
        self.settings = build_settings(DIFTSettings, settings)

    def setup(self, stage: str) -> None:
        """Build the task (under a Trainer) and load the backbone with its text encoder."""
        super().setup(stage)
        self.load_sd(text_encoder=True)

    def frame(self, image: torch.Tensor) -> ModelFrame:
        """The base's model frame, resized with ``method.resample``."""
        return replace(super().frame(image), resample=self.settings.resample)

    @torch.no_grad()
    def features(self, images: torch.Tensor, names: Sequence[str], category: str) -> torch.Tensor:
        """``(B, 3, S, S)`` [0, 1] model-frame images named ``names`` -> ``(B, C, h, w)`` float32
        ensemble-mean up-block features (``h = S / 16`` for ``up_ft_index=1``)."""
        if len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images")
        s = self.settings
        count = s.ensemble_size
        streams = [copy_generator(self.seed, name, k) for name in names for k in range(count)]
        context = self.prompt_embedding(category)
        # image b's copies are rows b*count ...: one encode per image, one sample per copy
        latents = diffused_latents(self.sd, images, s.timestep, generators=streams, copies=count)
        step = s.ensemble_batch or len(latents)
        maps = [
            up_block_features(self.sd, part, s.timestep, context, [s.up_ft_index])[0]
            for part in latents.split(step)
        ]
        feats = torch.cat(maps).float()
        return feats.unflatten(0, (len(images), count)).mean(dim=1)
