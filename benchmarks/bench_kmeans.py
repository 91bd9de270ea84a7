"""k-means: sdzero's torch k-means against scikit-learn's ``KMeans``, speed and inertia.

The reference is OVDiff's call, ``KMeans(n_clusters=32, random_state=0, n_init="auto")`` (greedy
k-means++ on all points, Lloyd to ``tol=1e-4``), always on CPU. Ours runs on the job's device twice:
with k-means++ on all points (sklearn's procedure) and with ``init_sample`` (seeded and converged
on a subsample, then refined on all points). The data is ``feature_mixture``: a 40-component
Gaussian mixture shaped like pooled SD features (7680-d), where seedings end a few percent apart,
so the inertia ratio means something (on uniform noise every clustering scores the same).

    python benchmarks/bench_kmeans.py            # 100k x 7680, K=32: minutes (sklearn)
    python benchmarks/bench_kmeans.py --quick    # 5k x 512: seconds
    python benchmarks/bench_kmeans.py --device cuda

Both libraries use the process's threads (``OMP_NUM_THREADS``); wall-clock seconds. Measured with
2 threads on a shared 2-core VM (approximate): sklearn 66 s (85 iterations; 72 s with one BLAS
thread); ours 15.5 s with k-means++ on all points (inertia 0.991 x sklearn's) and 5.1 s with
``init_sample=24576``, the prototypes' default (0.999 x; 13x faster).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from sdzero.segmentation.kmeans import feature_mixture, kmeans

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Row, timed  # noqa: E402

K = 32
FULL = (100_000, 7680, 24_576)  # points, dim, init_sample (the measured speed option)
QUICK = (5_000, 512, 1_250)
T = TypeVar("T")


def _timed_fit(fit: Callable[[], T], device: str, repeats: int, warmup: int) -> tuple[float, T]:
    """Best seconds of ``fit()`` (see ``timed``) and its last result."""
    out: list[T] = []
    return timed(lambda: out.append(fit()), device, repeats, warmup), out[-1]


def bench(device: str, quick: bool) -> list[Row]:
    """Rows: sklearn (library default BLAS threads, and one BLAS thread), ours with k-means++ on
    all points, ours with ``init_sample``; speed-ups against the faster sklearn."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    n, d, sample = QUICK if quick else FULL
    repeats, warmup = (3, 1) if quick else (1, 0)
    x = feature_mixture(n, d)
    unit = f"fit {n} x {d} float32, K={K}"
    threads = torch.get_num_threads()
    rows, ref_s, ref = [], math.inf, None
    for blas in (None, 1):
        # OpenMP threads for Lloyd either way; BLAS (k-means++) threads: default, or one (on a
        # busy machine, multi-threaded OpenBLAS can spin for most of the fit).
        with threadpool_limits(limits=blas, user_api="blas"):
            fit = KMeans(n_clusters=K, random_state=0, n_init="auto").fit
            sec, est = _timed_fit(partial(fit, x.numpy()), "cpu", repeats, warmup)
        ref_s, ref = min(ref_s, sec), est
        rows.append(
            Row(
                "kmeans",
                unit,
                f"sklearn KMeans (CPU, BLAS threads: {blas or 'default'})",
                sec,
                note=f"inertia {est.inertia_:.6g}, {est.n_iter_} iterations, {threads} threads",
            )
        )
    x = x.to(device)
    for mode, init_sample in (("k-means++ on all points", None), (f"init_sample={sample}", sample)):
        fit = partial(kmeans, x, K, seed=0, init_sample=init_sample)
        sec, result = _timed_fit(fit, device, repeats, warmup)
        iters = f"{result.n_iter} iterations"
        if init_sample:
            iters = f"{result.n_iter_sample} on the subsample + {iters} on all"
        rows.append(
            Row(
                "kmeans",
                unit,
                f"torch, {mode} ({device})",
                sec,
                note=f"inertia {result.inertia:.6g} = {result.inertia / ref.inertia_:.4f} x "
                f"sklearn's, {ref_s / sec:.1f}x faster than sklearn, {iters}",
            )
        )
    return rows


def jobs(quick: bool) -> dict[str, Callable[[str], list[Row]]]:
    """Runner jobs: name -> function of the device string returning table rows."""
    return {"kmeans": partial(bench, quick=quick)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="5k x 512 instead of 100k x 7680")
    args = parser.parse_args()
    for row in bench(args.device, args.quick):
        print(f"{row.mode}: {row.seconds:.2f} s ({row.unit}); {row.note}")


if __name__ == "__main__":
    main()
