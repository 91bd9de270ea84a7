"""Speed of the correspondence fitting loop (SD-1.4 architecture, random weights) and the effect of
the speed options on predictions (tiny backbone, synthetic pairs).

Jobs (see ``benchmarks/run.py``):

- ``corr-<mode>-<px>``: one optimisation step for 1 embedding and for the 5 restarts of a query
  point batched (each = VAE encode of the crops + noised UNet forward to the read layers +
  backward + Adam), one inference pass (one crop), one VAE encode; then the time per query point
  at the official defaults (129 steps x 5 restarts + 20 crops x 5 restarts) and per pair of
  SPair-71k's real points per pair (``corr_pairs``). Modes: ``reference`` (full UNet, every crop
  encoded: the straightforward path), ``exact`` (the defaults: truncated UNet, latent cache),
  ``channels-last`` (exact with NHWC convolutions), ``prefetch`` (exact, VAE calls of 8 crops:
  the encode timed at that batch), ``bf16`` / ``fp16`` (autocast), ``checkpointing``,
  ``vae-bf16`` and ``taesd`` (the crop encoder options; TAESD with random weights: seconds only).
- ``corr-effect``: every option against exact mode on synthetic pairs with known answers.
- ``corr-vs-official``: the official code in its own stack beside sdzero, one run
  (``reference/ldm/side_by_side.py``; opt-in with ``SDZERO_LDM_PYTHON``).

Per query point, the VAE encodes are counted by replaying the real crop draws of a query point at
the image centre through the latent cache (no sharing with other query points of the pair assumed,
so the figure is conservative); per pair, the distinct crops of each pair's real draws
(``corr_pairs.recorded_work`` at 512 px). The rest of a step is its measured time minus its
encodes.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial

import torch

from benchmarks import corr_pairs
from benchmarks.common import Row, count_flops, synchronize, timed
from benchmarks.corr_pairs import CROPS, RESTARTS, STEPS
from sdzero.backbones.sd import load_stable_diffusion
from sdzero.correspondence.fit_config import FitConfig
from sdzero.correspondence.fitting import PromptCorrespondence, item_generator
from sdzero.correspondence.module import prepare_backbone

MODES = {
    "reference": dict(truncate=False, cache_latents=False),
    "exact": {},
    "channels-last": dict(channels_last=True),
    "prefetch": dict(prefetch_batch=8),
    "bf16": dict(autocast="bf16"),
    "fp16": dict(autocast="fp16"),
    "checkpointing": dict(checkpointing=True),
    "vae-bf16": dict(crop_encoder="vae_bf16"),
    "taesd": dict(crop_encoder="taesd", taesd_weights=None),
}
PAIRS_OFF_512 = 12  # pairs replayed for the per-pair row at other sizes (a few seconds)


def _distinct_crops(pc: PromptCorrespondence, point: tuple[float, float], shared: bool) -> tuple:
    """Distinct crops a query point's fit and inference encode, replaying the real draws."""
    gens = [item_generator(0, 0, 0, j) for j in range(RESTARTS)]
    pts = torch.tensor([point] * RESTARTS)
    groups = [0] * RESTARTS if shared else None
    opt = {box for _ in range(STEPS) for box in pc.draw_boxes(pts, gens, groups)}
    inf = {box for _ in range(CROPS - 4) for box in pc.draw_boxes(pts, gens)}
    return len(opt), len(inf) + 4


