"""Speed of ``method=dift`` against DIFT's official code, and the GPU-minute estimate of a full
SPair-71k test run. Random weights: seconds and FLOPs only.

    SDZERO_DIFT_PYTHON=/tmp/dift_venv/bin/python \\
    SDZERO_DIFT_MIRROR=<git dir of github Tsingularity/dift> \\
    python -m benchmarks.run --only 'dift-*' 'sd_dino-*' --json out.json

Jobs (see ``benchmarks/run.py``; ``--quick``: tiny models and sizes):

- ``dift-vs-official``: the same random-weight SD 2.1 folder (``reference/dift/official_stack.py``
  builds it in DIFT's stack; per-tensor sha256 compared on both sides) run by DIFT's unmodified
  ``eval_spair.main`` (old stack, ``SDZERO_DIFT_PYTHON``; its git dir ``SDZERO_DIFT_MIRROR``) and
  by sdzero's ``dift``, in rounds alternating official / sdzero / official
  (``SDZERO_DIFT_ROUNDS``), on the same pair lists with the same injected draws: seconds per
  image of feature extraction, per pair of each code's loop over the list, per pair of matching
  alone, and per pair composed at SPair's ratio of pairs to images; features compared. Skipped
  (one row saying why) without the old stack, or on CUDA (the official side runs on CPU here).
- ``dift-gpu-estimate``: FLOPs of a full SPair test run at the defaults (768 px, ensemble 8),
  counted by ``FlopCounterMode`` on meta tensors, at a GPU's datasheet peak with a stated
  efficiency: an estimate, not a measurement.

``sd_dino``'s timings and estimate: ``bench_sd_dino.py``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from benchmarks import dift_side as side
from benchmarks.common import GPU_PEAKS, Row, count_flops

SPAIR_PAIRS = 12_234  # SPair-71k test pairs
# SPair-71k holds 1,800 images in all; the test split's distinct images are at most that, so
# 12,234 / 1,800 = 6.8 pairs per image is the least sharing the real split can have
SPAIR_IMAGES = 1_800
EFFICIENCY = 0.4  # assumed fraction of the datasheet peak a UNet/VAE pass reaches (estimate)
ESTIMATE_GPUS = ("A100", "H100")  # GPU_PEAKS keys: TF32 dense peak (fp32 code on tensor cores)
# the 2-core budget (~15 min for every job): the official loop takes ~20 s a pair to match there
SETTINGS = (
    side.Setting("reduced", 256, 8, images=2, pairs=2),
    side.Setting("default size, ensemble 2", 768, 2, images=1, pairs=2),
)
QUICK_SETTINGS = (
    side.Setting("reduced", 64, 8, images=2, pairs=2),
    side.Setting("default size, ensemble 2", 128, 2, images=1, pairs=2),
)
SECTION = "dift vs official"


def _skip(reason: str) -> list[Row]:
    print(f"[bench] dift-vs-official skipped: {reason}", file=sys.stderr)
    return [Row(SECTION, "side-by-side timing", "skipped", float("nan"), note=reason)]


def work_folder() -> Path:
    default = Path(tempfile.gettempdir()) / "sdzero-dift-bench"
    work = Path(os.environ.get("SDZERO_DIFT_WORK") or default)
    work.mkdir(parents=True, exist_ok=True)
    return work


def _mean_image(timings: list[side.Timing]) -> tuple[float, str]:
    """Mean seconds per image over rounds, and each round's mean for the note."""
    means = [statistics.mean(t.per_image) for t in timings]
    return statistics.mean(means), ", ".join(f"{m:.2f}" for m in means)


