"""Speed of ``method=dift`` against DIFT's official code, of ``method=sd_dino``, and GPU-minute
estimates of a full SPair-71k test run. Random weights: seconds and FLOPs only.

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
- ``sd_dino-<px>``: sdzero's ``sd_dino`` per image and per pair (the official SD+DINO stack
  needs ODISE and detectron2 and is not built here: no ratio); at the default size also its
  GPU-minute estimate.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import dift_side as side
from benchmarks.common import GPU_PEAKS, Row, count_flops

SPAIR_PAIRS = 12_234  # SPair-71k test pairs
# SPair-71k holds 1,800 images in all; the test split's distinct images are at most that, so
# 12,234 / 1,800 = 6.8 pairs per image is the least sharing the real split can have
SPAIR_IMAGES = 1_800
EFFICIENCY = 0.4  # assumed fraction of the datasheet peak a UNet/VAE pass reaches (estimate)
ESTIMATE_GPUS = ("A100", "H100")  # GPU_PEAKS keys: TF32 dense peak (fp32 code on tensor cores)
SETTINGS = (
    side.Setting("reduced", 256, 8, images=2, pairs=4),
    side.Setting("default size, ensemble 2", 768, 2, images=1, pairs=2),
)
QUICK_SETTINGS = (
    side.Setting("reduced", 64, 8, images=2, pairs=4),
    side.Setting("default size, ensemble 2", 128, 2, images=1, pairs=2),
)
SECTION = "dift vs official"


def _skip(reason: str) -> list[Row]:
    print(f"[bench] dift-vs-official skipped: {reason}", file=sys.stderr)
    return [Row(SECTION, "side-by-side timing", "skipped", float("nan"), note=reason)]


def _work() -> Path:
    default = Path(tempfile.gettempdir()) / "sdzero-dift-bench"
    work = Path(os.environ.get("SDZERO_DIFT_WORK") or default)
    work.mkdir(parents=True, exist_ok=True)
    return work


def dift_component_flops(folder_or_arch: str, img_size: int) -> tuple[float, float]:
    """FLOPs of one VAE encode of one image and of one copy's UNet pass to up block 1, at
    ``img_size``, counted on meta tensors (no arithmetic runs). ``folder_or_arch``: a model
    folder or an architecture name."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdzero.backbones.sd import load_stable_diffusion
    from sdzero.backbones.sd_features import up_block_features

    path = Path(folder_or_arch)
    if path.is_dir():  # the folder's architecture, built on meta from its configs
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(path / "vae"))
        sd = SimpleNamespace(unet=unet, vae=vae)
    else:
        sd = load_stable_diffusion(None, folder_or_arch, device="meta")
    x = torch.zeros(1, 3, img_size, img_size, device="meta")
    latents = torch.zeros(1, 4, img_size // 8, img_size // 8, device="meta")
    context = torch.zeros(1, 77, sd.unet.config.cross_attention_dim, device="meta")
    with torch.no_grad():
        vae = count_flops(lambda: sd.vae.encode(x).latent_dist.mean)
        unet = count_flops(lambda: up_block_features(sd, latents, 261, context, [1]))
    return vae, unet


def _digests_comparable(digests: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Per-tensor sha256 under one naming: diffusers 0.15's VAE attention names, text-model
    tensors without transformers' ``text_model.`` prefix, no ``position_ids`` buffer."""
    renames = [
        ("to_q.", "query."),
        ("to_k.", "key."),
        ("to_v.", "value."),
        ("to_out.0.", "proj_attn."),
    ]
    out = {}
    for part, table in digests.items():
        fixed = {}
        for name, digest in table.items():
            if name.endswith("position_ids"):
                continue
            name = name.removeprefix("text_model.")
            for a, b in renames:
                name = name.replace(f"mid_block.attentions.0.{a}", f"mid_block.attentions.0.{b}")
            fixed[name] = digest
        out[part] = fixed
    return out


def _sdzero_digests(sd) -> dict[str, dict[str, str]]:
    import hashlib

    def table(module: torch.nn.Module) -> dict[str, str]:
        return {
            k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
            for k, v in module.state_dict().items()
        }

    return {
        "unet": table(sd.unet),
        "vae.encoder": table(sd.vae.encoder),
        "text_encoder": table(sd.text_encoder),
    }


def sdzero_round(model: Path, datas: dict, settings, first: bool, tmp: Path) -> dict:
    """One sdzero round: ``method=dift`` loaded from ``model`` on each setting's pair list, with
    a fresh feature-cache folder; in the ``first`` round also the weights' digests and the
    matching FLOPs of one pair (features cached)."""
    from sdzero.backbones.sd import load_stable_diffusion
    from sdzero.correspondence.dift import DIFT

    sd = load_stable_diffusion(str(model), text_encoder=True)
    out: dict = {"timings": {}, "match_flops": {}}
    if first:
        out["sha256"] = _sdzero_digests(sd)
    for s in settings:
        with tempfile.TemporaryDirectory(dir=tmp) as cache:
            method = DIFT(
                {"weights": str(model), "arch": None},
                seed=side.SEED,
                image_size=s.img_size,
                ensemble_size=s.ensemble,
                feature_cache=cache,
            )
            method.sd = sd
            method.eval()
            out["timings"][s.name] = side.method_round(method, datas[s.name], keep_features=True)
            if first:
                out["match_flops"][s.name] = _pair_flops(method, datas[s.name])
    del sd, method
    gc.collect()
    return out


def _pair_flops(method, data: Path) -> float:
    """FLOPs of one :meth:`predict_pair` of the list's first pair, its features cached."""
    from datamodules.spair import SPairDataset
    from sdzero.correspondence.base import PairInfo

    item = SPairDataset(data)[0]
    pair = PairInfo(
        index=0, category=item["category"], src_name=item["src_name"], trg_name=item["trg_name"]
    )
    return count_flops(
        lambda: method.predict_pair(item["src_img"], item["trg_img"], item["src_kps"], pair)
    )


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
    work = _work()
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
                mine.append(sdzero_round(model, datas, settings, not mine, tmp))
    theirs = _digests_comparable(official[0]["sha256"])
    ours = _digests_comparable(mine[0]["sha256"])
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
        flops = dift_component_flops(str(model), s.img_size)
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
    vae, unet = dift_component_flops(arch, size)
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


def sd_dino_job(size: int, dino_size: int, quick: bool, device: str) -> list[Row]:
    """``sd_dino-<px>``: per image and per pair of sdzero's sd_dino (random SD 1.5 and DINOv2
    ViT-B/14; tiny ones in quick mode), and at the default size its GPU-minute estimate."""
    from sdzero.backbones.sd_features import unet_features
    from sdzero.correspondence.sd_dino import SDDINO
    from sdzero.correspondence.sd_windows import output_block_input, window_offsets

    arch, dino = ("tiny", "tiny_dinov2") if quick else ("sd15", "dinov2_vitb14")
    rows, section = [], "sd_dino (sdzero only)"
    with tempfile.TemporaryDirectory(dir=_work()) as name:
        tmp = Path(name)
        setting = side.Setting(str(size), size, 1, images=2, pairs=3)
        data = side.write_pair_list(tmp / "data", setting, 128 if quick else 448)
        method = SDDINO(
            {"weights": None, "arch": arch},
            seed=side.SEED,
            image_size=size,
            dino_size=dino_size,
            dino_model=dino,
            dino_weights="random",
            feature_cache=str(tmp / "cache"),
            **({"pca_dims": (4, 4, 4)} if quick else {}),  # the tiny maps have 8 cells a pair
        )
        method.setup("test")
        method.to(device)
        method.eval()
        t = side.method_round(method, data)
        pair_flops = _pair_flops(method, data)
        # per-image FLOPs by parts on meta tensors: windows x (VAE + UNet to the last block) + DINO
        s, sd = method.settings, method.sd.to("meta")
        crop = min(s.sd_window, size)
        windows = len(window_offsets(size, s.sd_window)) ** 2
        names = [output_block_input(sd.unet, int(i)) for i in s.unet_blocks]
        x = torch.zeros(1, 3, crop, crop, device="meta")
        latents = torch.zeros(1, 4, crop // 8, crop // 8, device="meta")
        context = torch.zeros(1, 77, sd.unet.config.cross_attention_dim, device="meta")
        picture = torch.zeros(1, 3, dino_size, dino_size, device="meta")
        dino_model = method.dino.to("meta")
        with torch.no_grad():
            vae = count_flops(lambda: sd.vae.encode(x).latent_dist.mean)
            unet = count_flops(
                lambda: unet_features(sd, latents, s.timestep, context, outputs=names)
            )
            vit = count_flops(lambda: dino_model(picture))
    per_image = windows * (vae + unet) + vit
    unit = f"{size} px SD ({windows} windows of {crop}), DINO {dino_size} px"
    ratio = SPAIR_PAIRS / SPAIR_IMAGES
    img = statistics.mean(t.per_image)
    rows += [
        Row(
            section,
            f"features per image, {unit}",
            "sdzero",
            img,
            per_image,
            "official SD+DINO needs ODISE + detectron2: not built here, no ratio",
        ),
        Row(
            section,
            f"per pair, list of {t.pairs} pairs on 2 images",
            "sdzero (feature cache)",
            t.loop / t.pairs,
            note=f"one-time {t.once:.2f} s in the first pair",
        ),
        Row(
            section,
            f"per pair, matching only ({side.KEYPOINTS} keypoints; co-PCA)",
            "sdzero",
            t.rest,
            pair_flops,
        ),
        Row(
            section,
            f"per pair at SPair test's {ratio:.1f} pairs per image",
            "sdzero (feature cache)",
            img / ratio + t.rest,
        ),
        Row(
            section,
            f"per pair at SPair test's {ratio:.1f} pairs per image",
            "sdzero (no cache)",
            2 * img + t.rest,
            note="both images extracted every pair (method.feature_cache unset)",
        ),
    ]
    if quick or size == 960:
        total = SPAIR_IMAGES * per_image + SPAIR_PAIRS * pair_flops
        unit = f"full SPair test: {SPAIR_PAIRS} pairs, <= {SPAIR_IMAGES} images, {size} px"
        rows += gpu_rows("sd_dino GPU estimate", unit, "sdzero", total, quick)
    return rows


def jobs(quick: bool) -> dict[str, Callable[[str], list[Row]]]:
    """``dift-vs-official``, ``dift-gpu-estimate`` and ``sd_dino-<px>`` (reduced and default)."""
    sizes = ((128, 112),) if quick else ((448, 392), (960, 840))
    out: dict[str, Callable[[str], list[Row]]] = {
        "dift-vs-official": partial(_device_first, side_by_side, quick),
        "dift-gpu-estimate": partial(_device_first, dift_estimate, quick),
    }
    for size, dino_size in sizes:
        out[f"sd_dino-{size}"] = partial(_sd_dino, size, dino_size, quick)
    return out


def _device_first(fn: Callable[[str, bool], list[Row]], quick: bool, device: str) -> list[Row]:
    return fn(device, quick)


def _sd_dino(size: int, dino_size: int, quick: bool, device: str) -> list[Row]:
    return sd_dino_job(size, dino_size, quick, device)


if __name__ == "__main__":
    from benchmarks.run import main

    sys.exit(main(["--only", "dift-*", "sd_dino-*", *sys.argv[1:]]))