def measure(size: int, mode: str, device: str, arch: str, repeats: int = 1) -> list[Row]:
    """The component timings of one mode at one resolution, and the per-query-point total."""
    sd = load_stable_diffusion(None, arch, device=device)
    prepare_backbone(sd, FitConfig(**MODES[mode]))
    image = torch.rand(1, 3, size, size, device=device)
    rows = []
    unit = f"{size} px"
    encoder = None  # one crop encoder for every PromptCorrespondence (TAESD loads once)

    def pc_for(**kw) -> PromptCorrespondence:
        nonlocal encoder
        pc = PromptCorrespondence(sd, FitConfig(image_size=size, **MODES[mode], **kw))
        encoder = encoder or pc.crop_encoder
        pc.crop_encoder = encoder
        return pc

    def step(b: int, shared: bool = False) -> None:
        pc = pc_for(steps=1, num_embeddings=b, shared_crop=shared)
        gens = [item_generator(0, 0, 0, j) for j in range(b)]
        pc.optimise(image, torch.full((b, 2), size / 2, device="cpu"), gens, groups=[0] * b)

    def infer(b: int) -> None:
        pc = pc_for(inference_crops=1, num_embeddings=b)
        cond = torch.randn(b, 77, sd.unet.config.cross_attention_dim, device=device)
        pc.infer(image, cond, [item_generator(0, 0, 0, j) for j in range(b)])

    pc = pc_for()
    t_vae = timed(lambda: pc.encode_crops(image, [(0, 0, pc.crop)]), device, repeats)
    t_step1 = timed(partial(step, 1), device, repeats)
    t_step5 = timed(partial(step, RESTARTS), device, repeats)
    t_pass1 = timed(partial(infer, 1), device, repeats)
    t_pass5 = timed(partial(infer, RESTARTS), device, repeats)
    flops_step = count_flops(partial(step, 1))
    flops_pass = count_flops(partial(infer, 1))
    flops_vae = count_flops(lambda: pc.encode_crops(image, [(0, 0, pc.crop)]))
    rows += [
        Row("correspondence", f"VAE encode, one crop, {unit}", mode, t_vae, flops_vae),
        Row("correspondence", f"optimisation step, 1 embedding, {unit}", mode, t_step1, flops_step),
        Row(
            "correspondence",
            f"optimisation step, 5 restarts batched, {unit}",
            mode,
            t_step5,
            5 * flops_step,
            f"{t_step5 / RESTARTS:.2f} s per restart",
        ),
        Row("correspondence", f"inference pass, 1 embedding, {unit}", mode, t_pass1, flops_pass),
        Row(
            "correspondence",
            f"inference pass, 5 restarts batched, {unit}",
            mode,
            t_pass5,
            RESTARTS * (flops_pass - flops_vae) + flops_vae,  # the corner is encoded once
        ),
    ]
    cached = pc.cfg.cache_latents
    flops_unet = RESTARTS * (STEPS * (flops_step - flops_vae) + CROPS * (flops_pass - flops_vae))
    # Exact mode also gives the shared-crop option's figure: same UNet work, fewer encodes.
    for name, shared in [(mode, False)] + ([("shared crop", True)] if mode == "exact" else []):
        n_opt, n_inf = _distinct_crops(pc, (size / 2, size / 2), shared=shared)
        if not cached:
            n_opt, n_inf = STEPS * RESTARTS, CROPS * RESTARTS
        totals = {}
        for b, t_step, t_pass in [(1, t_step1, t_pass1), (RESTARTS, t_step5, t_pass5)]:
            unet_step, unet_pass = t_step - b * t_vae, t_pass - t_vae  # a pass encodes a corner
            calls = RESTARTS // b
            totals[b] = calls * (STEPS * unet_step + CROPS * unet_pass) + (n_opt + n_inf) * t_vae
        b = min(totals, key=totals.get)
        rows.append(
            Row(
                "correspondence",
                f"per query point, {unit}",
                name,
                totals[b],
                flops_unet + (n_opt + n_inf) * flops_vae,
                f"{totals[b] / 60:.1f} min; restarts {'batched' if b > 1 else 'one at a time'}; "
                f"{n_opt + n_inf} VAE encodes (of {(STEPS + CROPS) * RESTARTS})",
            )
        )
    unet_point = RESTARTS * (STEPS * (t_step5 - RESTARTS * t_vae) + CROPS * (t_pass5 - t_vae))
    t_encode = t_vae  # per crop, as a pair encodes them: one call per step, or up front
    if pc.cfg.prefetch_batch:
        boxes = [(k, k, pc.crop) for k in range(pc.cfg.prefetch_batch)]
        t_encode = timed(lambda: pc.encode_crops(image, boxes), device, repeats) / len(boxes)
        rows.append(
            Row(
                "correspondence",
                f"VAE encode, {len(boxes)} crops in one call, {unit}",
                mode,
                t_encode * len(boxes),
                flops_vae * len(boxes),
                f"{t_encode:.2f} s per crop",
            )
        )
    rows.append(_pair_row(pc, unit, mode, unet_point / RESTARTS, t_encode, flops_unet, flops_vae))
    return rows


def _pair_row(pc, unit, mode, unet_point, t_vae, flops_point, flops_vae) -> Row:
    """Seconds per pair over SPair's real points per pair: each point's UNet work (restarts
    batched) plus the pair's distinct encodes (every crop without the latent cache)."""
    if pc.size == 512:
        work, which = corr_pairs.recorded_work(), "the 360 SPair test pairs"
    else:
        pairs = corr_pairs.load_pairs(pc.size)[:PAIRS_OFF_512]
        work, which = corr_pairs.pair_work(pc, pairs), f"{len(pairs)} of the 360 SPair test pairs"
    if not pc.cfg.cache_latents:
        work = corr_pairs.PairWork(
            work.points, [n * (STEPS + CROPS) * RESTARTS for n in work.points]
        )
    seconds = work.seconds(RESTARTS * unet_point, t_vae)
    n = len(seconds)
    flops = [
        k * flops_point + e * flops_vae for k, e in zip(work.points, work.encodes, strict=True)
    ]
    return Row(
        "correspondence",
        f"per pair, SPair test points, {unit}",
        mode,
        sum(seconds) / n,
        sum(flops) / n,
        f"{sum(seconds) / n / 3600:.2f} h; {which}, {sum(work.points) / n:.2f} points and "
        f"{sum(work.encodes) / n:.0f} VAE encodes a pair",
    )


