"""Speed of OVDiff segmentation on the real SD 1.5 architecture (random weights), and of k-means.

Benchmark-runner jobs (``jobs(quick)``, see ``common.py``), one row per mode:

- ``seg-infer``: seconds per test image (448x597, LANCZOS-resized to a short side of 448; the
  official sliding windows: 2 windows of 448², 6 of 336² and the full image) through the official
  extractors ``sd`` (queries of 9 cross-attention layers, windows at 512²), ``dino`` (ViT-B/8
  keys) and ``clip`` (ViT-B/16 keys at 448²), all with random weights, and random prototypes of 3
  classes (65 FG and 65 BG rows each, as 32 support images give; no CLIP class filter), once with
  ``window_batch=1`` (one window per forward call) and once with the default ``window_batch``.
  FLOPs are those of one image (convolutions, matmuls and attention, counted with SDPA as its math
  decomposition); the floor is FLOPs / the device's measured peak (best of a matmul and a 3x3 conv).
- ``seg-protos``: prototype build seconds per class through ``build_prototypes`` (no cache) at a
  reduced setting (4 support images of 256², 4 DPM-Solver steps, ``attention`` masks, the three
  extractors, k-means K=32), with support images sampled one at a time and all 4 in one batch.

``quick=True`` runs both on the ``tiny`` architecture and tiny ViTs (96x128 image, 96/64 windows,
64 px support images) in seconds, to check that they work.

The command line runs those jobs (``--jobs``), or the older parts (``--parts``):

1. k-means: ``sdzero.segmentation.kmeans.kmeans`` against scikit-learn's
   ``KMeans(n_clusters=32, random_state=0, n_init="auto")`` (what the official prototypes use) on
   the same random data (``--kmeans-points`` x 7680 float32, OVDiff's SD feature size): seconds,
   Lloyd iterations, speed-up and the inertia ratio ours / sklearn's. sklearn runs with its
   OpenMP threads but, by default, one BLAS thread (``--sklearn-blas-threads 0``: the library
   default): on a busy 2-core VM, OpenBLAS with 2 threads made the same 2000-point fit take
   135 s instead of 0.7 s, which measures thread contention, not k-means.
2. Prototype build time per class through ``build_prototypes`` (no cache), with generated support
   sets at a reduced resolution (``--size``), number of images (``--num-support``) and sampling
   steps (``--steps``), ``--sample-batch`` images per sampling call, the ``attention`` mask
   proposer and the ``sd`` extractor, broken down into support sampling (SD pipeline + attribution
   maps), SD query features of the support images, and prototypes (masks, means and k-means;
   k-means also on its own).
3. Inference time of one synthetic image (``--image-size``, resized to ``--short-side`` as the
   official ``predict.py``) with the official sliding windows (``--window-batch`` per forward
   call), the ``sd`` extractor and random prototypes of 3 classes (skipping the build), against a
   floor: number of windows x one extractor pass (VAE encode + UNet truncated after the last read
   layer) at the SD input size, and x the truncated UNet pass alone. FLOPs of one pass are counted
   with ``torch.utils.flop_counter`` (matmuls, convolutions and attention).

    python benchmarks/bench_segmentation.py --jobs seg-infer seg-protos --quick   # seconds
    python benchmarks/bench_segmentation.py --jobs seg-infer        # ~10 min on 2 CPU cores
    python benchmarks/bench_segmentation.py                     # the parts: ~10 min, 2 CPU cores
    python benchmarks/bench_segmentation.py --kmeans-points 100000 --device cuda
    python benchmarks/bench_segmentation.py --size 128 --kmeans-points 2000 --sd-input 256  # smoke

Numbers are wall-clock seconds on whatever machine runs it (CPU by default, --device cuda);
random weights make every segmentation output meaningless, but not the time it takes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

import sdzero.segmentation.prototypes as prototypes_module
from sdzero.backbones.attention import AttentionCapture
from sdzero.backbones.sd import StableDiffusion, load_stable_diffusion
from sdzero.segmentation.features import FeatureExtractor, SDQueryExtractor, build_extractor
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
from sdzero.segmentation.support import GeneratedSupport, sample_support_set

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Row,
    count_flops,
    measured_peak_flops,
    synchronize,
    timed,
)

KMEANS_K = 32
FEATURE_DIM = 7680  # SD 1.5 cross-attention queries of OVDiff's layers
OFFICIAL_SUPPORT = 32  # support images per class in OVDiff: P = 1 + 32 + 32 prototype rows
WINDOW_BATCH = inspect.signature(Segmenter).parameters["window_batch"].default


def _clock(fn: Callable[[], Any], device: str | torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall-clock seconds (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
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


@dataclass
class BuildSetting:
    """Support sets of ``num_support`` images of ``size``², ``steps`` sampling steps, sampled
    ``sample_batch`` at a time, for each of ``classes``."""

    classes: Sequence[str]
    num_support: int
    steps: int
    size: int
    sample_batch: int


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
        result, sec = _clock(lambda: kmeans(*a, **kw), device)
        kmeans_seconds[0] += sec
        return result

    prototypes_module.kmeans = timed_kmeans  # build_prototypes -> _side -> kmeans, timed
    try:
        built, total = _clock(
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


# -------------------------------------------------------------------------------- inference
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
    _, sec = _clock(fn, device)
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
    _, out["image_s"] = _clock(lambda: segmenter(image), args.device)
    out["floor_unet_s"] = len(windows) * out["unet_pass_s"]
    out["floor_extractor_s"] = len(windows) * out["extractor_pass_s"]
    out["image_gflop"] = len(windows) * out["extractor_gflop"]
    out["achieved_gflops_per_s"] = out["image_gflop"] / out["image_s"]
    return out


# ------------------------------------------------------------------------------ runner jobs
@dataclass
class JobSetting:
    """What the ``seg-infer`` / ``seg-protos`` jobs run (see the module docstring)."""

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


def _extractors(setting: JobSetting, device: str) -> tuple[StableDiffusion, list[FeatureExtractor]]:
    """Random-weight SD (with its text encoder) and the ``sd``, ``dino`` and ``clip`` extractors."""
    sd = load_stable_diffusion(None, setting.arch, text_encoder=True, device=device)
    extractors: list[FeatureExtractor] = [
        SDQueryExtractor(sd, input_size=setting.sd_input).to(device)
    ]
    extractors += [build_extractor(n, vit_weights="random", device=device) for n in setting.vits]
    return sd, extractors


def job_infer(device: str, quick: bool = False) -> list[Row]:
    """Seconds per test image with ``window_batch=1`` and the default, FLOPs and floor."""
    setting = QUICK if quick else FULL
    _, extractors = _extractors(setting, device)
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


def job_protos(device: str, quick: bool = False) -> list[Row]:
    """Prototype build seconds per class, support images sampled one at a time and batched."""
    setting = QUICK if quick else FULL
    sd, extractors = _extractors(setting, device)
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


def jobs(quick: bool) -> dict[str, Callable[[str], list[Row]]]:
    """Runner jobs: name -> function of the device string returning table rows."""
    return {
        "seg-infer": partial(job_infer, quick=quick),
        "seg-protos": partial(job_protos, quick=quick),
    }


# ------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--jobs", nargs="+", help="run these runner jobs (seg-infer, seg-protos) instead of parts"
    )
    parser.add_argument("--quick", action="store_true", help="--jobs: the tiny quick settings")
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
    parser.add_argument("--sample-batch", type=int, default=8, help="support images per call")
    parser.add_argument("--image-size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"))
    parser.add_argument("--short-side", type=int, default=448)
    parser.add_argument("--window-sizes", type=int, nargs="+", default=[448, 336])
    parser.add_argument("--stride", type=int, default=224)
    parser.add_argument(
        "--window-batch", type=int, default=WINDOW_BATCH, help="windows per extractor call"
    )
    parser.add_argument(
        "--sd-input", type=int, default=512, help="side windows are resized to (OVDiff: 512)"
    )
    args = parser.parse_args()
    if args.jobs:
        available = jobs(args.quick)
        unknown = set(args.jobs) - set(available)
        if unknown:
            parser.error(f"unknown --jobs {sorted(unknown)}; choose from {sorted(available)}")
        print_rows([row for name in args.jobs for row in available[name](args.device)])
        return
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
            setting = BuildSetting(
                args.classes, args.num_support, args.steps, args.size, args.sample_batch
            )
            result["build"] = bench_build(sd, [extractor], setting, args.device)
        if "inference" in args.parts:
            result["inference"] = bench_inference(extractor, args)
    result["load_avg_end"] = os.getloadavg()[0]
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result, indent=1))
    print_table(result)


def print_rows(rows: Sequence[Row]) -> None:
    """The rows as JSON lines, then as a markdown table."""
    for row in rows:
        print(json.dumps(row.to_json()))
    print(f"\n{torch.get_num_threads()} threads, 1-min load average {os.getloadavg()[0]:.1f}")
    print("\n| unit | mode | seconds | GFLOP | note |")
    print("|---|---|---|---|---|")
    for r in rows:
        gflop = f"{r.flops / 1e9:.0f}" if r.flops is not None else ""
        print(f"| {r.unit} | {r.mode} | {r.seconds:.2f} | {gflop} | {r.note} |")


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
