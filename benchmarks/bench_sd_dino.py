"""Speed of sdzero's ``method=sd_dino`` per image and per pair, and the GPU-minute estimate of a
full SPair-71k test run. The official SD+DINO stack needs ODISE and detectron2 and is not built
here: no official ratio. Random SD 1.5 and DINOv2 ViT-B/14 (tiny ones with ``--quick``).

Jobs: ``sd_dino-448`` (reduced: one SD window; the first co-PCA cut to the 98 cells a pair of its
7 x 7 maps has) and ``sd_dino-960`` (the defaults, with the estimate); ``--quick``:
``sd_dino-128``. Pair lists, rounds and the estimate's rule as in ``bench_dift.py``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from benchmarks import dift_side as side
from benchmarks.bench_dift import SPAIR_IMAGES, SPAIR_PAIRS, gpu_rows, work_folder
from benchmarks.common import Row, count_flops


def sd_dino_job(size: int, dino_size: int, quick: bool, device: str) -> list[Row]:
    """``sd_dino-<px>``: per image and per pair of sdzero's sd_dino (random SD 1.5 and DINOv2
    ViT-B/14; tiny ones in quick mode), and at the default size its GPU-minute estimate."""
    from sdzero.backbones.sd_features import unet_features
    from sdzero.correspondence.sd_dino import SDDINO
    from sdzero.correspondence.sd_windows import output_block_input, window_offsets

    arch, dino = ("tiny", "tiny_dinov2") if quick else ("sd15", "dinov2_vitb14")
    rows, section = [], "sd_dino (sdzero only)"
    with tempfile.TemporaryDirectory(dir=work_folder()) as name:
        tmp = Path(name)
        images = 1 if size == 960 else 2  # one image (matched with itself) at the default size
        setting = side.Setting(str(size), size, 1, images=images, pairs=images + 1)
        data = side.write_pair_list(tmp / "data", setting, 128 if quick else 448)
        method = SDDINO(
            {"weights": None, "arch": arch},
            seed=side.SEED,
            image_size=size,
            dino_size=dino_size,
            dino_model=dino,
            dino_weights="random",
            feature_cache=str(tmp / "cache"),
            pca_dims=_pca_dims(size, quick),
        )
        method.setup("test")
        method.to(device)
        method.eval()
        t = side.method_round(method, data)
        pair_flops = side.pair_flops(method, data)
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
    if s.pca_dims != (256, 256, 256):
        unit += f", co-PCA {list(s.pca_dims)}"
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
            f"per pair, list of {t.pairs} pairs on {t.images} image(s)",
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


def _pca_dims(size: int, quick: bool) -> tuple[int, ...]:
    """The official co-PCA dimensions (256 each), each cut to the cells a pair of its maps has
    (block 2's grid is 1/64 of the side: 7 x 7 at 448 px, so 98 cells a pair; 4 for quick)."""
    if quick:
        return (4, 4, 4)
    return tuple(min(256, 2 * (size // stride) ** 2) for stride in (64, 32, 16))


def jobs(quick: bool) -> dict[str, Callable[[str], list[Row]]]:
    """``sd_dino-<px>`` at the reduced and the default size."""
    sizes = ((128, 112),) if quick else ((448, 392), (960, 840))
    return {f"sd_dino-{size}": partial(_job, size, dino, quick) for size, dino in sizes}


def _job(size: int, dino_size: int, quick: bool, device: str) -> list[Row]:
    return sd_dino_job(size, dino_size, quick, device)


if __name__ == "__main__":
    from benchmarks.run import main

    sys.exit(main(["--only", "sd_dino-*", *sys.argv[1:]]))