def effect(device: str, quick: bool) -> list[Row]:
    """Each option against exact mode on synthetic pairs (tiny backbone, 128 px, the target equal to
    the source so the answer is known and reachable): PCK@0.1, mean distance to the exact-mode
    predictions, seconds, mean steps taken."""
    from datamodules.synthetic_correspondence import SyntheticSPairDataset, write_synthetic_spair
    from sdzero.correspondence.module import PromptCorrespondenceModule

    pairs, steps = (2, 8) if quick else (4, 60)
    options = {
        "exact": {},
        "bf16": dict(autocast="bf16"),
        "checkpointing": dict(checkpointing=True),
        "shared crop": dict(shared_crop=True),
        "early stop (patience 8)": dict(early_stop_patience=8, early_stop_delta=0.02),
        "early stop (patience 25)": dict(early_stop_patience=25, early_stop_delta=0.02),
        "channels-last": dict(channels_last=True),
        "prefetch": dict(prefetch_batch=8),
        "crop encoder vae_bf16": dict(crop_encoder="vae_bf16"),
        "crop encoder taesd (random weights)": dict(crop_encoder="taesd", taesd_weights=None),
    }
    if device.startswith("cuda"):
        options["fp16"] = dict(autocast="fp16")
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_spair(
            tmp + "/spair", num_pairs=pairs, image_size=128, kind="identical"
        )
        data = SyntheticSPairDataset(root, split="test")
        results = {}
        for name, kw in options.items():
            module = PromptCorrespondenceModule(
                backbone={"weights": None, "arch": "tiny"},
                image_size=128,
                steps=steps,
                lr=0.2,
                num_embeddings=3,
                inference_crops=8,
                **kw,
            )
            module.setup("test")
            task = module.make_task(data)  # no Trainer here: the task is built by hand
            module.to(device)  # the module's device is where predict_pair puts the images
            module.sd.unet.to(device)
            module.sd.vae.to(device)
            preds, correct, taken = [], [], []
            t0 = time.perf_counter()
            for i in range(len(data)):
                batch = data[i]
                record = task.record(batch, module.predict(batch))
                pred = torch.tensor(record["pred_kps"])
                err = (pred - batch["trg_kps"]).norm(dim=1)
                correct.append(err <= 0.1 * record["threshold_size"])
                preds.append(pred)
                taken.append(module.method.steps_taken.float())
            synchronize(device)
            seconds = time.perf_counter() - t0
            results[name] = (torch.cat(preds), torch.cat(correct), torch.cat(taken), seconds)
    exact = results["exact"][0]
    rows = []
    for name, (pred, correct, taken, seconds) in results.items():
        moved = (pred - exact).norm(dim=1)
        rows.append(
            Row(
                "correspondence effect",
                f"{pairs} identical synthetic pairs, {len(pred)} points, tiny, 128 px, "
                f"{steps} steps",
                name,
                seconds,
                note=(
                    f"PCK@0.1 {100 * correct.float().mean():.1f}; vs exact: mean shift "
                    f"{moved.mean():.2f} px, {100 * (moved <= 1).float().mean():.0f}% within 1 px; "
                    f"steps {taken.mean():.1f}/{steps}"
                ),
            )
        )
    return rows


def jobs(quick: bool) -> dict[str, Callable[[str], list[Row]]]:
    """``corr-<mode>-<px>`` timing jobs and ``corr-effect``; ``quick`` = tiny backbone at 128 px."""
    out: dict[str, Callable[[str], list[Row]]] = {}
    sizes, arch = ((128,), "tiny") if quick else ((256, 512), "sd14")
    for size in sizes:
        for mode in MODES:
            out[f"corr-{mode}-{size}"] = partial(_timing_job, size, mode, arch)
    out["corr-effect"] = partial(effect, quick=quick)
    out["corr-vs-official"] = partial(vs_official, quick=quick)
    return out


def vs_official(device: str, quick: bool) -> list[Row]:
    """The ``corr-vs-official`` job (``reference/ldm/side_by_side.py``); ``quick``: the tiny
    architecture (still 512 px: the official code hard-codes it), one call of each kind."""
    from benchmarks.reference.ldm import side_by_side as side

    env = side.settings()
    reason = side.skip_reason(env, device)
    if reason:
        print(f"[bench] corr-vs-official skipped: {reason}", file=sys.stderr)
        return [Row(side.SECTION, "side-by-side timing", "skipped", float("nan"), note=reason)]
    results = side.run_rounds(env, quick, repeats=1 if quick else 2)
    work = corr_pairs.recorded_work()
    return side.rows(results, work, results["flops"])


def _timing_job(size: int, mode: str, arch: str, device: str) -> list[Row]:
    if mode == "fp16" and not device.startswith("cuda"):
        return []  # fp16 autocast is a GPU option
    return measure(size, mode, device, arch)


if __name__ == "__main__":
    import sys

    from benchmarks.run import main

    sys.exit(main(["--only", "corr-*", *sys.argv[1:]]))
