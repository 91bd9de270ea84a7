"""Shared setup of the segmentation benchmarks (``bench_segmentation.py``): the OVDiff sizes, the
``seg-infer`` / ``seg-protos`` job settings, random-weight extractors and a device-aware clock."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common import synchronize
from sdzero.backbones.sd import StableDiffusion, load_stable_diffusion
from sdzero.segmentation.features import FeatureExtractor, SDQueryExtractor, build_extractor
from sdzero.segmentation.inference import Segmenter

KMEANS_K = 32
FEATURE_DIM = 7680  # SD 1.5 cross-attention queries of OVDiff's layers
OFFICIAL_SUPPORT = 32  # support images per class in OVDiff: P = 1 + 32 + 32 prototype rows
WINDOW_BATCH = inspect.signature(Segmenter).parameters["window_batch"].default


def clock(fn: Callable[[], Any], device: str | torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall-clock seconds (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


@dataclass
class BuildSetting:
    """Support sets of ``num_support`` images of ``size``², ``steps`` sampling steps, sampled
    ``sample_batch`` at a time, for each of ``classes``."""

    classes: Sequence[str]
    num_support: int
    steps: int
    size: int
    sample_batch: int


@dataclass
class JobSetting:
    """What the ``seg-infer`` / ``seg-protos`` jobs run (see ``bench_segmentation.py``)."""

    arch: str
    vits: tuple[str, ...]  # the dino and clip extractors' names
    image: tuple[int, int]
    short_side: int
    window_sizes: tuple[int, ...]
    stride: int
    sd_input: int
    build: BuildSetting


FULL = JobSetting(
    arch="sd15",
    vits=("dino", "clip"),
    image=(448, 597),
    short_side=448,
    window_sizes=(448, 336),
    stride=224,
    sd_input=512,
    build=BuildSetting(("cat",), num_support=4, steps=4, size=256, sample_batch=4),
)
QUICK = JobSetting(
    arch="tiny",
    vits=("dino:tiny_vit8", "clip:tiny_clip16"),
    image=(96, 128),
    short_side=96,
    window_sizes=(96, 64),
    stride=32,
    sd_input=128,
    build=BuildSetting(("cat",), num_support=4, steps=2, size=64, sample_batch=4),
)


def random_extractors(
    setting: JobSetting, device: str
) -> tuple[StableDiffusion, list[FeatureExtractor]]:
    """Random-weight SD (with its text encoder) and the ``sd``, ``dino`` and ``clip`` extractors."""
    sd = load_stable_diffusion(None, setting.arch, text_encoder=True, device=device)
    extractors: list[FeatureExtractor] = [
        SDQueryExtractor(sd, input_size=setting.sd_input).to(device)
    ]
    extractors += [build_extractor(n, vit_weights="random", device=device) for n in setting.vits]
    return sd, extractors
