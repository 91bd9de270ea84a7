"""Shared pieces of the benchmark runner: result rows, timing, FLOP counting, device peaks.

Every benchmark module exposes ``jobs(quick: bool) -> dict[str, Callable[[str], list[Row]]]``: job
name -> function of the device string (``"cpu"``/``"cuda"``) returning table rows. ``run.py`` runs
each job in its own process, so the peak memory it reports belongs to that job alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class Row:
    """One line of the table. ``flops``: FLOPs of one timed unit (None if not counted)."""

    section: str  # "correspondence" | "segmentation" | "kmeans"
    unit: str  # e.g. "optimisation step, 512 px"
    mode: str  # e.g. "exact", "bf16 autocast", "sklearn"
    seconds: float
    flops: float | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str = "cpu", repeats: int = 1, warmup: int = 1) -> float:
    """Best wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one ``fn()`` call as torch's ``FlopCounterMode`` counts them (matmuls, convs,
    attention; elementwise work is not counted, so the floor derived from it is a lower bound).

    The fused CPU kernels of SDPA and ``nn.MultiheadAttention``'s fast path are invisible to the
    counter, so the call runs with SDPA's math decomposition and without that fast path (the same
    arithmetic; only for counting)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        counter = FlopCounterMode(display=False)
        with sdpa_kernel([SDPBackend.MATH]), counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return float(counter.get_total_flops())


# Dense peak FLOP/s per GPU name fragment: (fp32 non-tensor, tf32, bf16/fp16 tensor), no sparsity.
GPU_PEAKS: dict[str, tuple[float, float, float]] = {
    "H200": (67e12, 494.7e12, 989.4e12),
    "H100": (67e12, 494.7e12, 989.4e12),  # SXM; PCIe is lower (51 / 378 / 756)
    "A100": (19.5e12, 156e12, 312e12),
    "L40S": (91.6e12, 183e12, 362e12),
    "A10": (31.2e12, 62.5e12, 125e12),
    "4090": (82.6e12, 82.6e12, 165.2e12),
}


def gpu_peak(dtype: torch.dtype = torch.float32) -> float | None:
    """The current CUDA device's datasheet peak for ``dtype`` (fp32 counts TF32 if it is enabled)."""
    name = torch.cuda.get_device_name()
    for key, (fp32, tf32, half) in GPU_PEAKS.items():
        if key in name:
            if dtype in (torch.float16, torch.bfloat16):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def measured_matmul_flops(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Achieved FLOP/s of a large square matmul."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = timed(lambda: a @ b, device, repeats=3)
    return 2 * n**3 / sec


def measured_conv_flops(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Achieved FLOP/s of a UNet-sized 3x3 convolution (640 channels at 32x32, batch 4): on CPUs
    the convolution library can run at twice the matmul's rate (AMD EPYC here: ~460 vs ~210)."""
    x = torch.randn(4, 640, 32, 32, device=device, dtype=dtype)
    w = torch.randn(640, 640, 3, 3, device=device, dtype=dtype)
    sec = timed(lambda: torch.nn.functional.conv2d(x, w, padding=1), device, repeats=3)
    return 2 * 4 * 640 * 640 * 9 * 32 * 32 / sec


def measured_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """The practical peak a floor is computed against: the better of a large matmul and a
    UNet-sized convolution, in ``dtype``."""
    return max(measured_matmul_flops(device, dtype), measured_conv_flops(device, dtype))
