"""Speed of the student (``method=student``) at test time and in training, beside ``ldm_corr`` and
``dift`` at the same image size. Random weights: seconds and FLOPs only.

Jobs (see ``benchmarks/run.py``; ``--quick``: the tiny SD and DINOv2 at 128 px):

- ``student-<px>``: the student as ``distill_spair`` runs it (SD 2.1 up block 1 through DIFT's
  features, ensemble 1; DINOv2 ViT-B/14 tokens; the default head), on a 500 x 375 pair with SPair's
  mean of 7 query points: the frozen features of one image; one pair at test time with its features
  computed (both images through the backbones, then the head and the nearest-neighbour lookup) and
  with them read from ``method.feature_cache`` (key digest, disk read, head, lookup); one training
  step on 8 such pairs with 64 labels each from cached features (head forward and backward, AdamW);
  and GPU-minute estimates (``bench_dift.gpu_rows``: FLOPs at a stated share of the datasheet peak)
  of the full SPair test split and of one epoch on SPair ``trn``.
- ``student-vs-ldm-<px>``: ``ldm_corr``'s seconds per pair over SPair's real test points
  (``bench_correspondence.measure``, exact mode, SD 1.4) and ``dift``'s per pair (SD 2.1, ensemble
  8, image-resolution matching), each beside the student's per pair at the same size, with the
  ratio.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import partial

import torch

from benchmarks.bench_dift import SPAIR_IMAGES, SPAIR_PAIRS, gpu_rows
from benchmarks.common import Row, count_flops, timed

POINTS = 7  # SPair test points per pair, the mean over the 360 DHF pairs (corr_pairs)
LABELS, BATCH = 64, 8  # a training pair's labels (grid:8) and pairs per step
SPAIR_TRN_PAIRS = 53_340
SECTION = "student"


def _settings(size: int, quick: bool) -> dict:
    """The student's keys at side ``size``: ``distill_spair``'s (DINO frame 840 for 768) or the
    tiny models'."""
    if quick:
        return dict(image_size=size, dino_model="tiny_dinov2", dino_size=112, head_channels=32)
    return dict(image_size=size, dino_size={512: 518, 768: 840}[size])


def build(size: int, quick: bool, device: str, cache: str | None = None) -> object:
    """A student with random backbones on ``device`` (its head is random too: speed only)."""
    from sdzero.correspondence.student import Student

    arch = "tiny" if quick else "sd21"
    module = Student(
        {"weights": None, "arch": arch},
        0,
        dino_weights="random",
        feature_cache=cache,
        **_settings(size, quick),
    )
    module.setup("fit")
    module.to(device)
    module.frozen.module.to(device)
    return module.eval()


def _pair(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=generator)
    trg = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=generator)
    return src, trg, torch.rand(POINTS, 2, generator=generator) * torch.tensor([500.0, 375.0])


def per_pair(module: object, cached: bool) -> Callable[[], object]:
    """One test-time pair: ``predict_pair`` on new image names (features computed) or on the
    same names again (read from the cache)."""
    from sdzero.correspondence.base import PairInfo

    src, trg, points = _pair(str(module.device))
    calls = iter(range(10**6))

    def run() -> object:
        k = 0 if cached else next(calls)
        pair = PairInfo(src_name=f"src{k}", trg_name=f"trg{k}")
        with torch.no_grad():
            return module.predict_pair(src, trg, points, pair)

    return run