def side_rows(
    setting: side.Setting, official: list, mine: list, flops: tuple, extra: dict
) -> list[Row]:
    """The table rows of one setting from its official and sdzero rounds (see the module doc)."""
    s, (vae, unet) = setting, flops
    off = [r["timings"][s.name] for r in official]
    own = [r["timings"][s.name] for r in mine]
    off_img, off_rounds = _mean_image(off)
    own_img, own_rounds = _mean_image(own)
    rel = max(side.relative_difference(o.features, a.features) for o in own for a in off)
    unit = f"{s.img_size} px, ensemble {s.ensemble}"
    ratio_img = off_img / own_img
    rows = [
        Row(
            SECTION,
            f"features per image, {unit}",
            "official",
            off_img,
            s.ensemble * (vae + unet),
            f"rounds {off_rounds}; {extra['official_note']}",
        ),
        Row(
            SECTION,
            f"features per image, {unit}",
            "sdzero",
            own_img,
            vae + s.ensemble * unet,
            f"official/sdzero {ratio_img:.2f}x; rounds {own_rounds}; features = official's to "
            f"{rel:.1e} relative; {extra['weights_note']}",
        ),
    ]
    off_pair = statistics.mean(t.loop / t.pairs for t in off)
    own_pair = statistics.mean(t.loop / t.pairs for t in own)
    once = statistics.mean(t.once for t in own)
    listed = f"per pair, list of {s.pairs} pairs on {s.images} image(s), {unit}"
    rows += [
        Row(SECTION, listed, "official", off_pair, note="eval_spair.main, model build excluded"),
        Row(
            SECTION,
            listed,
            "sdzero (feature cache)",
            own_pair,
            note=f"official/sdzero {off_pair / own_pair:.2f}x; includes one-time {once:.2f} s "
            "(cache key: weights digest) in the first pair",
        ),
    ]
    off_rest = statistics.mean(t.rest for t in off)
    own_rest = statistics.mean(t.rest for t in own)
    matched = f"per pair, matching only ({side.KEYPOINTS} keypoints), {unit}"
    rows += [
        Row(SECTION, matched, "official", off_rest, note="loop minus extraction, per pair"),
        Row(
            SECTION,
            matched,
            "sdzero",
            own_rest,
            extra["match_flops"].get(s.name),
            f"official/sdzero {off_rest / own_rest:.2f}x",
        ),
    ]
    ratio = SPAIR_PAIRS / SPAIR_IMAGES
    composed = f"per pair at SPair test's {ratio:.1f} pairs per image, {unit}"
    off_spair, own_spair = off_img / ratio + off_rest, own_img / ratio + own_rest
    rows += [
        Row(SECTION, composed, "official", off_spair, note="per image / 6.8 + matching"),
        Row(
            SECTION,
            composed,
            "sdzero (feature cache)",
            own_spair,
            note=f"official/sdzero {off_spair / own_spair:.2f}x",
        ),
        Row(
            SECTION,
            composed,
            "sdzero (no cache)",
            2 * own_img + own_rest,
            note=f"official/sdzero {off_spair / (2 * own_img + own_rest):.2f}x: both images "
            "extracted every pair (method.feature_cache unset)",
        ),
    ]
    return rows


def side_by_side(device: str, quick: bool) -> list[Row]:
    """The ``dift-vs-official`` job (module docstring)."""
    python, mirror = os.environ.get("SDZERO_DIFT_PYTHON"), os.environ.get("SDZERO_DIFT_MIRROR")
    if device.startswith("cuda"):
        return _skip("the official side runs on CPU here (its shims); run it with --device cpu")
    if not python or not Path(python).is_file():
        return _skip(
            "set SDZERO_DIFT_PYTHON to the python of DIFT's venv (reference/dift/README.md)"
        )
    if not mirror or not Path(mirror).is_dir():
        return _skip("set SDZERO_DIFT_MIRROR to a git dir of github Tsingularity/dift")
    rounds = os.environ.get("SDZERO_DIFT_ROUNDS", "official,sdzero,official").split(",")
    if set(rounds) != {"official", "sdzero"}:
        raise ValueError(f"SDZERO_DIFT_ROUNDS={rounds}: a list of official and sdzero, both")
    settings, arch = (QUICK_SETTINGS, "tiny") if quick else (SETTINGS, "sd21")
    work = work_folder()
    model = work / f"model-{arch}"
    with tempfile.TemporaryDirectory(dir=work) as name:
        tmp = Path(name)
        built = None
        if not model.exists():  # built in the old stack, once; loaded by both sides
            built = side.official_round(python, mirror, work, model, arch, [], False)
        datas, runs = {}, []
        for s in settings:
            data = side.write_pair_list(tmp / s.name.replace(" ", "_"), s, 128 if quick else 448)
            draws = side.write_draws(data, s, tmp / f"{s.img_size}.draws.safetensors")
            datas[s.name] = data
            runs.append(
                {
                    "name": s.name,
                    "data": str(data),
                    "draws": str(draws),
                    "img_size": s.img_size,
                    "ensemble_size": s.ensemble,
                }
            )
        official, mine = [], []
        for who in rounds:
            if who == "official":
                official.append(
                    side.official_round(python, mirror, work, model, arch, runs, not official)
                )
            else:
                mine.append(side.sdzero_round(model, datas, settings, not mine, tmp))
    theirs = side.comparable_digests(official[0]["sha256"])
    ours = side.comparable_digests(mine[0]["sha256"])
    if theirs != ours:
        bad = [p for p in theirs if theirs[p] != ours.get(p)]
        raise RuntimeError(f"the two stacks loaded different weights: {bad}")
    versions = official[0]["versions"]
    extra = {
        "official_note": f"DIFT {official[0]['dift_commit'][:7]}, torch {versions['torch']}, "
        f"diffusers {versions['diffusers']}"
        + (f"; model folder built in {built['model_built_seconds']:.0f} s" if built else ""),
        "weights_note": f"sha256 equal for all {sum(map(len, ours.values()))} tensors",
        "match_flops": mine[0]["match_flops"],
    }
    rows = []
    for s in settings:
        flops = side.dift_component_flops(str(model), s.img_size)
        rows += side_rows(s, official, mine, flops, extra)
    return rows


