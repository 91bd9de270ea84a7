"""What both old-stack scripts share (``official_run.py``: the fixture; ``official_speed.py``: the
timings): the random-weight model folders, the CPU shims, DIFT's code from its git dir, and the
hooks that inject sdzero's random draws into the official featurizer and time it.

Runs in the OLD stack (diffusers 0.15, transformers 4.29; see README.md); imports nothing of sdzero.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CUDA = ("cuda", "cuda:0")
ARCHS = ("tiny", "sd21")


def _unet_vae_text(arch: str) -> tuple[dict, dict, dict]:
    """Constructor arguments of the UNet, the VAE and the CLIP text config of ``arch``.

    ``tiny``: the SD-2.1-like toy of the fidelity fixture (linear projections, upcast attention,
    head counts per block, every head 8 wide as SD 2.1's are 64). ``sd21``: the SD 2.1 (768-v)
    UNet and VAE at full size (as ``stabilityai/stable-diffusion-2-1``'s configs); its text
    encoder keeps SD 2.1's width (1024, what the UNet attends to) with 2 layers instead of 23:
    it only makes the per-category prompt embeddings, computed once per run and never timed."""
    blocks = dict(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        use_linear_projection=True,
        upcast_attention=True,
    )
    vae_blocks = dict(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
    )
    text = dict(
        vocab_size=514,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=0,
        num_hidden_layers=2,
    )
    if arch == "tiny":
        unet = dict(
            sample_size=32,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=2,
            norm_num_groups=4,
            attention_head_dim=(1, 2, 2, 2),
            cross_attention_dim=16,
            **blocks,
        )
        vae = dict(
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=256,
            scaling_factor=4.5,  # latents of about unit scale, as SD's 0.18215 gives on its VAE
            **vae_blocks,
        )
        text.update(hidden_size=16, intermediate_size=32, num_attention_heads=2)
        return unet, vae, text
    unet = dict(
        sample_size=96,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        **blocks,
    )
    vae = dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        sample_size=768,
        scaling_factor=0.18215,
        **vae_blocks,
    )
    text.update(hidden_size=1024, intermediate_size=4096, num_attention_heads=16)
    return unet, vae, text


def build_model(folder: Path, arch: str = "tiny") -> None:
    """A random-weight SD-2.1-topology folder (``arch``: see :func:`_unet_vae_text`), each part
    after torch.manual_seed(0), a 514-symbol byte tokenizer and SD 2.1's DDIM config.
    Random VAE weights give a posterior std of ~1 around means of ~0.2, so images would drown in
    their own posterior noise: the log-variance bias makes it behave as a trained VAE does, so
    that features (and matches) depend on the image."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_args, vae_args, text_args = _unet_vae_text(arch)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_args)
    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_args)
    with torch.no_grad():  # a nearly deterministic posterior, as a trained VAE's (std ~ e^-6)
        vae.quant_conv.bias[4:] = -12.0
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_args))
    tok_dir = folder.parent / f"_tokenizer_src_{arch}"
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
    partial = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(str(partial), safe_serialization=True)
    os.replace(partial, folder)  # a killed build leaves no folder that looks complete


def digests(module: torch.nn.Module) -> dict[str, str]:
    """sha256 of each tensor's bytes, by state-dict name."""
    return {
        k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
        for k, v in module.state_dict().items()
    }


def model_digests(pipe, model: Path) -> dict[str, dict[str, str]]:
    """Per-tensor sha256 of the UNet, the VAE encoder and the text encoder as this stack loads
    them (the official featurizer drops its text encoder, so that one is loaded again)."""
    from transformers import CLIPTextModel

    return {
        "unet": digests(pipe.unet),
        "vae.encoder": digests(pipe.vae.encoder),
        "text_encoder": digests(CLIPTextModel.from_pretrained(str(model / "text_encoder"))),
    }


def cpu_shims() -> None:
    """Every "cuda" move lands on the CPU; xformers becomes PyTorch's SDPA (README.md)."""
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


def official_code(mirror: str, work: Path) -> str:
    """Extract ``eval_spair.py`` and ``src/`` of DIFT's git dir ``mirror`` into ``work/dift_src``,
    put it first on ``sys.path``, install the shims and stubs; return the commit."""
    src = work / "dift_src"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", f"--git-dir={mirror}", "archive", "HEAD", "eval_spair.py", "src"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    commit = subprocess.run(
        ["git", f"--git-dir={mirror}", "rev-parse", "HEAD"], check=True, capture_output=True
    )
    sys.path.insert(0, str(src))
    cpu_shims()
    import_only_stubs()
    return commit.stdout.decode().strip()


class Hooks:
    """Wraps the official featurizer (call after :func:`official_code`): its random draws come
    from ``draws`` (``{image}.posterior`` / ``{image}.noise``, the image named by its path under
    ``data``), each ``forward`` call is timed (``self.seconds``: image name -> seconds), the
    featurizers made by ``eval_spair`` are kept (``self.featurizers``) and, with ``reuse``, made
    once and reused by later ``eval_spair.main`` calls (``self.build_seconds``: each build)."""

    def __init__(self, model: Path, data: Path, draws: dict, reuse: bool = False) -> None:
        import diffusers.models.vae as vae_module
        import eval_spair
        from src.models import dift_sd

        self.data, self.draws = data, draws
        self.current: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.featurizers: list = []
        self.build_seconds: list[float] = []
        real_randn_tensor, real_randn_like = vae_module.randn_tensor, torch.randn_like

        def posterior_draw(shape, **kwargs):
            eps = self.draws[f"{self.current['name']}.posterior"]
            assert tuple(eps.shape) == tuple(shape), (eps.shape, shape)
            return eps.to(kwargs.get("dtype") or eps.dtype)

        def noise_draw(latents, *a, **k):
            eps = self.draws[f"{self.current['name']}.noise"]
            assert eps.shape == latents.shape, (eps.shape, latents.shape)
            return eps.to(latents.dtype)

        real_forward = dift_sd.SDFeaturizer4Eval.forward

        def forward(featurizer, img, *a, **k):
            name = os.path.relpath(img.filename, self.data).replace(os.sep, "/")
            self.current["name"] = name
            vae_module.randn_tensor, torch.randn_like = posterior_draw, noise_draw
            start = time.perf_counter()
            try:
                return real_forward(featurizer, img, *a, **k)
            finally:
                self.seconds[name] = time.perf_counter() - start
                vae_module.randn_tensor, torch.randn_like = real_randn_tensor, real_randn_like

        dift_sd.SDFeaturizer4Eval.forward = forward

        def featurizer(cat_list):
            if reuse and self.featurizers:
                missing = set(cat_list) - set(self.featurizers[-1].cat2prompt_embeds)
                assert not missing, f"reused featurizer has no prompt for {missing}"
                return self.featurizers[-1]
            start = time.perf_counter()
            made = dift_sd.SDFeaturizer4Eval(sd_id=str(model), cat_list=cat_list)
            self.build_seconds.append(time.perf_counter() - start)
            self.featurizers.append(made)
            return made

        eval_spair.SDFeaturizer4Eval = featurizer
