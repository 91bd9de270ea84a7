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

The stages live in ``seg_kmeans.py``, ``seg_build.py`` (prototype build, ``seg-protos``) and
``seg_inference.py`` (``seg-infer``), their shared settings in ``seg_setup.py``; this module
holds the job list, the command line and its tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from sdzero.backbones.sd import load_stable_diffusion
from sdzero.segmentation.features import SDQueryExtractor

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Row  # noqa: E402
from benchmarks.seg_build import bench_build, job_protos  # noqa: E402
from benchmarks.seg_inference import bench_inference, job_infer  # noqa: E402
from benchmarks.seg_kmeans import bench_kmeans  # noqa: E402
from benchmarks.seg_setup import FEATURE_DIM, WINDOW_BATCH, BuildSetting  # noqa: E402


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
