"""Speed of OVDiff segmentation on the real SD 1.5 architecture (random weights), and of k-means.

Measures three things:

1. k-means: ``sdzero.segmentation.kmeans.kmeans`` against scikit-learn's
   ``KMeans(n_clusters=32, random_state=0, n_init="auto")`` (what the official prototypes use) on
   the same random data (``--kmeans-points`` x 7680 float32, OVDiff's SD feature size): seconds,
   Lloyd iterations, speed-up and the inertia ratio ours / sklearn's. sklearn runs with its
   OpenMP threads but, by default, one BLAS thread (``--sklearn-blas-threads 0``: the library
   default): on a busy 2-core VM, OpenBLAS with 2 threads made the same 2000-point fit take
   135 s instead of 0.7 s, which measures thread contention, not k-means.
2. Prototype build time per class through ``build_prototypes`` (no cache), with generated support
   sets at a reduced resolution (``--size``), number of images (``--num-support``) and sampling
   steps (``--steps``), the ``attention`` mask proposer and the ``sd`` extractor, broken down into
   support sampling (SD pipeline + attribution maps), SD query features of the support images, and
   prototypes (masks, means and k-means; k-means also on its own).
3. Inference time of one synthetic image (``--image-size``, resized to ``--short-side`` as the
   official ``predict.py``) with the official sliding windows, the ``sd`` extractor and random
   prototypes of 3 classes (skipping the build), against a floor: number of windows x one
   extractor pass (VAE encode + UNet truncated after the last read layer) at the SD input size,
   and x the truncated UNet pass alone. FLOPs of one pass are counted with
   ``torch.utils.flop_counter`` (matmuls, convolutions and attention).

    python benchmarks/bench_segmentation.py                     # the defaults: ~10 min, 2 CPU cores
    python benchmarks/bench_segmentation.py --kmeans-points 100000 --device cuda
    python benchmarks/bench_segmentation.py --size 128 --kmeans-points 2000 --sd-input 256  # smoke

Numbers are wall-clock seconds on whatever machine runs it (CPU by default, --device cuda);
random weights make every segmentation output meaningless, but not the time it takes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import sdzero.segmentation.prototypes as prototypes_module
from sdzero.backbones.attention import AttentionCapture
from sdzero.backbones.sd import load_stable_diffusion
from sdzero.segmentation.features import SDQueryExtractor
from sdzero.segmentation.inference import (
    PrototypeBank,
    Segmenter,
    resize_short_side,
    sliding_windows,
)
from sdzero.segmentation.kmeans import kmeans
from sdzero.segmentation.prototypes import (
    CLASS_MEAN,
    IMAGE_MEAN,
    KMEANS_CENTRE,
    Prototypes,
    build_prototypes,
)
from sdzero.segmentation.support import GeneratedSupport

KMEANS_K = 32
FEATURE_DIM = 7680  # SD 1.5 cross-attention queries of OVDiff's layers
OFFICIAL_SUPPORT = 32  # support images per class in OVDiff: P = 1 + 32 + 32 prototype rows


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _clock(fn: Callable[[], Any], device: str | torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall-clock seconds (device work included)."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


# ------------------------------------------------------------------------------------- k-means
def kmeans_data(points: int, dim: int, kind: str, seed: int = 0) -> torch.Tensor:
    """``(points, dim)`` float32: iid N(0, 1) (``normal``) or 64 Gaussian blobs (``blobs``)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(points, dim, generator=gen)
    centres = 3 * torch.randn(64, dim, generator=gen)
    owner = torch.randint(64, (points,), generator=gen)
    return centres[owner] + torch.randn(points, dim, generator=gen)


def bench_kmeans(args: argparse.Namespace) -> dict:
    x = kmeans_data(args.kmeans_points, args.kmeans_dim, args.kmeans_data)
    out: dict[str, Any] = {
        "points": args.kmeans_points,
        "dim": args.kmeans_dim,
        "k": KMEANS_K,
        "data": args.kmeans_data,
    }
    x_dev = x.to(args.device)
    ours, out["ours_s"] = _clock(
        lambda: kmeans(x_dev, KMEANS_K, n_init="auto", seed=0), args.device
    )
    out["ours_iter"], out["ours_inertia"] = ours.n_iter, ours.inertia
    x_dev = ours = None  # free device memory before sklearn runs
    if not args.skip_sklearn:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        array = x.numpy()
        ref = KMeans(n_clusters=KMEANS_K, random_state=0, n_init="auto")
        blas = args.sklearn_blas_threads
        out["sklearn_blas_threads"] = blas if blas > 0 else "default"
        with threadpool_limits(limits=blas if blas > 0 else None, user_api="blas"):
            _, out["sklearn_s"] = _clock(lambda: ref.fit(array), "cpu")
        out["sklearn_iter"], out["sklearn_inertia"] = int(ref.n_iter_), float(ref.inertia_)
        out["speedup"] = out["sklearn_s"] / out["ours_s"]
        out["inertia_ratio"] = out["ours_inertia"] / out["sklearn_inertia"]
    return out