def training_step(module: object) -> Callable[[], None]:
    """One optimiser step on :data:`BATCH` pairs of :data:`LABELS` labels, features cached."""
    src, trg, _ = _pair(str(module.device))
    generator = torch.Generator().manual_seed(1)
    batch = [
        {
            "src_img": src,
            "trg_img": trg,
            "src_name": f"train-src{b}",
            "trg_name": f"train-trg{b}",
            "category": "cat",
            "src_kps": torch.rand(LABELS, 2, generator=generator) * torch.tensor([500.0, 375.0]),
            "trg_kps": torch.rand(LABELS, 2, generator=generator) * torch.tensor([500.0, 375.0]),
        }
        for b in range(BATCH)
    ]
    optimizer = torch.optim.AdamW(module.head.parameters(), lr=1e-4)

    def run() -> None:
        module.train()
        scores, labels, _ = module._scores(batch)
        loss = torch.nn.functional.cross_entropy(scores / module.settings.temperature, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.eval()

    return run


def student_rows(size: int, device: str, quick: bool) -> list[Row]:
    """The ``student-<px>`` rows (module docstring)."""
    unit = f"{size} px"
    with tempfile.TemporaryDirectory() as folder:
        module = build(size, quick, device, cache=folder)
        image = torch.rand(1, 3, size, size, device=device)
        frozen = module.frozen.module

        def features() -> object:
            return frozen(image, ["x"], "cat")

        t_image, f_image = timed(features, device), count_flops(features)
        plain = build(size, quick, device)  # no cache: every pair computes its features
        t_pair, t_cached = (
            timed(per_pair(plain, False), device),
            timed(per_pair(module, True), device),
        )
        maps = module.backbone_features(image, "x", "cat")[None]
        f_head = count_flops(lambda: module._descriptors(maps))
        step = training_step(module)
        t_step = timed(step, device)
        f_step = count_flops(step)
    f_pair = 2 * f_image + 2 * f_head
    rows = [
        Row(SECTION, f"frozen features, one image, {unit}", "sd+dino", t_image, f_image),
        Row(
            SECTION,
            f"per pair, {POINTS} points, features computed, {unit}",
            "student",
            t_pair,
            f_pair,
        ),
        Row(
            SECTION,
            f"per pair, {POINTS} points, features cached, {unit}",
            "student",
            t_cached,
            2 * f_head,
            "cache read of both images, head, nearest-neighbour lookup",
        ),
        Row(
            SECTION,
            f"training step, {BATCH} pairs x {LABELS} labels, features cached, {unit}",
            "student",
            t_step,
            f_step,
            f"{SPAIR_TRN_PAIRS // BATCH} steps an epoch on SPair trn: "
            f"{SPAIR_TRN_PAIRS // BATCH * t_step / 3600:.1f} h here",
        ),
    ]
    test = SPAIR_IMAGES * f_image + 2 * SPAIR_PAIRS * f_head
    rows += gpu_rows(
        SECTION, f"full SPair test: {SPAIR_PAIRS} pairs, {unit}", "student", test, quick
    )
    epoch = SPAIR_IMAGES * f_image + SPAIR_TRN_PAIRS // BATCH * f_step
    rows += gpu_rows(
        SECTION, f"first epoch on SPair trn (features computed), {unit}", "student", epoch, quick
    )
    return rows


def versus_rows(size: int, device: str, quick: bool) -> list[Row]:
    """The ``student-vs-ldm-<px>`` rows (module docstring)."""
    from benchmarks.bench_correspondence import measure
    from sdzero.correspondence.dift import DIFT

    arch, sd21 = ("tiny", "tiny") if quick else ("sd14", "sd21")
    ldm = [r for r in measure(size, "exact", device, arch) if r.unit.startswith("per pair")]
    dift = DIFT({"weights": None, "arch": sd21}, 0, image_size=size, ensemble_size=8)
    dift.setup("fit")
    dift.to(device)
    dift.sd.to(device)
    t_dift = timed(per_pair(dift.eval(), False), device)
    t_student = timed(per_pair(build(size, quick, device), False), device)
    rows = [*ldm, Row("student vs", f"per pair, {POINTS} points, {size} px", "dift", t_dift)]
    rows.append(Row("student vs", f"per pair, {POINTS} points, {size} px", "student", t_student))
    for name, seconds in (("ldm_corr", ldm[0].seconds), ("dift", t_dift)):
        rows.append(
            Row(
                "student vs",
                f"per pair, {size} px: the student against {name}",
                f"{seconds / t_student:.0f}x faster",
                t_student,
                note=f"{name} {seconds:.1f} s a pair, the student {t_student:.2f} s",
            )
        )
    return rows


def jobs(quick: bool) -> dict[str, Callable[[str], list[Row]]]:
    """``student-<px>`` (512 and 768; ``quick``: 128) and ``student-vs-ldm-<px>`` (512; 128)."""
    sizes, versus = ((128,), 128) if quick else ((512, 768), 512)
    out: dict[str, Callable[[str], list[Row]]] = {
        f"student-{size}": partial(_first_device, student_rows, size, quick) for size in sizes
    }
    out[f"student-vs-ldm-{versus}"] = partial(_first_device, versus_rows, versus, quick)
    return out


def _first_device(fn: Callable, size: int, quick: bool, device: str) -> list[Row]:
    return fn(size, device, quick)


if __name__ == "__main__":
    import sys

    from benchmarks.run import main

    sys.exit(main(["--only", "student-*", *sys.argv[1:]]))
