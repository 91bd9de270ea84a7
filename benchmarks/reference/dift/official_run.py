"""Run DIFT's official SPair evaluation (github Tsingularity/dift, unmodified) on a tiny model.

Runs in the OLD stack (diffusers 0.15, transformers 4.29; see README.md). It

1. builds the tiny random SD-2.1-topology model folder (``--model``) unless it exists;
2. extracts ``eval_spair.py`` and ``src/`` from the DIFT repository (``--mirror``, a git dir);
3. runs ``eval_spair.main`` on the SPair-layout folder ``--data`` with these shims only: CPU for
   every "cuda" (tensor/module moves, ``torch.cuda.set_device``), PyTorch's SDPA attention where
   the official code switches on xformers (a CUDA-only kernel of the same attention), import-only stand-ins for guided-diffusion (used by the
   ADM featurizer only), the featurizer built from ``--model`` instead of the
   hard-coded hub id, and the random draws injected: the VAE posterior samples and the
   ``torch.randn_like`` noise of each image come from ``--draws`` (sdzero's own per-image draws);
4. writes ``--out`` (safetensors): the official per-image features, class prompt embeddings,
   noisy UNet inputs' digests, every argmax pixel, the printed PCK lines and the tensors' sha256
   as loaded by this stack.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CUDA = ("cuda", "cuda:0")


def build_model(folder: Path) -> None:
    """The tiny SD-2.1-like model (linear projections, upcast attention, head counts per block,
    a 2-layer gelu text encoder, the SD 2.1 DDIM config), each part after torch.manual_seed(0).
    Random VAE weights give a posterior std of ~1 around means of ~0.2, so images would drown in
    their own posterior noise: the log-variance bias and the scaling factor make it behave as a
    trained VAE does, so that features (and matches) depend on the image."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(1, 2, 2, 2),  # head counts: every head 8 wide, as SD 2.1's are 64
        cross_attention_dim=16,
        use_linear_projection=True,
        upcast_attention=True,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=256,
        scaling_factor=4.5,  # latents of about unit scale, as SD's 0.18215 gives on its VAE
    )
    with torch.no_grad():  # a nearly deterministic posterior, as a trained VAE's (std ~ e^-6)
        vae.quant_conv.bias[4:] = -12.0
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=0,
        )
    )
    tok_dir = folder.parent / "_tokenizer_src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    symbols = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)]
    symbols += [chr(c) for c in range(174, 256)] + [chr(256 + c) for c in range(68)]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="!", model_max_length=77
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


def digests(module: torch.nn.Module) -> dict[str, str]:
    return {
        k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
        for k, v in module.state_dict().items()
    }


def cpu_shims() -> None:
    """Every "cuda" move lands on the CPU; xformers is a no-op (see the module docstring)."""
    real_tensor_to, real_module_to = torch.Tensor.to, torch.nn.Module.to

    def fix(args, kwargs):
        args = tuple("cpu" if a in CUDA else a for a in args)
        if kwargs.get("device") in CUDA:
            kwargs = {**kwargs, "device": "cpu"}
        return args, kwargs

    def tensor_to(self, *args, **kwargs):
        args, kwargs = fix(args, kwargs)
        return real_tensor_to(self, *args, **kwargs)

    def module_to(self, *args, **kwargs):
        args, kwargs = fix(args, kwargs)
        return real_module_to(self, *args, **kwargs)

    torch.Tensor.to = tensor_to
    torch.nn.Module.to = module_to
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    from diffusers import DiffusionPipeline

    DiffusionPipeline.to = lambda self, *a, **k: self

    def memory_efficient_attention(self, *args, **kwargs):
        # xformers' kernel is CUDA-only; PyTorch's fused SDPA computes the same attention (and,
        # like xformers, replaces the sliced processors that enable_attention_slicing set)
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet.set_attn_processor(AttnProcessor2_0())

    DiffusionPipeline.enable_xformers_memory_efficient_attention = memory_efficient_attention