# ---------------------------------------------------------------------------- prototype build
class _TimedSupport:
    """A support source that adds the seconds each ``__call__`` takes to ``seconds``."""

    def __init__(self, source: GeneratedSupport, device: str) -> None:
        self.source = source
        self.device = device
        self.seconds = 0.0

    def settings(self, name: str) -> dict[str, Any]:
        return self.source.settings(name)

    def __call__(self, name: str):
        support, sec = _clock(lambda: self.source(name), self.device)
        self.seconds += sec
        return support


class _ForwardTimer:
    """Adds the seconds of every forward of ``module`` to ``seconds`` (forward hooks)."""

    def __init__(self, module: torch.nn.Module, device: str) -> None:
        self.device = device
        self.seconds = 0.0
        self._start = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, *_: Any) -> None:
        _sync(self.device)
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        _sync(self.device)
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def bench_build(sd, extractor: SDQueryExtractor, args: argparse.Namespace) -> dict:
    source = GeneratedSupport(
        sd, None, num_support=args.num_support, steps=args.steps, size=args.size
    )
    timed_support = _TimedSupport(source, args.device)
    feature_timer = _ForwardTimer(extractor, args.device)
    kmeans_seconds = [0.0]

    def timed_kmeans(*a: Any, **kw: Any):
        result, sec = _clock(lambda: kmeans(*a, **kw), args.device)
        kmeans_seconds[0] += sec
        return result

    prototypes_module.kmeans = timed_kmeans  # build_prototypes -> _side -> kmeans, timed
    try:
        built, total = _clock(
            lambda: build_prototypes(
                args.classes, [extractor], timed_support, "attention", cache=None
            ),
            args.device,
        )
    finally:
        prototypes_module.kmeans = kmeans
        feature_timer.remove()
    n = len(args.classes)
    protos = built[args.classes[0]]["sd"]
    return {
        "classes": list(args.classes),
        "size": args.size,
        "num_support": args.num_support,
        "steps": args.steps,
        "mask_proposer": "attention",
        "fg_rows": int(protos.fg.shape[0]),
        "bg_rows": int(protos.bg.shape[0]),
        "grid": list(protos.fg_region.shape[1:]),
        "total_s": total / n,
        "support_s": timed_support.seconds / n,
        "features_s": feature_timer.seconds / n,
        "prototypes_s": (total - timed_support.seconds - feature_timer.seconds) / n,
        "kmeans_s": kmeans_seconds[0] / n,
        "support_per_image_s": timed_support.seconds / n / args.num_support,
        "features_per_image_s": feature_timer.seconds / n / args.num_support,
    }


