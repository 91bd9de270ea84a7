"""OVDiff at many classes (ADE20K's 150): seconds per test image and memory, runner job ``seg-150``.

One test image (448x597, the official windows: 2 of 448², 6 of 336² and the full image) through
the official extractors with random weights (``sd`` queries at 512², ``dino`` ViT-B/8 keys, ``clip``
ViT-B/16 keys) and random prototypes of 150 classes, 65 FG and 65 BG rows each (what 32 support
images give), every class kept (no CLIP filter: the worst case for scoring; with the filter only
the stuff classes and at most 10 others are scored). Modes: the default similarity budget
(``method.score_memory_mb=256``) and a small one (32): the same scores, in more blocks. Besides
the runner's peak memory of the job (which on CPU includes the random SD 1.5 weights), each row's
note gives the prototype matrices' size, the largest similarity block and what scoring all rows at
once would hold. Row ``clip-filter``: the CLIP filter's per-image time at 150 classes (random
ViT-B/16 text and image towers): 1,023 subset prompts at most, encoded once across images.
``seg-build-flops``: the FLOPs of one class's prototypes at the official setting (meta tensors)
and the time they would take on an H200 at 40% of its bf16 peak, scaled to ovseg8's class names.

``quick=True``: the ``tiny`` architecture and tiny ViTs on a 96x128 image, seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from benchmarks.common import Row, synchronize
from benchmarks.seg_inference import random_image, random_prototypes
from benchmarks.seg_setup import FULL, QUICK, JobSetting, random_extractors
from sdzero.segmentation.bank import BYTES_PER_SCORE, PrototypeBank, rows_per_chunk
from sdzero.segmentation.features import FeatureExtractor
from sdzero.segmentation.inference import Segmenter, resize_short_side, sliding_windows

NUM_CLASSES = 150
BUDGETS_MB = (256, 32)


def many_class_bank(extractor: FeatureExtractor, classes: int = NUM_CLASSES) -> PrototypeBank:
    """Random prototypes of label indices ``0..classes-1`` (no background class)."""
    protos = {
        c: random_prototypes(f"class {c}", extractor.dim, c, extractor.name, (1, 1))
        for c in range(classes)
    }
    return PrototypeBank.build(protos)


def _seconds(fn: Callable[[], object], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def job_many_classes(device: str, quick: bool = False) -> list[Row]:
    """Seconds per image at 150 classes for each similarity budget."""
    setting: JobSetting = QUICK if quick else FULL
    _, extractors = random_extractors(setting, device)
    banks = [many_class_bank(e) for e in extractors]
    image = random_image(*setting.image)
    work = resize_short_side(image, setting.short_side).shape[1:]
    windows = sliding_windows(*work, setting.window_sizes, setting.stride)
    names = "+".join(e.name for e in extractors)
    unit = (
        f"test image {setting.image[0]}x{setting.image[1]}, {NUM_CLASSES} classes x 65 FG/BG "
        f"prototypes ({len(windows)} windows, {names})"
    )
    bank_mb = sum((b.fg.numel() + b.bg.numel()) * 4 for b in banks) / 2**20
    rows = []
    for budget in BUDGETS_MB:
        segment = Segmenter(
            extractors,
            banks,
            NUM_CLASSES,
            None,
            window_sizes=setting.window_sizes,
            stride=setting.stride,
            short_side=setting.short_side,
            score_memory_mb=budget,
            device=device,
        )
        grids = _record_grids(segment)
        if device.startswith("cuda"):  # a warm-up (kernels, allocator); on CPU one call is enough
            segment(image)
            torch.cuda.reset_peak_memory_stats()
        seconds = _seconds(lambda s=segment: s(image), device)
        peak = (
            f", CUDA peak in the timed call {torch.cuda.max_memory_allocated() / 2**30:.2f} GB"
            if device.startswith("cuda")
            else ""
        )
        rows.append(
            Row(
                "segmentation",
                unit,
                f"score_memory_mb={budget}",
                seconds,
                None,
                f"random weights ({setting.arch}); prototype matrices {bank_mb:.0f} MiB; "
                f"{_largest_block(segment, grids, budget)}{peak}",
            )
        )
    return rows


def _record_grids(segment: Segmenter) -> dict[int, tuple[int, int]]:
    """``{extractor index: (gh, gw)}`` of the largest feature grid each bank scores, filled in
    while ``segment`` runs (each bank's ``score`` is wrapped on this instance)."""
    grids: dict[int, tuple[int, int]] = {}
    for index, bank in enumerate(segment.banks):

        def score(features, kept, memory_mb, index=index, original=bank.score):
            shape = tuple(features.shape[-2:])
            if index not in grids or shape[0] * shape[1] > grids[index][0] * grids[index][1]:
                grids[index] = shape
            return original(features, kept, memory_mb)

        bank.score = score
    return grids


def _largest_block(segment: Segmenter, grids: dict[int, tuple[int, int]], budget: int) -> str:
    """The largest similarity block of any extractor vs all rows at once, for the note."""
    worst_block = worst_all = 0
    for index, bank in enumerate(segment.banks):
        cells = segment.window_batch * grids[index][0] * grids[index][1]
        block = min(rows_per_chunk(budget, cells), len(bank.fg))
        worst_block = max(worst_block, block * cells * BYTES_PER_SCORE)
        worst_all = max(worst_all, len(bank.fg) * cells * BYTES_PER_SCORE)
    return (
        f"largest similarity block {worst_block / 2**20:.0f} MiB (all rows at once: "
        f"{worst_all / 2**20:.0f} MiB) per {segment.window_batch}-window batch"
    )


def job_clip_filter(device: str, quick: bool = False) -> list[Row]:
    """The CLIP filter's seconds per image at 150 classes (first image, then a repeat)."""
    from sdzero.backbones.clip_text import build_clip_classifier
    from sdzero.segmentation.filters import ClipFilter

    name = "tiny_clip16" if quick else "clip_vitb16"
    classifier = build_clip_classifier(name, "random").to(device)
    names = {i: f"class number {i}" for i in range(NUM_CLASSES)}
    clip_filter = ClipFilter(classifier, names, device=device)
    work = resize_short_side(random_image(*(QUICK if quick else FULL).image), 448)
    with torch.no_grad():
        first = _seconds(lambda: clip_filter(work), device)
        again = _seconds(lambda: clip_filter(work), device)
    return [
        Row(
            "segmentation",
            f"CLIP filter, one image, {NUM_CLASSES} classes ({name}, random weights)",
            mode,
            seconds,
            None,
            f"{len(clip_filter._subsets)} subset prompts cached (<= 1,023 an image)",
        )
        for mode, seconds in (("first image", first), ("same image again", again))
    ]


OVSEG8_NAMES = 272  # distinct prompt names over the eight benchmarks (tests/test_suite.py)
BUILD_IMAGES, BUILD_STEPS, BUILD_SIZE = 32, 30, 512  # the official support sets (CFG: 2 passes)
GPU_SHARE = 0.4  # of the datasheet dense bf16 peak, the share the estimate assumes


def job_build_flops(device: str, quick: bool = False) -> list[Row]:
    """FLOPs of building one class's prototypes at the official setting, counted on meta tensors
    (no arithmetic runs): sampling (images x steps x 2 UNet passes, CFG), VAE decodes, the SD
    features (VAE encode + a full UNet pass: an upper bound of the truncated one), DINO ViT-B/8
    and a ViT-B/16 (CLIP's shape) at 512²; CutLER and k-means are left out (small). The row's
    seconds are the FLOPs at ``GPU_SHARE`` of an H200's dense bf16 peak: an estimate, not a
    measurement; the note scales it to the ovseg8 suite's distinct class names."""
    import timm

    from benchmarks.common import GPU_PEAKS, count_flops
    from sdzero.backbones.sd import load_stable_diffusion

    arch, size = ("tiny", 64) if quick else ("sd15", BUILD_SIZE)
    sd = load_stable_diffusion(None, arch, device="meta")
    latent = torch.zeros(2, 4, size // 8, size // 8, device="meta")
    context = torch.zeros(2, 77, sd.unet.config.cross_attention_dim, device="meta")
    pixels = torch.zeros(1, 3, size, size, device="meta")
    with torch.no_grad():
        unet = count_flops(lambda: sd.unet(latent, torch.tensor(200), context).sample) / 2
        decode = count_flops(lambda: sd.vae.decode(latent[:1]).sample)
        encode = count_flops(lambda: sd.vae.encode(pixels).latent_dist.mean)
        vits = {}
        for name, arch_name in (("dino", "vit_base_patch8_224"), ("clip", "vit_base_patch16_224")):
            with torch.device("meta"):
                model = timm.create_model(arch_name, img_size=size, num_classes=0)
            vits[name] = count_flops(lambda m=model: m(pixels))
    parts = {
        "sampling": BUILD_IMAGES * BUILD_STEPS * 2 * unet,
        "vae decode": BUILD_IMAGES * decode,
        "sd features": BUILD_IMAGES * (encode + unet),
        "dino": BUILD_IMAGES * vits["dino"],
        "clip": BUILD_IMAGES * vits["clip"],
    }
    total = sum(parts.values())
    seconds = total / (GPU_SHARE * GPU_PEAKS["H200"][2])
    breakdown = ", ".join(f"{k} {v / 1e12:.0f}" for k, v in parts.items())
    return [
        Row(
            "segmentation",
            f"prototype build per class ({BUILD_IMAGES} images x {BUILD_STEPS} steps, CFG, "
            f"{size}², {arch})",
            f"estimate at {GPU_SHARE:.0%} of H200 bf16 peak",
            seconds,
            total,
            f"TFLOP: {breakdown}; per pass: UNet {unet / 1e12:.2f}, VAE decode "
            f"{decode / 1e12:.2f}, encode {encode / 1e12:.2f}; ovseg8's {OVSEG8_NAMES} class "
            f"names: {OVSEG8_NAMES * seconds / 60:.0f} min",
        )
    ]


def jobs(quick: bool) -> dict[str, Callable[[str], list[Row]]]:
    """Runner jobs: name -> function of the device string returning table rows."""
    return {
        "seg-150": lambda device: job_many_classes(device, quick),
        "seg-150-clip-filter": lambda device: job_clip_filter(device, quick),
        "seg-build-flops": lambda device: job_build_flops(device, quick),
    }
