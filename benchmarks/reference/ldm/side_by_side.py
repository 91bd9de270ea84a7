"""The ``corr-vs-official`` job: Hedlin et al.'s official code and sdzero's ``ldm_corr`` timed in one
run, on one random-weight model folder, in rounds alternating official / sdzero / official.

    SDZERO_LDM_PYTHON=/tmp/ldm_venv/bin/python python -m benchmarks.run --only corr-vs-official

Opt-in: without ``SDZERO_LDM_PYTHON`` (the python of the venv ``setup.sh`` builds) the job is one
row saying so. ``SDZERO_LDM_CODE``: the official files (default: ``LDM_correspondences/`` in that
venv); ``SDZERO_LDM_WORK``: where the model folder is built once and kept (default
``$TMPDIR/sdzero-ldm-bench``); ``SDZERO_LDM_ROUNDS``: the rounds (default
``official,sdzero,official``). The folder is written by the old stack (``official_step.py build``);
each side hashes every UNet and VAE tensor as it loaded them and the job refuses to report unless
all digests agree. Official rounds run ``official_step.py time`` in a subprocess (peak memory =
that process's); sdzero rounds run here (:func:`sdzero_round`). A ratio is always official over
sdzero from this one run; never divide figures of different runs or machines.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SECTION = "ldm_corr vs official"
SIZE = 512  # the official code hard-codes 512 px
POINT = (256.0, 256.0)  # the query point (model frame): any point with the full crop range
VAE_RENAMES = [  # modern diffusers -> 0.8 names of the VAE's mid-block attention
    ("to_q.", "query."),
    ("to_k.", "key."),
    ("to_v.", "value."),
    ("to_out.0.", "proj_attn."),
]


def settings() -> dict:
    """The job's environment (module docstring); ``python`` is None when the job is off."""
    python = os.environ.get("SDZERO_LDM_PYTHON")
    code = os.environ.get("SDZERO_LDM_CODE") or (
        str(Path(python).absolute().parent.parent / "LDM_correspondences") if python else None
    )
    work = Path(
        os.environ.get("SDZERO_LDM_WORK") or Path(tempfile.gettempdir()) / "sdzero-ldm-bench"
    )
    rounds = os.environ.get("SDZERO_LDM_ROUNDS", "official,sdzero,official").split(",")
    if set(rounds) != {"official", "sdzero"}:
        raise ValueError(f"SDZERO_LDM_ROUNDS={rounds}: a list of official and sdzero, both")
    return {"python": python, "code": code, "work": work, "rounds": rounds}


def skip_reason(env: dict, device: str) -> str | None:
    if device.startswith("cuda"):
        return "the official side runs on CPU here; run corr-vs-official with --device cpu"
    if not env["python"] or not Path(env["python"]).is_file():
        return "set SDZERO_LDM_PYTHON to the python of the official stack (reference/ldm/README.md)"
    if not (Path(env["code"]) / "utils" / "optimize_token.py").is_file():
        return f"no official code at {env['code']} (set SDZERO_LDM_CODE; setup.sh exports it)"
    return None


def official(env: dict, *args: str) -> dict:
    """Run ``official_step.py`` in the old stack; its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", dir=env["work"]) as out:
        cmd = [env["python"], str(HERE / "official_step.py"), *args, "--out", out.name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"official side failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def model_folder(env: dict, arch: str) -> tuple[Path, float | None]:
    """The random-weight folder of ``arch`` (built in the old stack the first time)."""
    folder = env["work"] / f"model-{arch}"
    if folder.exists():
        return folder, None
    built = official(env, "build", "--folder", str(folder), "--arch", arch)
    return folder, built["built_seconds"]


def write_inputs(path: Path) -> None:
    """The model-frame image both sides read: ``(3, 512, 512)`` uint8 from a seeded generator."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    save_file({"image": image, "point": torch.tensor(POINT)}, str(path))


