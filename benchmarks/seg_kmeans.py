"""The ``kmeans`` part of ``bench_segmentation.py``: ``sdzero.segmentation.kmeans.kmeans`` against
scikit-learn's ``KMeans`` on the same random data (see that module's docstring)."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.seg_setup import KMEANS_K, clock
from sdzero.segmentation.kmeans import kmeans


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
    ours, out["ours_s"] = clock(lambda: kmeans(x_dev, KMEANS_K, n_init="auto", seed=0), args.device)
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
            _, out["sklearn_s"] = clock(lambda: ref.fit(array), "cpu")
        out["sklearn_iter"], out["sklearn_inertia"] = int(ref.n_iter_), float(ref.inertia_)
        out["speedup"] = out["sklearn_s"] / out["ours_s"]
        out["inertia_ratio"] = out["ours_inertia"] / out["sklearn_inertia"]
    return out
