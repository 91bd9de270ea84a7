"""Inference time of one test image with the official sliding windows and random prototypes,
against FLOP floors: the ``inference`` part and the ``seg-infer`` job of ``bench_segmentation.py``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import Row, count_flops, measured_peak_flops, timed
from benchmarks.seg_setup import (
    FULL,
    KMEANS_K,
    OFFICIAL_SUPPORT,
    QUICK,
    WINDOW_BATCH,
    clock,
    random_extractors,
)
from sdzero.backbones.attention import AttentionCapture
from sdzero.segmentation.features import FeatureExtractor, SDQueryExtractor
from sdzero.segmentation.inference import (
    PrototypeBank,
    Segmenter,
    resize_short_side,
    sliding_windows,
)
from sdzero.segmentation.prototypes import CLASS_MEAN, IMAGE_MEAN, KMEANS_CENTRE, Prototypes


def random_prototypes(
    name: str, dim: int, seed: int, extractor: str = "sd", grid: tuple[int, int] = (64, 64)
) -> Prototypes:
    """Random prototypes with OVDiff's row layout for 32 support images (P = Q = 65)."""
    gen = torch.Generator().manual_seed(seed)
    rows = 1 + OFFICIAL_SUPPORT + KMEANS_K
    kind = torch.tensor(
        [CLASS_MEAN] + [IMAGE_MEAN] * OFFICIAL_SUPPORT + [KMEANS_CENTRE] * KMEANS_K,
        dtype=torch.int8,
    )
    image = torch.cat([torch.zeros(1), torch.arange(OFFICIAL_SUPPORT), torch.zeros(KMEANS_K)])
    region = torch.ones(rows, *grid, dtype=torch.bool)
    return Prototypes(
        class_name=name,
        extractor=extractor,
        fg=torch.randn(rows, dim, generator=gen),
        bg=torch.randn(rows, dim, generator=gen),
        fg_kind=kind,
        bg_kind=kind.clone(),
        fg_image=image.long(),
        bg_image=image.long(),
        fg_region=region,
        bg_region=region.clone(),
        support=[f"support #{i}" for i in range(OFFICIAL_SUPPORT)],
    )


def random_bank(extractor: FeatureExtractor, classes: int = 3) -> PrototypeBank:
    """Random prototypes of label indices ``1..classes`` (0 is the background)."""
    protos = {
        c: random_prototypes(f"class {c}", extractor.dim, c, extractor.name, (1, 1))
        for c in range(1, classes + 1)
    }
    return PrototypeBank.build(protos)


def random_image(height: int, width: int) -> torch.Tensor:
    """``(3, height, width)`` uint8 noise (the content does not change the work)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)


def _flops_and_seconds(fn: Callable[[], Any], device: str) -> tuple[int, float]:
    """FLOPs of ``fn()`` (counted on a first, warm-up call) and the seconds of a second call."""
    flops = count_flops(fn)
    _, sec = clock(fn, device)
    return int(flops), sec


def bench_inference(extractor: SDQueryExtractor, args: argparse.Namespace) -> dict:
    height, width = args.image_size
    image = random_image(height, width)
    work_h, work_w = resize_short_side(image, args.short_side).shape[1:]
    windows = sliding_windows(work_h, work_w, args.window_sizes, args.stride)
    banks = [
        PrototypeBank.build(
            {c: random_prototypes(f"class {c}", extractor.dim, c) for c in (1, 2, 3)}
        )
    ]
    segmenter = Segmenter(
        [extractor],
        banks,
        num_classes=4,
        background_index=0,
        window_sizes=args.window_sizes,
        stride=args.stride,
        short_side=args.short_side,
        window_batch=args.window_batch,
        device=args.device,
    )
    out: dict[str, Any] = {
        "image": [height, width],
        "working_frame": [int(work_h), int(work_w)],
        "window_sizes": list(args.window_sizes),
        "stride": args.stride,
        "windows": len(windows),
        "window_batch": args.window_batch,
        "sd_input": extractor.input_size,
        "classes": 3,
    }
    # One window at the SD input size: the whole extractor, then the truncated UNet alone.
    size = extractor.input_size
    one = torch.rand(1, 3, size, size, device=args.device)
    out["extractor_gflop"], out["extractor_pass_s"] = _flops_and_seconds(
        lambda: extractor(one), args.device
    )
    latent = torch.randn(1, 4, size // 8, size // 8, device=args.device)
    t = torch.tensor(extractor.timestep, device=args.device)
    context = extractor.empty_prompt

    def unet_pass() -> None:
        with (
            torch.no_grad(),
            AttentionCapture(
                extractor.sd.unet, extractor.layers, probs=False, queries=True, truncate=True
            ) as cap,
        ):
            cap(latent, t, context)

    out["unet_gflop"], out["unet_pass_s"] = _flops_and_seconds(unet_pass, args.device)
    out["extractor_gflop"] /= 1e9
    out["unet_gflop"] /= 1e9
    _, out["image_s"] = clock(lambda: segmenter(image), args.device)
    out["floor_unet_s"] = len(windows) * out["unet_pass_s"]
    out["floor_extractor_s"] = len(windows) * out["extractor_pass_s"]
    out["image_gflop"] = len(windows) * out["extractor_gflop"]
    out["achieved_gflops_per_s"] = out["image_gflop"] / out["image_s"]
    return out


def job_infer(device: str, quick: bool = False) -> list[Row]:
    """Seconds per test image with ``window_batch=1`` and the default, FLOPs and floor."""
    setting = QUICK if quick else FULL
    _, extractors = random_extractors(setting, device)
    banks = [random_bank(e) for e in extractors]
    image = random_image(*setting.image)
    work = resize_short_side(image, setting.short_side).shape[1:]
    windows = sliding_windows(*work, setting.window_sizes, setting.stride)
    peaks = [measured_peak_flops(device)]
    names = "+".join(e.name for e in extractors)
    unit = (
        f"test image {setting.image[0]}x{setting.image[1]} ({len(windows)} windows of "
        f"{'/'.join(map(str, setting.window_sizes))} + full, {names}, sd at {setting.sd_input}²)"
    )
    timings, flops = [], None
    for batch in (1, WINDOW_BATCH):
        segment = Segmenter(
            extractors,
            banks,
            4,
            window_sizes=setting.window_sizes,
            stride=setting.stride,
            short_side=setting.short_side,
            window_batch=batch,
            device=device,
        )
        if flops is None:  # the same arithmetic for every batch size; also the warm-up
            flops = count_flops(lambda s=segment: s(image))
        seconds = timed(lambda s=segment: s(image), device, repeats=3 if quick else 1, warmup=0)
        timings.append((batch, seconds))
        peaks.append(measured_peak_flops(device))
    # The best peak rate seen around the timings: on a shared machine one measurement may be
    # taken while others compute, which would inflate the floor.
    peak = max(peaks)
    floor = flops / peak
    return [
        Row(
            "segmentation",
            unit,
            f"window_batch={batch}",
            seconds,
            flops,
            f"random weights ({setting.arch}), 3 classes x 65 FG/BG prototypes, no CLIP filter; "
            f"floor {floor:.2f} s ({100 * floor / seconds:.0f}% of time) at {peak / 1e9:.0f} "
            "GFLOP/s peak",
        )
        for batch, seconds in timings
    ]
