"""The benchmark runner: every speed and memory figure of the README in one table.

    python -m benchmarks.run                      # everything, CPU (about an hour on 2 cores)
    python -m benchmarks.run --device cuda        # the same on a GPU, with TFLOP/s against its peak
    python -m benchmarks.run --only 'corr-exact-*' kmeans --json out.json
    python -m benchmarks.run --quick              # tiny shapes: checks the benchmarks run

Each job runs in its own process, so the peak memory beside it is that job's alone (CPU: the
process's maximum resident set; CUDA: ``torch.cuda.max_memory_allocated``). FLOPs are counted by
torch's ``FlopCounterMode`` (matmuls, convolutions, attention); the floor of a row is its FLOPs at
the device's peak: on CPU the measured rate of a large fp32 matmul, on CUDA the datasheet peak of
the row's dtype (``benchmarks/common.py``). Random weights everywhere: these are speed figures only.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import importlib

import torch

from benchmarks.common import gpu_peak, measured_peak_flops

MODULES = (
    "bench_correspondence",
    "bench_segmentation",
    "bench_kmeans",
    "bench_dift",
    "bench_sd_dino",
    "bench_ovseg",
    "bench_student",
)
MARK = "SDZERO-BENCH-ROWS "


def all_jobs(quick: bool) -> dict:
    jobs = {}
    for name in MODULES:
        jobs.update(importlib.import_module(f"benchmarks.{name}").jobs(quick))
    return jobs


def _peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def find_job(name: str, quick: bool):
    """The job called ``name``, importing the job modules only up to the one that has it."""
    for module in MODULES:
        jobs = importlib.import_module(f"benchmarks.{module}").jobs(quick)
        if name in jobs:
            return jobs[name]
    raise KeyError(f"no benchmark job named {name!r} (python -m benchmarks.run --list)")


def run_one(name: str, device: str, quick: bool) -> None:
    """Child process: run one job and print its rows as one JSON line."""
    rows = find_job(name, quick)(device)
    print(
        MARK
        + json.dumps(
            {"rows": [r.to_json() for r in rows], "peak_memory_gb": _peak_memory_gb(device)}
        ),
        flush=True,
    )


def _half(row: dict) -> bool:
    return any(k in row["mode"] for k in ("bf16", "fp16"))


def _peak_flops(row: dict, device: str, cpu_peaks: dict | None) -> float | None:
    if device.startswith("cuda"):
        return gpu_peak(torch.bfloat16 if _half(row) else torch.float32)
    return None if cpu_peaks is None else cpu_peaks["bf16" if _half(row) else "fp32"]


class CpuPeaks(dict):
    """Measured CPU peaks (FLOP/s) for fp32 and bf16 rows, each measured when a row first needs
    it: a CPU without native bf16 takes minutes over the bf16 one (~0.3 GFLOP/s emulated)."""

    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def __missing__(self, kind: str) -> float:
        self[kind] = measured_peak_flops("cpu", self.DTYPES[kind])
        return self[kind]


def cpu_peaks() -> dict:
    return CpuPeaks()


def format_table(results: list[dict], device: str, cpu_peaks: dict | None) -> str:
    """Markdown table of the jobs' rows."""
    lines = [
        "| section | unit | mode | seconds | GFLOP | achieved TFLOP/s | floor s (% of peak) "
        "| job peak memory GB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for row in result["rows"]:
            flops, sec = row["flops"], row["seconds"]
            peak = _peak_flops(row, device, cpu_peaks)
            gflop = f"{flops / 1e9:.1f}" if flops else ""
            rate = f"{flops / sec / 1e12:.3f}" if flops and sec > 0 else ""
            floor = ""
            if flops and peak:
                floor = f"{flops / peak:.2f} ({100 * flops / peak / sec:.0f}%)"
            lines.append(
                f"| {row['section']} | {row['unit']} | {row['mode']} | {sec:.3f} | {gflop} | "
                f"{rate} | {floor} | {result['peak_memory_gb']:.2f} | {row['note']} |"
            )
    return "\n".join(lines)


def _rates(peaks: dict) -> str:
    rates = " / ".join(f"{kind} {peaks[kind] / 1e9:.0f}" for kind in sorted(peaks))
    return f"measured peak (best of matmul and 3x3 conv) {rates} GFLOP/s"


def _header(device: str, peaks: dict | None) -> str:
    header = f"device: {torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}"
    header += f", torch {torch.__version__}, {torch.get_num_threads()} threads"
    return header + (f", {_rates(peaks)}" if peaks else "")  # the peaks the rows needed


def _write_json(path: str, device: str, peaks: dict | None, results: list, failed: list) -> None:
    """The ``--json`` file of the jobs run so far, replaced atomically, with the peaks (FLOP/s)
    the run measured, so that ``--render`` computes the floors against the run's own machine."""
    from sdzero.records import write_json_atomic

    record = {"header": _header(device, None), "peaks": dict(peaks or {})}
    write_json_atomic(path, {**record, "results": results, "failed": failed})


def render(paths: list[str], device: str) -> str:
    """The headers and table of saved ``--json`` files: each file's rows against the peaks its
    own run measured (a file written before runs saved them: peaks measured now, and said so)."""
    now = None if device.startswith("cuda") else cpu_peaks()
    headers, rows = [], []
    for path in paths:
        record = json.loads(Path(path).read_text())
        peaks = CpuPeaks(record["peaks"]) if record.get("peaks") else now
        rows += format_table(record["results"], device, peaks).splitlines()[2:]
        header = f"{Path(path).name}: {record['header']}"
        if peaks:  # ``now`` is filled by format_table with the kinds the rows needed
            header += f", {_rates(peaks)} ({'when rendering' if peaks is now else 'in the run'})"
        headers.append(header)
    return "\n".join([*headers, *format_table([], device, None).splitlines(), *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds per job")
    parser.add_argument("--only", nargs="+", default=["*"], help="job name globs")
    parser.add_argument("--list", action="store_true", help="print the job names and exit")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--render", nargs="+", help="print the table of saved --json files")
    parser.add_argument("--run-job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_job:
        run_one(args.run_job, args.device, args.quick)
        return 0
    if args.render:
        print(render(args.render, args.device))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    names = [n for n in all_jobs(args.quick) if any(fnmatch.fnmatch(n, p) for p in args.only)]
    if args.list or not names:
        print("\n".join(names) or f"no job matches {args.only}")
        return 0 if names else 2
    peaks = None if args.device.startswith("cuda") else cpu_peaks()
    results, failed = [], []
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    for name in names:
        cmd = [sys.executable, "-m", "benchmarks.run", "--run-job", name, "--device", args.device]
        cmd += ["--quick"] if args.quick else []
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
        if proc.returncode or not lines:
            failed.append(name)
            print(f"[bench] {name} FAILED:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        result = {"job": name, **json.loads(lines[-1][len(MARK) :])}
        results.append(result)
        rows = format_table([result], args.device, peaks).splitlines()[2:]  # no table header
        print("\n".join(rows), file=sys.stderr, flush=True)
        if args.json:  # after every job, so that an interrupted run keeps the finished ones
            _write_json(args.json, args.device, peaks, results, failed)
    print(_header(args.device, peaks))
    print(format_table(results, args.device, peaks))
    if args.json:
        _write_json(args.json, args.device, peaks, results, failed)
    if failed:
        print(f"failed jobs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
