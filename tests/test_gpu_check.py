"""benchmarks/gpu_check.sh on CPU: its syntax, the experiments and jobs it names, its time bound,
and its figure collector on hand-written step outputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run import all_jobs
from sdzero.config import available

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
TEXT = SCRIPT.read_text()


def _array(name: str) -> list[str]:
    match = re.search(rf"^{name}=\(([^)]*)\)", TEXT, re.MULTILINE)
    assert match, f"{name}=(...) not in {SCRIPT}"
    return match.group(1).split()


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_experiment_and_benchmark_job_it_names_exists():
    demos = _array("DEMO_EXPERIMENTS")
    assert {"demo_correspondence", "demo_segmentation", "demo_dift"} <= set(demos)
    assert set(demos) <= set(available("experiment"))
    jobs = _array("CORR_512_JOBS")
    assert jobs == ["corr-exact-512", "corr-bf16-512"]
    assert set(jobs) <= set(all_jobs(quick=False))
    assert all_jobs(quick=True)  # --quick has jobs to run
    named = re.findall(r"\bcorr-[a-z0-9-]+", TEXT)
    assert set(named) <= set(all_jobs(quick=False))


def test_timeouts_add_up_to_at_most_ten_minutes():
    limits = dict(re.findall(r"^\s*step (\S+) (\d+) ", TEXT, re.MULTILINE))
    per_demo = int(limits.pop('"$name"'))
    experiments = len(_array("DEMO_EXPERIMENTS")) + len(_array("OPTIONAL_EXPERIMENTS"))
    assert set(limits) == {"cuda_tests", "report", "bench_quick", "bench_corr_512"}
    assert sum(map(int, limits.values())) + per_demo * experiments <= 600


def test_cuda_tests_it_selects_exist():
    files = list(SCRIPT.parent.parent.glob("tests/test_*.py"))
    selected = [p for p in files if "cuda.is_available" in p.read_text()]
    assert any("def test_cuda" in p.read_text() for p in selected)


@pytest.fixture
def collector() -> str:
    return TEXT.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]


def test_collector_writes_one_json_of_figures(tmp_path, collector):
    (tmp_path / "steps.tsv").write_text("cuda_tests\t0\t12\ndemo_dift\t0\t30\nbench_quick\t1\t90\n")
    (tmp_path / "gpu.txt").write_text("NVIDIA H200, 143771 MiB, 550.0\n")
    (tmp_path / "cuda_tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="0" errors="0" skipped="1"/></testsuites>'
    )
    run = tmp_path / "runs" / "demo_dift"
    run.mkdir(parents=True)
    metrics = {"task": "correspondence", "pck": {"0.1": 50.0}, "per_category": {}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "bench_quick.json").write_text(json.dumps({"results": [{"job": "kmeans"}]}))
    proc = subprocess.run(
        [sys.executable, "-", str(tmp_path)], input=collector, text=True, capture_output=True
    )
    assert proc.returncode == 1  # bench_quick failed
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert figures["gpu"].startswith("NVIDIA H200")
    assert figures["steps"]["demo_dift"] == {"exit": 0, "seconds": 30}
    assert figures["cuda_tests"] == {"tests": 3, "failures": 0, "errors": 0, "skipped": 1}
    assert figures["demos"] == {"demo_dift": {"task": "correspondence", "pck": {"0.1": 50.0}}}
    assert figures["benchmarks"] == {
        "bench_quick": {"results": [{"job": "kmeans"}]},
        "bench_corr_512": None,
    }
    assert figures["ok"] is False