def import_only_stubs() -> None:
    """``eval_spair.py`` imports the ADM featurizer, which imports openai's guided-diffusion
    (not a package); the SD path never calls it, so empty stand-ins satisfy the import."""
    import types

    for name in ("guided_diffusion", "guided_diffusion.script_util", "guided_diffusion.nn"):
        stub = types.ModuleType(name)
        stub.create_model_and_diffusion = stub.timestep_embedding = None
        sys.modules[name] = stub


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("mirror", "model", "data", "draws", "out", "work"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--seed", type=int, required=True, help="the run seed keying the draws")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--t", type=int, default=261)
    parser.add_argument("--up-ft-index", type=int, default=1)
    parser.add_argument("--ensemble-size", type=int, default=8)
    opts = parser.parse_args()
    work, model, data = Path(opts.work), Path(opts.model), Path(opts.data)
    if not model.exists():
        build_model(model)
    src = work / "dift_src"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", f"--git-dir={opts.mirror}", "archive", "HEAD", "eval_spair.py", "src"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    commit = (
        subprocess.run(
            ["git", f"--git-dir={opts.mirror}", "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .strip()
    )
    sys.path.insert(0, str(src))
    cpu_shims()
    import_only_stubs()

    import diffusers.models.vae as vae_module
    import eval_spair
    from src.models import dift_sd
    from transformers import CLIPTextModel

    draws = load_file(opts.draws)
    current: dict[str, str] = {}
    real_randn_tensor, real_randn_like = vae_module.randn_tensor, torch.randn_like

    def posterior_draw(shape, **kwargs):
        eps = draws[f"{current['name']}.posterior"]
        assert tuple(eps.shape) == tuple(shape), (eps.shape, shape)
        return eps.to(kwargs.get("dtype") or eps.dtype)

    def noise_draw(latents, *a, **k):
        eps = draws[f"{current['name']}.noise"]
        assert eps.shape == latents.shape, (eps.shape, latents.shape)
        return eps.to(latents.dtype)

    unet_inputs: dict[str, str] = {}
    real_unet_forward = dift_sd.MyUNet2DConditionModel.forward

    def unet_forward(self, sample, *a, **k):
        unet_inputs[current["name"]] = hashlib.sha256(sample.numpy().tobytes()).hexdigest()
        return real_unet_forward(self, sample, *a, **k)

    dift_sd.MyUNet2DConditionModel.forward = unet_forward
    featurizers = []
    real_forward = dift_sd.SDFeaturizer4Eval.forward

    def forward(self, img, *a, **k):
        current["name"] = os.path.relpath(img.filename, data).replace(os.sep, "/")
        vae_module.randn_tensor, torch.randn_like = posterior_draw, noise_draw
        try:
            return real_forward(self, img, *a, **k)
        finally:
            vae_module.randn_tensor, torch.randn_like = real_randn_tensor, real_randn_like

    dift_sd.SDFeaturizer4Eval.forward = forward

    def featurizer(cat_list):
        made = dift_sd.SDFeaturizer4Eval(sd_id=str(model), cat_list=cat_list)
        featurizers.append(made)
        return made

    eval_spair.SDFeaturizer4Eval = featurizer
    argmaxes: list[tuple[int, int]] = []
    real_unravel = np.unravel_index

    def unravel(index, shape):
        got = real_unravel(index, shape)
        argmaxes.append((int(got[0]), int(got[1])))
        return got

    np.unravel_index = unravel
    save = work / "official_features"
    args = argparse.Namespace(
        dataset_path=str(data),
        save_path=str(save),
        dift_model="sd",
        img_size=[opts.img_size, opts.img_size],
        t=opts.t,
        up_ft_index=opts.up_ft_index,
        ensemble_size=opts.ensemble_size,
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        eval_spair.main(args)
    np.unravel_index = real_unravel

    # the order eval_spair.main visited the pairs in (its own listing rules, same directory state)
    test_dir = data / "PairAnnotation" / "test"
    json_list = os.listdir(test_dir)
    all_cats = os.listdir(data / "JPEGImages")
    order = [j for cat in all_cats for j in json_list if cat in j]
    tensors: dict[str, torch.Tensor] = {}
    pairs, at = [], 0
    for name in order:
        pair = json.loads((test_dir / name).read_text())
        n = len(pair["src_kps"])
        yx = torch.tensor(argmaxes[at : at + n], dtype=torch.int64).reshape(-1, 2)
        tensors[f"pred.{pair['filename']}"] = yx.flip(1)  # (x, y) = (column, row)
        pairs.append(pair["filename"])
        at += n
    assert at == len(argmaxes), (at, len(argmaxes))
    for cat in all_cats:
        for image, ft in torch.load(save / f"{cat}.pth").items():
            tensors[f"features.JPEGImages/{cat}/{image}"] = ft[0].contiguous()
    for cat, emb in featurizers[0].cat2prompt_embeds.items():
        tensors[f"prompt.{cat}"] = emb[0].contiguous()
    pipe = featurizers[0].pipe
    meta = {
        "dift_commit": commit,
        "seed": opts.seed,
        "images": sorted({k.rsplit(".", 1)[0] for k in draws}),
        "settings": {
            "img_size": opts.img_size,
            "t": opts.t,
            "up_ft_index": opts.up_ft_index,
            "ensemble_size": opts.ensemble_size,
        },
        "printed": printed.getvalue().splitlines(),
        "pairs": pairs,
        "unet_input_sha256": unet_inputs,
        "draws_sha256": {
            k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in sorted(draws.items())
        },
        "versions": {
            m: __import__(m).__version__
            for m in ("torch", "diffusers", "transformers", "numpy", "PIL")
        },
        "attention": {k: type(v).__name__ for k, v in list(pipe.unet.attn_processors.items())[:1]},
        "sha256": {
            "unet": digests(pipe.unet),
            "vae.encoder": digests(pipe.vae.encoder),
            "text_encoder": digests(CLIPTextModel.from_pretrained(str(model / "text_encoder"))),
        },
    }
    save_file(tensors, opts.out, metadata={"meta": json.dumps(meta)})
    print("\n".join(meta["printed"]))


if __name__ == "__main__":
    main()