def gpu_rows(section: str, unit: str, mode: str, total_flops: float, quick: bool) -> list[Row]:
    """Estimated seconds of ``total_flops`` on each of :data:`ESTIMATE_GPUS` at its TF32 dense
    datasheet peak times :data:`EFFICIENCY` (rows say so; not measured)."""
    rows = []
    for gpu in ESTIMATE_GPUS:
        peak = GPU_PEAKS[gpu][1] * EFFICIENCY
        seconds = total_flops / peak
        rows.append(
            Row(
                section,
                unit,
                f"{mode}, {gpu} estimate",
                seconds,
                note=f"ESTIMATE {seconds / 60:.1f} GPU-minutes: {total_flops / 1e15:.1f} PFLOP at "
                f"{EFFICIENCY:.0%} of the {GPU_PEAKS[gpu][1] / 1e12:.0f} TFLOP/s TF32 peak"
                + ("" if not quick else " (quick shapes)"),
            )
        )
    return rows


def dift_estimate(device: str, quick: bool) -> list[Row]:
    """``dift-gpu-estimate``: a full SPair test run at 768 px, ensemble 8 (module docstring)."""
    from sdzero.correspondence.matching import nearest_pixels

    arch, size, ensemble, channels = ("tiny", 128, 8, 64) if quick else ("sd21", 768, 8, 1280)
    vae, unet = side.dift_component_flops(arch, size)
    grid = size // 16
    src, trg = torch.randn(channels, grid, grid), torch.randn(channels, grid, grid)
    points = torch.tensor([[100.0, 100.0]] * side.KEYPOINTS)
    match = count_flops(lambda: nearest_pixels(src, trg, points, (375, 500), (375, 500)))
    unit = (
        f"full SPair test: {SPAIR_PAIRS} pairs, <= {SPAIR_IMAGES} images, {size} px, "
        f"ensemble {ensemble}"
    )
    rows = []
    for mode, per_image in (
        ("sdzero", vae + ensemble * unet),
        ("official", ensemble * (vae + unet)),
    ):
        total = SPAIR_IMAGES * per_image + SPAIR_PAIRS * match
        rows += gpu_rows("dift GPU estimate", unit, mode, total, quick)
    return rows


def jobs(quick: bool) -> dict[str, Callable[[str], list[Row]]]:
    """``dift-vs-official`` and ``dift-gpu-estimate``."""
    return {
        "dift-vs-official": partial(_device_first, side_by_side, quick),
        "dift-gpu-estimate": partial(_device_first, dift_estimate, quick),
    }


def _device_first(fn: Callable[[str, bool], list[Row]], quick: bool, device: str) -> list[Row]:
    return fn(device, quick)