# -------------------------------------------------------------------------------- inference
def random_prototypes(name: str, dim: int, seed: int) -> Prototypes:
    """Random prototypes with OVDiff's row layout for 32 support images (P = Q = 65)."""
    gen = torch.Generator().manual_seed(seed)
    rows = 1 + OFFICIAL_SUPPORT + KMEANS_K
    kind = torch.tensor(
        [CLASS_MEAN] + [IMAGE_MEAN] * OFFICIAL_SUPPORT + [KMEANS_CENTRE] * KMEANS_K,
        dtype=torch.int8,
    )
    image = torch.cat([torch.zeros(1), torch.arange(OFFICIAL_SUPPORT), torch.zeros(KMEANS_K)])
    region = torch.ones(rows, 64, 64, dtype=torch.bool)
    return Prototypes(
        class_name=name,
        extractor="sd",
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


def _flops_and_seconds(fn: Callable[[], Any], device: str) -> tuple[int, float]:
    """FLOPs of ``fn()`` (counted on a first, warm-up call) and the seconds of a second call."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    _, sec = _clock(fn, device)
    return counter.get_total_flops(), sec


def bench_inference(extractor: SDQueryExtractor, args: argparse.Namespace) -> dict:
    height, width = args.image_size
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)
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
        device=args.device,
    )
    out: dict[str, Any] = {
        "image": [height, width],
        "working_frame": [int(work_h), int(work_w)],
        "window_sizes": list(args.window_sizes),
        "stride": args.stride,
        "windows": len(windows),
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
    _, out["image_s"] = _clock(lambda: segmenter(image), args.device)
    out["floor_unet_s"] = len(windows) * out["unet_pass_s"]
    out["floor_extractor_s"] = len(windows) * out["extractor_pass_s"]
    out["image_gflop"] = len(windows) * out["extractor_gflop"]
    out["achieved_gflops_per_s"] = out["image_gflop"] / out["image_s"]
    return out


# ------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--parts", nargs="+", default=["kmeans", "build", "inference"])
    parser.add_argument("--kmeans-points", type=int, default=20_000)
    parser.add_argument("--kmeans-dim", type=int, default=FEATURE_DIM)
    parser.add_argument("--kmeans-data", choices=["normal", "blobs"], default="normal")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument(
        "--sklearn-blas-threads",
        type=int,
        default=1,
        help="BLAS threads for sklearn (0: library default; see the module docstring)",
    )
    parser.add_argument("--classes", nargs="+", default=["cat"])
    parser.add_argument("--size", type=int, default=256, help="support image side (OVDiff: 512)")
    parser.add_argument("--num-support", type=int, default=4, help="OVDiff: 32")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (OVDiff: 30)")
    parser.add_argument("--image-size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"))
    parser.add_argument("--short-side", type=int, default=448)
    parser.add_argument("--window-sizes", type=int, nargs="+", default=[448, 336])
    parser.add_argument("--stride", type=int, default=224)
    parser.add_argument(
        "--sd-input", type=int, default=512, help="side windows are resized to (OVDiff: 512)"
    )
    args = parser.parse_args()
    unknown = set(args.parts) - {"kmeans", "build", "inference"}
    if unknown:
        parser.error(f"unknown --parts {sorted(unknown)}; choose from kmeans, build, inference")

    result: dict[str, Any] = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_avg_start": os.getloadavg()[0],
    }
    if "kmeans" in args.parts:
        result["kmeans"] = bench_kmeans(args)
    if "build" in args.parts or "inference" in args.parts:
        sd = load_stable_diffusion(None, args.arch, text_encoder=True, device=args.device)
        extractor = SDQueryExtractor(sd, input_size=args.sd_input).to(args.device)
        result["arch"] = sd.arch
        result["feature_dim"] = extractor.dim
        if "build" in args.parts:
            result["build"] = bench_build(sd, extractor, args)
        if "inference" in args.parts:
            result["inference"] = bench_inference(extractor, args)
    result["load_avg_end"] = os.getloadavg()[0]
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result, indent=1))
    print_table(result)


def print_table(result: dict) -> None:
    print(f"\n{result['device']}, {result['threads']} threads, random SD weights")
    busy = result["load_avg_start"]  # the end value counts this benchmark itself
    if busy > 0.5 * (result["cpus"] or 1):
        print(
            f"WARNING: the machine was busy before the start (1-min load average {busy:.1f} on "
            f"{result['cpus']} CPUs): these timings may be inflated"
        )
    print("\n| part | measure | seconds | notes |")
    print("|---|---|---|---|")
    km = result.get("kmeans")
    if km:
        data = f"{km['points']}x{km['dim']} {km['data']}, K={km['k']}"
        print(f"| k-means | ours | {km['ours_s']:.2f} | {data}, {km['ours_iter']} iterations |")
        if "sklearn_s" in km:
            print(
                f"| k-means | sklearn | {km['sklearn_s']:.2f} | {km['sklearn_iter']} iterations, "
                f"BLAS threads {km['sklearn_blas_threads']}; "
                f"speed-up {km['speedup']:.2f}x, inertia ours/sklearn {km['inertia_ratio']:.4f} |"
            )
    b = result.get("build")
    if b:
        setup = f"{b['num_support']} images of {b['size']}², {b['steps']} steps"
        print(f"| build / class | support sampling | {b['support_s']:.2f} | {setup} |")
        print(
            f"| build / class | SD query features | {b['features_s']:.2f} | "
            f"{b['features_per_image_s']:.2f} s per image, grid {b['grid'][0]}x{b['grid'][1]} |"
        )
        print(
            f"| build / class | prototypes | {b['prototypes_s']:.2f} | of which k-means "
            f"{b['kmeans_s']:.2f} (P={b['fg_rows']}, Q={b['bg_rows']}) |"
        )
        print(f"| build / class | total | {b['total_s']:.2f} | `attention` masks |")
    i = result.get("inference")
    if i:
        frame = f"{i['working_frame'][0]}x{i['working_frame'][1]}"
        print(
            f"| inference / image | total | {i['image_s']:.2f} | {i['windows']} windows on "
            f"{frame}, each at {i['sd_input']}², {i['classes']} classes |"
        )
        print(
            f"| inference / image | floor: windows x extractor pass | "
            f"{i['floor_extractor_s']:.2f} | {i['extractor_pass_s']:.2f} s, "
            f"{i['extractor_gflop']:.0f} GFLOP per pass (VAE encode + truncated UNet) |"
        )
        print(
            f"| inference / image | floor: windows x truncated UNet | {i['floor_unet_s']:.2f} | "
            f"{i['unet_pass_s']:.2f} s, {i['unet_gflop']:.0f} GFLOP per pass; achieved "
            f"{i['achieved_gflops_per_s']:.0f} GFLOP/s over the image |"
        )


if __name__ == "__main__":
    main()