def comparable(digests: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Per-tensor sha256 under diffusers 0.8's names."""
    out = {}
    for part, table in digests.items():
        fixed = {}
        for name, digest in table.items():
            for a, b in VAE_RENAMES:
                name = name.replace(f"mid_block.attentions.0.{a}", f"mid_block.attentions.0.{b}")
            fixed[name] = digest
        out[part] = fixed
    return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Clock:
    """Seconds spent in wrapped callables, by name (the official side's clock, on this side)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - start

        return timed

    def reset(self) -> dict[str, float]:
        spent, self.spent = self.spent, {}
        return spent


def calls(pc, image: torch.Tensor, b: int) -> dict:
    """A step and a pass of ``b`` items at :data:`POINT` (fresh per-item streams each call)."""
    from sdzero.correspondence.fitting import item_generator

    points = torch.tensor([POINT] * b)
    cond = torch.randn(b, *pc.cond_shape, generator=torch.Generator().manual_seed(0))

    def gens() -> list[torch.Generator]:
        return [item_generator(0, 0, 0, j) for j in range(b)]

    return {
        "step": lambda: pc.optimise(image, points, gens(), groups=[0] * b),
        "pass": lambda: pc.infer(image, cond, gens()),
    }


def sdzero_round(sd, image: torch.Tensor, repeats: int, **cfg) -> dict:
    """sdzero's counterparts of the official step and pass (``method.*`` defaults + ``cfg``), each
    after one warm-up call: ``repeats`` steps and passes of 1 embedding (a fresh latent cache
    each call, so the crop is encoded as the official step encodes it) and one of the 5 restarts
    batched."""
    from sdzero.correspondence.fit_config import FitConfig
    from sdzero.correspondence.fitting import PromptCorrespondence

    clock = Clock()
    real_forward = sd.unet.forward
    sd.unet.forward = clock.wrap("unet_forward", real_forward)
    out: dict = {}
    try:
        for b in (1, 5):
            pc = PromptCorrespondence(sd, FitConfig(steps=1, inference_crops=1, **cfg))
            pc.encode_crops = clock.wrap("vae_encode", pc.encode_crops)
            for name, fn in calls(pc, image, b).items():
                seconds, parts = [], []
                for k in range((repeats if b == 1 else 1) + 1):
                    clock.reset()
                    start = time.perf_counter()
                    fn()
                    if k:
                        seconds.append(time.perf_counter() - start)
                        parts.append(clock.reset())
                key = name if b == 1 else f"{name}{b}"
                out[key] = {"seconds": seconds, "parts": parts, "peak_rss_gb": peak_rss_gb()}
    finally:
        sd.unet.forward = real_forward
    return out


def load_sdzero(folder: Path):
    """The folder as sdzero loads it, prepared as ``ldm_corr`` prepares it (defaults), and the
    per-tensor sha256 of its UNet and VAE (of the values: the memory format does not enter)."""
    from sdzero.backbones.sd import load_stable_diffusion
    from sdzero.correspondence.fit_config import FitConfig
    from sdzero.correspondence.module import prepare_backbone

    sd = load_stable_diffusion(str(folder), dtype=torch.float32)
    sha = {
        "unet": {k: _sha(v) for k, v in sd.unet.state_dict().items()},
        "vae": {k: _sha(v) for k, v in sd.vae.state_dict().items()},
    }
    return prepare_backbone(sd, FitConfig()), sha


def _sha(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def machine_line(official_result: dict) -> str:
    """CPU model, cores, threads and both stacks' versions."""
    m, v = official_result["machine"], official_result["versions"]
    import diffusers

    return (
        f"{time.strftime('%Y-%m-%d')}, {m['cpu']}, {m['cores']} cores, {torch.get_num_threads()} "
        f"threads; official {official_result['commit'][:7]}: torch {v['torch']}, diffusers "
        f"{v['diffusers']}, transformers {v['transformers']}; sdzero: torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, python {platform.python_version()}"
    )


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def count_step_flops(sd) -> dict[str, float]:
    """FLOPs of sdzero's 1-embedding step and pass (``FlopCounterMode``; the floor's numerator)."""
    from benchmarks.common import count_flops
    from sdzero.correspondence.fit_config import FitConfig
    from sdzero.correspondence.fitting import PromptCorrespondence

    pc = PromptCorrespondence(sd, FitConfig(steps=1, inference_crops=1))
    image = torch.rand(1, 3, SIZE, SIZE)
    return {name: count_flops(fn) for name, fn in calls(pc, image, 1).items()}


def run_rounds(env: dict, quick: bool, repeats: int) -> dict:
    """Every round of the job (module docstring), in run order: ``official`` and ``sdzero``
    results, sdzero's step FLOPs, the model folder and the build time if it was built now. The
    sdzero model is freed after the last sdzero round (the official rounds need the memory)."""
    env["work"].mkdir(parents=True, exist_ok=True)
    folder, built = model_folder(env, "tiny" if quick else "sd14")
    inputs = env["work"] / "inputs.safetensors"
    write_inputs(inputs)
    from safetensors.torch import load_file

    image = load_file(str(inputs))["image"].float()[None] / 255
    sd = sha = None
    results: dict = {"official": [], "sdzero": [], "order": [], "folder": folder, "built": built}
    left = env["rounds"].count("sdzero")
    for who in env["rounds"]:
        if who == "official":
            args = ["time", "--folder", str(folder), "--code", env["code"], "--inputs", str(inputs)]
            got = official(env, *args, "--steps", str(repeats), "--passes", str(repeats))
        else:
            if sd is None:
                sd, sha = load_sdzero(folder)
            got = {**sdzero_round(sd, image, repeats), "sha256": sha}
            results.setdefault("flops", count_step_flops(sd))
            left -= 1
            if not left:
                sd = None
                gc.collect()
        results[who].append(got)
        results["order"].append(who)
        print(f"[bench] corr-vs-official: {who} round done", file=sys.stderr, flush=True)
    theirs = comparable(results["official"][0]["sha256"])
    ours = comparable(results["sdzero"][0]["sha256"])
    if theirs != ours:
        bad = [p for p in theirs if theirs[p] != ours.get(p)]
        raise RuntimeError(f"the two stacks loaded different weights: {bad}")
    results["tensors"] = sum(map(len, ours.values()))
    return results


def _parts(result: dict, name: str) -> dict[str, float]:
    """Mean seconds of each timed component of ``result[name]`` (plus ``rest``)."""
    runs = result[name]
    parts = {
        k: mean([p.get(k, 0.0) for p in runs["parts"]]) for k in ("vae_encode", "unet_forward")
    }
    parts["rest"] = mean(runs["seconds"]) - sum(parts.values())
    return parts


def _pooled(results: list[dict], name: str) -> tuple[float, dict[str, float], str]:
    """Mean seconds over every round's calls, mean components, and each round's figure."""
    seconds = [s for r in results for s in r[name]["seconds"]]
    parts = [_parts(r, name) for r in results]
    pooled = {k: mean([p[k] for p in parts]) for k in parts[0]}
    rounds = ", ".join(f"{mean(r[name]['seconds']):.2f}" for r in results)
    return mean(seconds), pooled, rounds


def rows(results: dict, work, flops: dict[str, float]) -> list:
    """Table rows of one run (:func:`run_rounds`): official against sdzero for one step and one
    pass, then per query point and per pair of the real SPair point distribution (``work``: a
    :class:`benchmarks.corr_pairs.PairWork`), each ratio official / sdzero of this run."""
    from benchmarks.common import Row
    from benchmarks.corr_pairs import CROPS, RESTARTS, STEPS

    off, own = results["official"], results["sdzero"]
    line = machine_line(off[0])
    order = "/".join("A" if w == "official" else "B" for w in results["order"])

    def note(parts: dict[str, float], rounds: str, peak: float) -> str:
        shown = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in parts.items())
        return f"rounds {rounds}; {shown}; peak RSS {peak:.1f} GB"

    out = []
    for name, unit in (("step", "optimisation step, 1 embedding"), ("pass", "inference pass")):
        o, o_parts, o_rounds = _pooled(off, name)
        s, s_parts, s_rounds = _pooled(own, name)
        o_peak = max(r[name]["peak_rss_gb"] for r in off)
        s_peak = max(r[name]["peak_rss_gb"] for r in own)
        out.append(
            Row(SECTION, f"{unit}, {SIZE} px", "official", o, None, note(o_parts, o_rounds, o_peak))
        )
        out.append(
            Row(
                SECTION,
                f"{unit}, {SIZE} px",
                "sdzero exact",
                s,
                flops.get(name),
                f"official/sdzero {o / s:.2f}x ({order}); " + note(s_parts, s_rounds, s_peak),
            )
        )
    step5, step5_parts, _ = _pooled(own, "step5")
    pass5, pass5_parts, _ = _pooled(own, "pass5")
    s_peak5 = max(r["step5"]["peak_rss_gb"] for r in own)
    out.append(
        Row(
            SECTION,
            f"optimisation step, {RESTARTS} restarts batched, {SIZE} px",
            "sdzero exact",
            step5,
            None if "step" not in flops else RESTARTS * flops["step"],
            f"{step5 / RESTARTS:.2f} s per restart; peak RSS {s_peak5:.1f} GB (the default "
            f"method.batch_size={RESTARTS})",
        )
    )
    # per point / per pair: the official code fits and infers every point alone; sdzero batches
    # a point's restarts and encodes each distinct crop of a pair once
    o_step, o_pass = _pooled(off, "step")[0], _pooled(off, "pass")[0]
    o_point = RESTARTS * (STEPS * o_step + CROPS * o_pass)
    vae = _pooled(own, "step")[1]["vae_encode"]
    unet_point = STEPS * (step5 - step5_parts["vae_encode"]) + CROPS * (
        pass5 - pass5_parts["vae_encode"]
    )
    o_pairs = [n * o_point for n in work.points]
    s_pairs = work.seconds(unet_point, vae)
    points = sum(work.points)
    o_mean, s_mean = mean(o_pairs), mean(s_pairs)
    encodes = sum(work.encodes) / len(work.encodes)
    out += [
        Row(
            SECTION,
            f"per query point, {SIZE} px",
            "official",
            o_point,
            None,
            f"{o_point / 60:.1f} min",
        ),
        Row(
            SECTION,
            f"per query point, {SIZE} px",
            "sdzero exact",
            sum(s_pairs) / points,
            None,
            f"official/sdzero {o_point * points / sum(s_pairs):.2f}x; {sum(s_pairs) / points / 60:.1f} "
            f"min; over the pairs below (encodes shared within a pair)",
        ),
        Row(
            SECTION,
            f"per pair, SPair test-360 points, {SIZE} px",
            "official",
            o_mean,
            None,
            f"{o_mean / 3600:.2f} h; {points / len(work.points):.2f} points a pair",
        ),
        Row(
            SECTION,
            f"per pair, SPair test-360 points, {SIZE} px",
            "sdzero exact",
            s_mean,
            None,
            f"official/sdzero {o_mean / s_mean:.2f}x; {s_mean / 3600:.2f} h; {encodes:.0f} VAE "
            f"encodes a pair (of {(STEPS + CROPS) * RESTARTS * points / len(work.points):.0f} "
            "crops)",
        ),
        Row(
            SECTION,
            "machine",
            "both",
            float("nan"),
            None,
            f"{line}; weights sha256-equal, {results['tensors']} tensors",
        ),
    ]
    return out
