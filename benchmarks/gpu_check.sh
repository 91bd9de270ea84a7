#!/usr/bin/env bash
# The prepared GPU check: on one CUDA GPU, in well under 10 minutes (each step has its own
# timeout, and they add up to at most 600 s), from the repository root:
#   1. the test suite's CUDA tests (those skipped without CUDA: `-k cuda` in the files that test
#      torch.cuda.is_available()),
#   2. every demo experiment on the tiny random-weight backbone with trainer.accelerator=gpu
#      (device-placement bugs), then `sdzero report` of those runs,
#   3. python -m benchmarks.run --device cuda --quick,
#   4. the correspondence exact / bf16 timing jobs at 512 px on the SD-1.4 architecture.
# Writes everything into $OUT (else ./gpu_check/) and one JSON of figures, gpu_check.json: per
# step its exit status and seconds, the tests' counts, each demo's headline metrics and seconds
# per sample, and the benchmark rows. Exits 1 if any step failed (the JSON is written anyway).
set -uo pipefail

OUT_DIR="${OUT:-./gpu_check}"
DEMO_EXPERIMENTS=(demo_correspondence demo_segmentation demo_dift)
OPTIONAL_EXPERIMENTS=(demo_sd_dino) # run when the config exists in this checkout
CORR_512_JOBS=(corr-exact-512 corr-bf16-512)

mkdir -p "$OUT_DIR/runs" "$OUT_DIR/logs"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
STEPS="$OUT_DIR/steps.tsv"
: >"$STEPS"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

# step NAME TIMEOUT_S COMMAND...: run it with its output in logs/NAME.log, record rc and seconds
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "[gpu_check] $name ..." >&2
    timeout "$limit" "$@" >"$OUT_DIR/logs/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$STEPS"
    echo "[gpu_check] $name: exit $rc after $((SECONDS - start)) s" >&2
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    >"$OUT_DIR/gpu.txt" 2>&1

mapfile -t CUDA_TEST_FILES < <(grep -l "cuda.is_available" tests/test_*.py)
step cuda_tests 45 python -m pytest -q -p no:cacheprovider -rs -k cuda \
    --junitxml="$OUT_DIR/cuda_tests.xml" "${CUDA_TEST_FILES[@]}"

experiments=("${DEMO_EXPERIMENTS[@]}")
for name in "${OPTIONAL_EXPERIMENTS[@]}"; do
    [[ -f "configs/experiment/$name.yaml" ]] && experiments+=("$name")
done
runs=()
for name in "${experiments[@]}"; do
    step "$name" 50 sdzero eval "$name" trainer.accelerator=gpu trainer.devices=1 \
        logger=none "output_dir=$OUT_DIR/runs/$name"
    runs+=("$OUT_DIR/runs/$name")
done
step report 20 sdzero report "${runs[@]}" --out "$OUT_DIR/report" --per-category

step bench_quick 130 python -m benchmarks.run --device cuda --quick \
    --json "$OUT_DIR/bench_quick.json"
step bench_corr_512 205 python -m benchmarks.run --device cuda --only "${CORR_512_JOBS[@]}" \
    --json "$OUT_DIR/bench_corr_512.json"

python - "$OUT_DIR" <<'EOF'
"""Collect the figures of every step into gpu_check.json."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    steps[name] = {"exit": int(rc), "seconds": int(seconds)}


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


figures = {"gpu": (out / "gpu.txt").read_text().strip(), "steps": steps}
try:
    suite = ET.parse(out / "cuda_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    figures["cuda_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, IndexError):
    figures["cuda_tests"] = None
demos = {}
for run in sorted((out / "runs").iterdir()):
    metrics = read_json(run / "metrics.json")
    if metrics is None:
        demos[run.name] = None
        continue
    keep = ("task", "dataset", "pck", "pck_point", "miou", "seconds_per_pair", "seconds_per_image")
    demos[run.name] = {k: metrics[k] for k in keep if k in metrics}
figures["demos"] = demos
figures["benchmarks"] = {
    name: read_json(out / f"{name}.json") for name in ("bench_quick", "bench_corr_512")
}
figures["ok"] = all(s["exit"] == 0 for s in steps.values()) and all(demos.values())
(out / "gpu_check.json").write_text(json.dumps(figures, indent=1))
print(json.dumps({"ok": figures["ok"], "steps": steps, "cuda_tests": figures["cuda_tests"]}))
sys.exit(0 if figures["ok"] else 1)
EOF
