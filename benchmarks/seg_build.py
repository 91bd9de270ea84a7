"""Prototype build time per class through ``build_prototypes`` (no cache), broken down into support
sampling, extractor features and prototypes: the ``build`` part and the ``seg-protos`` job of
``bench_segmentation.py``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

import sdzero.segmentation.prototypes as prototypes_module
from benchmarks.common import Row, synchronize
from benchmarks.seg_setup import FULL, QUICK, BuildSetting, clock, random_extractors
from sdzero.backbones.sd import StableDiffusion
from sdzero.segmentation.features import FeatureExtractor
from sdzero.segmentation.kmeans import kmeans
from sdzero.segmentation.prototypes import build_prototypes
from sdzero.segmentation.support import GeneratedSupport, sample_support_set


class _TimedSupport:
    """A support source that adds the seconds each ``__call__`` takes to ``seconds``."""

    def __init__(self, source: GeneratedSupport, device: str) -> None:
        self.source = source
        self.device = device
        self.seconds = 0.0

    def settings(self, name: str) -> dict[str, Any]:
        return self.source.settings(name)

    def __call__(self, name: str):
        support, sec = clock(lambda: self.source(name), self.device)
        self.seconds += sec
        return support


class _ForwardTimer:
    """Adds the seconds of every forward of ``modules`` to ``seconds`` (forward hooks)."""

    def __init__(self, modules: Sequence[torch.nn.Module], device: str) -> None:
        self.device = device
        self.seconds = 0.0
        self._start = 0.0
        self._handles = []
        for module in modules:
            self._handles += [
                module.register_forward_pre_hook(self._pre),
                module.register_forward_hook(self._post),
            ]

    def _pre(self, *_: Any) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def bench_build(
    sd: StableDiffusion, extractors: Sequence[FeatureExtractor], setting: BuildSetting, device: str
) -> dict:
    """Seconds per class of ``build_prototypes`` (``attention`` masks, no cache), broken down."""
    source = GeneratedSupport(
        sd,
        None,
        num_support=setting.num_support,
        steps=setting.steps,
        size=setting.size,
        batch_size=setting.sample_batch,
    )
    timed_support = _TimedSupport(source, device)
    feature_timer = _ForwardTimer(extractors, device)
    kmeans_seconds = [0.0]

    def timed_kmeans(*a: Any, **kw: Any):
        result, sec = clock(lambda: kmeans(*a, **kw), device)
        kmeans_seconds[0] += sec
        return result

    prototypes_module.kmeans = timed_kmeans  # build_prototypes -> _side -> kmeans, timed
    try:
        built, total = clock(
            lambda: build_prototypes(
                list(setting.classes), extractors, timed_support, "attention", cache=None
            ),
            device,
        )
    finally:
        prototypes_module.kmeans = kmeans
        feature_timer.remove()
    n = len(setting.classes)
    protos = built[setting.classes[0]][extractors[0].name]
    return {
        "classes": list(setting.classes),
        "extractors": [e.name for e in extractors],
        "size": setting.size,
        "num_support": setting.num_support,
        "steps": setting.steps,
        "sample_batch": setting.sample_batch,
        "mask_proposer": "attention",
        "fg_rows": int(protos.fg.shape[0]),
        "bg_rows": int(protos.bg.shape[0]),
        "grid": list(protos.fg_region.shape[1:]),
        "total_s": total / n,
        "support_s": timed_support.seconds / n,
        "features_s": feature_timer.seconds / n,
        "prototypes_s": (total - timed_support.seconds - feature_timer.seconds) / n,
        "kmeans_s": kmeans_seconds[0] / n,
        "support_per_image_s": timed_support.seconds / n / setting.num_support,
        "features_per_image_s": feature_timer.seconds / n / setting.num_support,
    }


def job_protos(device: str, quick: bool = False) -> list[Row]:
    """Prototype build seconds per class, support images sampled one at a time and batched."""
    setting = QUICK if quick else FULL
    sd, extractors = random_extractors(setting, device)
    b = setting.build
    # Warm-up: one-off costs (allocator, kernel selection) should not land on the first mode.
    sample_support_set(sd, "dog", num_support=1, steps=1, size=b.size)
    for extractor in extractors:
        extractor(torch.rand(1, 3, b.size, b.size, device=device))
    rows = []
    for batch in (1, b.sample_batch):
        r = bench_build(sd, extractors, BuildSetting(**{**vars(b), "sample_batch": batch}), device)
        rows.append(
            Row(
                "segmentation",
                f"prototype build per class ({b.num_support} support images of {b.size}², "
                f"{b.steps} steps, attention masks, {'+'.join(r['extractors'])})",
                f"sample_batch={batch}",
                r["total_s"],
                None,
                f"random weights ({setting.arch}); sampling {r['support_s']:.2f} s, features "
                f"{r['features_s']:.2f} s, masks + means + k-means {r['prototypes_s']:.2f} s "
                f"(k-means {r['kmeans_s']:.2f} s)",
            )
        )
    return rows
