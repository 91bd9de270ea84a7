"""The official side of ``corr-vs-official``: Hedlin et al.'s own code timed on a random-weight model.

Runs in the OLD stack (diffusers 0.8, transformers 4.26; ``setup.sh`` builds it) and imports
nothing of sdzero. Two commands:

    python official_step.py build --folder F --arch sd14|tiny
    python official_step.py time --folder F --code DIR --inputs IN.safetensors --out OUT.json

``build`` writes a diffusers-0.8 folder (``.bin`` weights, the only format 0.8 reads; modern
diffusers reads it too) with the SD-1.4 UNet and VAE (``sd14``; ``tiny``: the same topology at toy
widths) created right after ``torch.manual_seed(0)``, a placeholder text encoder (the method never
calls it; the official loader only iterates over its parameters) and a byte tokenizer.

``time`` loads the folder with the official ``load_ldm`` and calls the official functions of
``DIR/utils/optimize_token.py`` unmodified, with ``eval/eval.py``'s defaults: ``optimize_prompt``
with ``num_steps=1`` (one optimisation step: crop, VAE encode, noised full UNet forward with the
patched einsum attention, loss, backward, Adam) and ``run_image_with_tokens_cropped`` with
``num_iterations=1`` (one inference pass), each after one untimed warm-up call. The VAE encode
(``image2latent``) and the UNet forward are timed by wrappers that return the official results.
OUT.json: seconds, components, per-tensor sha256 of the UNet and VAE as loaded, peak resident
memory after the steps and after the passes, versions, machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

# eval/eval.py defaults (the official digits)
LR = 0.0023755632081200314
SIGMA = 27.97853316316864
CROP_PERCENT = 93.16549294381423
NOISE_LEVEL = -8
LAYERS = [5, 6, 7, 8]
WIDTHS = {  # arch -> (UNet block_out_channels, groups, VAE block_out_channels, VAE layers, groups)
    "sd14": ((320, 640, 1280, 1280), 32, (128, 256, 512, 512), 2, 32),
    "tiny": ((16, 16, 32, 32), 8, (8, 16, 32, 32), 1, 8),
}


def build(folder: Path, arch: str) -> float:
    """Write the random-weight folder ``folder`` (atomically); return the seconds it took."""
    import diffusers
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    start = time.perf_counter()
    unet_widths, unet_groups, vae_widths, vae_layers, vae_groups = WIDTHS[arch]
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=64,
        block_out_channels=unet_widths,
        norm_num_groups=unet_groups,
        cross_attention_dim=768,
        attention_head_dim=8,
    ).save_pretrained(str(partial / "unet"))
    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=vae_widths,
        layers_per_block=vae_layers,
        norm_num_groups=vae_groups,
        latent_channels=4,
        sample_size=512,
    ).save_pretrained(str(partial / "vae"))
    torch.manual_seed(0)
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    text.update(num_attention_heads=4, max_position_embeddings=77, bos_token_id=512)
    CLIPTextModel(CLIPTextConfig(eos_token_id=513, pad_token_id=513, **text)).save_pretrained(
        str(partial / "text_encoder")
    )
    # a byte-level vocabulary, no merges: the folder is a complete pipeline, never tokenised with
    symbols = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)]
    symbols += [chr(c) for c in range(174, 256)] + [chr(256 + c) for c in range(68)]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    src = partial / "_tokenizer_src"
    src.mkdir(exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(
        str(src / "vocab.json"), str(src / "merges.txt"), pad_token="<|endoftext|>"
    ).save_pretrained(str(partial / "tokenizer"))
    PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    ).save_pretrained(str(partial / "scheduler"))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__}
    index.update(feature_extractor=[None, None], safety_checker=[None, None])
    index.update(
        scheduler=["diffusers", "PNDMScheduler"], unet=["diffusers", "UNet2DConditionModel"]
    )
    index.update(text_encoder=["transformers", "CLIPTextModel"], vae=["diffusers", "AutoencoderKL"])
    index.update(tokenizer=["transformers", "CLIPTokenizer"])
    (partial / "model_index.json").write_text(json.dumps(index, indent=2))
    os.replace(partial, folder)  # a killed build leaves no folder that looks complete
    return time.perf_counter() - start


def digests(module: torch.nn.Module) -> dict[str, str]:
    """sha256 of each tensor's bytes, by state-dict name (diffusers 0.8 names)."""
    return {
        k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
        for k, v in module.state_dict().items()
    }


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


class Clock:
    """Seconds spent in wrapped callables, by name, since the last :meth:`reset`."""

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


def run(folder: Path, code: Path, inputs: Path, steps: int, passes: int) -> dict:
    """Time the official step and pass (module docstring)."""
    import diffusers
    import transformers
    from safetensors.torch import load_file

    sys.path.insert(0, str(code))
    with contextlib.redirect_stderr(io.StringIO()):
        from utils import optimize_token as ot
    loaded = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        ldm = ot.load_ldm("cpu", str(folder))
    load_seconds = time.perf_counter() - loaded
    data = load_file(str(inputs))
    image = data["image"].float() / 255.0  # (3, 512, 512), as the official loader gives it
    point = data["point"].float()  # (2,) x, y in the 512 frame
    clock = Clock()
    ot.image2latent = clock.wrap("vae_encode", ot.image2latent)
    ot.crop_image = clock.wrap("crop", ot.crop_image)
    ldm.unet.forward = clock.wrap("unet_forward", ldm.unet.forward)
    torch.manual_seed(0)

    def step() -> None:
        ot.optimize_prompt(
            ldm,
            image,
            point / 512,
            device="cpu",
            num_steps=1,
            upsample_res=512,
            layers=LAYERS,
            lr=LR,
            noise_level=NOISE_LEVEL,
            sigma=SIGMA,
            flip_prob=0.0,
            crop_percent=CROP_PERCENT,
        )

    context = ot.init_random_noise("cpu")

    def infer() -> None:
        ot.run_image_with_tokens_cropped(
            ldm,
            image,
            context,
            index=0,
            upsample_res=512,
            noise_level=NOISE_LEVEL,
            layers=LAYERS,
            device="cpu",
            crop_percent=CROP_PERCENT,
            num_iterations=1,
        )

    out: dict = {}
    for name, fn, repeats in (("step", step, steps), ("pass", infer, passes)):
        seconds, parts = [], []
        for k in range(repeats + 1):  # the first call warms up (allocator, kernel choice)
            clock.reset()
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # "optimization took ..." prints
                fn()
            if k:
                seconds.append(time.perf_counter() - start)
                parts.append(clock.reset())
        out[name] = {"seconds": seconds, "parts": parts, "peak_rss_gb": peak_rss_gb()}
    out.update(
        load_seconds=load_seconds,
        sha256={"unet": digests(ldm.unet), "vae": digests(ldm.vae)},
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        commit=(code / "COMMIT").read_text().strip() if (code / "COMMIT").exists() else "",
        machine={"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads()},
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("build", "time"))
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--arch", choices=sorted(WIDTHS), default="sd14")
    parser.add_argument("--code", type=Path, help="the official repository's files (utils/)")
    parser.add_argument("--inputs", type=Path, help="image (3, 512, 512) uint8 and point (2,)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.command == "build":
        result = {"built_seconds": build(args.folder, args.arch)}
    else:
        result = run(args.folder, args.code, args.inputs, args.steps, args.passes)
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
