"""Stable Diffusion loading (random / folder / hub cache / single file), latents and noising.

Everything runs on CPU with the ``tiny`` architecture; the full-size architectures are only built on
the ``meta`` device, which allocates nothing.
"""

import logging
import os
import re
import shutil
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import huggingface_hub  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file  # noqa: E402
from sd1_layers import SD1_CROSS_ATTENTION
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

import sdzero.backbones.architectures as architectures  # noqa: E402
from sdzero.backbones.architectures import (  # noqa: E402
    SCHEDULER_CONFIG,
    architecture_names,
    default_hub_id,
    get_architecture,
    matching_architectures,
    register_architecture,
)
from sdzero.backbones.errors import UnsupportedArchitectureError  # noqa: E402
from sdzero.backbones.sd import (  # noqa: E402
    StableDiffusion,
    WeightsNotFoundError,
    describe_source,
    load_stable_diffusion,
    sample_noise,
)


def _cross_attention(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in unet.named_modules() if n.endswith("attn2")}


def _meta_unet(arch: str) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**get_architecture(arch).unet)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def tiny() -> StableDiffusion:
    return load_stable_diffusion(None, "tiny", text_encoder=True, seed=0)


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
    """The tiny model saved as a diffusers pipeline, with an SD-hub-like PNDM scheduler config."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        unet=tiny.unet,
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG, steps_offset=1, skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


# --- architectures -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd14", "sd15"])
def test_sd1_unet_has_sd_parameter_count_and_16_cross_attention_layers(arch):
    unet = _meta_unet(arch)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    layers = _cross_attention(unet)
    assert sorted(layers) == sorted(SD1_CROSS_ATTENTION)
    assert {m.heads for m in layers.values()} == {8}
    assert {m.to_k.in_features for m in layers.values()} == {768}


def test_sd1_text_encoder_is_clip_vit_l14_text():
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**get_architecture("sd14").text_encoder))
    assert sum(p.numel() for p in model.parameters()) == 123_060_480


def test_sd21_base_unet_heads_follow_fixed_head_width_64():
    unet = _meta_unet("sd21-base")
    layers = _cross_attention(unet)
    assert sorted(layers) == sorted(SD1_CROSS_ATTENTION)
    heads = [layers[name].heads for name in SD1_CROSS_ATTENTION]
    assert heads == [5, 5, 10, 10, 20, 20] + [20] + [20] * 3 + [10] * 3 + [5] * 3
    assert all(m.heads * 64 == m.inner_dim for m in layers.values())
    assert {m.to_k.in_features for m in layers.values()} == {1024}
    assert unet.config.upcast_attention is False
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724


def test_tiny_has_the_sd1_layer_topology(tiny):
    layers = _cross_attention(tiny.unet)
    assert sorted(layers) == sorted(SD1_CROSS_ATTENTION)
    assert {m.heads for m in layers.values()} == {8}
    assert tiny.vae.config.block_out_channels == (8, 16, 32, 32)  # 3 downsamplings: factor 8
    assert sum(p.numel() for p in tiny.unet.parameters()) < 5_000_000


def test_architecture_names_hub_ids_and_topology_matching():
    assert architecture_names() == ("sd14", "sd15", "sd21-base", "tiny")
    assert default_hub_id("sd14") == "CompVis/stable-diffusion-v1-4"
    assert default_hub_id("sd15") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert default_hub_id("sd21-base") == "stabilityai/stable-diffusion-2-1-base"
    with pytest.raises(ValueError, match="tiny"):
        default_hub_id("tiny")
    with pytest.raises(ValueError, match=r"'sd3'.*sd14"):
        get_architecture("sd3")
    # Hub configs store lists where ours have tuples; sd14 and sd15 share a topology.
    hub_like = {
        k: list(v) if isinstance(v, tuple) else v for k, v in get_architecture("sd15").unet.items()
    }
    assert matching_architectures(hub_like) == ["sd14", "sd15"]
    assert matching_architectures(get_architecture("sd21-base").unet) == ["sd21-base"]


# --- random weights --------------------------------------------------------------------------


def test_random_weights_warn_loudly_are_seeded_and_leave_global_rng_alone(caplog, capsys):
    before = torch.random.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="sdzero.backbones.sd"):
        a = load_stable_diffusion(None, "tiny", seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert any(
        "RANDOM weights" in r.getMessage() and "MEANINGLESS" in r.getMessage()
        for r in caplog.records
    )
    assert "MEANINGLESS" in capsys.readouterr().err
    b = load_stable_diffusion(None, "tiny", seed=3)
    c = load_stable_diffusion(None, "tiny", seed=4)
    _assert_same_weights(a, b)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)
    assert a.random_weights and a.arch == "tiny" and a.text_encoder is None


def test_model_is_frozen_and_stays_in_eval_mode(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not any(m.training for m in tiny.modules())
    assert tiny.scheduler.config.set_alpha_to_one is False
    assert tiny.scheduler.config.clip_sample is False
    assert tiny.scheduler.config.steps_offset == 0


def test_random_weights_and_single_files_need_an_architecture():
    with pytest.raises(ValueError, match="arch=one of"):
        load_stable_diffusion(None)
    with pytest.raises(ValueError, match="float16"):
        load_stable_diffusion(None, "tiny", dtype="int8")


def test_dtype_is_applied(tiny):
    half = load_stable_diffusion(None, "tiny", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16


# --- local folder and hub cache ----------------------------------------------------------------


def test_local_folder_round_trip_gives_identical_models(tiny, tiny_folder):
    loaded = load_stable_diffusion(str(tiny_folder), "tiny", text_encoder=True)
    assert not loaded.random_weights and loaded.arch == "tiny"
    assert loaded.source == str(tiny_folder.resolve())
    _assert_same_weights(loaded, tiny)
    # steps_offset comes from the stored (PNDM, hub-like) config; the DDIM overrides still apply.
    assert loaded.scheduler.config.steps_offset == 1
    assert loaded.scheduler.config.set_alpha_to_one is False
    assert torch.equal(loaded.scheduler.alphas_cumprod, tiny.scheduler.alphas_cumprod)
    prompts = ["a photo of a cat", "a dog"]
    assert torch.equal(loaded.encode_prompt(prompts), tiny.encode_prompt(prompts))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = tiny.encode_prompt(prompts[:1])
    out_loaded = loaded.unet(latents, 10, encoder_hidden_states=text).sample
    # Equal weights; only the last bit may differ (safetensors maps tensors at unaligned
    # addresses, which sends matmuls down another BLAS kernel).
    expected = tiny.unet(latents, 10, encoder_hidden_states=text).sample
    torch.testing.assert_close(out_loaded, expected, rtol=1e-5, atol=1e-6)


def test_folder_architecture_is_inferred_or_checked(tiny_folder):
    assert load_stable_diffusion(str(tiny_folder)).arch == "tiny"
    with pytest.raises(ValueError, match=r"not architecture 'sd15'"):
        load_stable_diffusion(str(tiny_folder), "sd15")


def test_a_registered_architecture_builds_and_sdxl_is_a_clear_user_error(
    tiny_folder, tmp_path, monkeypatch
):
    monkeypatch.setattr(architectures, "_REGISTRY", dict(architectures._REGISTRY))
    tiny = get_architecture("tiny")
    widths = (32, 64, 64, 64)
    wide = register_architecture(
        replace(tiny, name="tiny-wide", unet={**tiny.unet, "block_out_channels": widths})
    )
    assert architecture_names()[-1] == "tiny-wide"
    model = load_stable_diffusion(None, "tiny-wide")
    assert model.arch == "tiny-wide" and model.unet.config.block_out_channels == widths
    assert matching_architectures(wide.unet) == ["tiny-wide"]
    with pytest.raises(ValueError, match="'tiny' is already registered"):
        register_architecture(tiny)
    register_architecture(replace(tiny, name="sdxl-like", family="sdxl", text_encoder_2={}))
    with pytest.raises(UnsupportedArchitectureError, match=r"'sdxl-like' is a 'sdxl' archit"):
        load_stable_diffusion(None, "sdxl-like")
    # A folder whose UNet asks for added_cond_kwargs (SDXL's) fails before any weight loads.
    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_folder, folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    config = folder / "unet" / "config.json"
    added = '"addition_embed_type": "text_time"'
    config.write_text(config.read_text().replace('"addition_embed_type": null', added))
    with pytest.raises(UnsupportedArchitectureError, match=r"addition_embed_type='text_time'"):
        load_stable_diffusion(str(folder))
    assert issubclass(UnsupportedArchitectureError, NotImplementedError)


def test_incomplete_folder_names_what_is_missing(tmp_path, tiny_folder):
    shutil.copytree(tiny_folder / "unet", tmp_path / "unet")
    with pytest.raises(WeightsNotFoundError, match=r"missing \['vae', 'scheduler'\]"):
        load_stable_diffusion(str(tmp_path), "tiny")


def test_hub_id_loads_offline_from_the_cache(tiny, tiny_folder, tmp_path, monkeypatch):
    # The hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}.
    commit = "0" * 40
    repo = tmp_path / "models--sdzero-test--tiny-sd"
    shutil.copytree(tiny_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert "cached at" in describe_source("sdzero-test/tiny-sd", "tiny")
    loaded = load_stable_diffusion("sdzero-test/tiny-sd", "tiny")
    assert loaded.source == "sdzero-test/tiny-sd" and not loaded.random_weights
    _assert_same_weights(loaded.unet, tiny.unet)


def test_uncached_hub_id_offline_raises_weights_not_found_with_download_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        load_stable_diffusion("sdzero-test/not-cached-anywhere", "sd15")
    message = str(info.value)
    assert "'sdzero-test/not-cached-anywhere'" in message
    assert "hf download sdzero-test/not-cached-anywhere" in message
    assert "backbone.weights=/path/to/folder" in message
    assert "HF_HUB_OFFLINE" in message
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize(
    "weights", ["/nonexistent/sd-folder", "./missing/model.safetensors", "x.ckpt"]
)
def test_missing_local_path_raises_weights_not_found(weights):
    with pytest.raises(WeightsNotFoundError, match=re.escape(repr(weights))):
        load_stable_diffusion(weights, "sd15")


def test_describe_source_names_each_kind_without_loading(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert describe_source(None, "tiny").startswith("random weights, architecture tiny")
    assert (
        describe_source(str(tiny_folder), "tiny")
        == f"local diffusers folder {tiny_folder.resolve()}"
    )
    file = tmp_path / "m.safetensors"
    file.write_bytes(b"")
    assert (
        describe_source(str(file), "sd15") == f"single-file checkpoint {file} (architecture sd15)"
    )
    assert "NOT in the cache" in describe_source("sdzero-test/not-cached-anywhere", "sd15")
    assert "no such file" in describe_source("/nonexistent/x", "sd15")


# --- single file -------------------------------------------------------------------------------

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _ldm_resnet(rest: str) -> str:
    first, _, leaf = rest.partition(".")
    return f"{_RESNET_TO_LDM[first]}.{leaf}"


def _ldm_unet_key(key: str) -> str:
    """The CompVis name of a diffusers SD 1.x UNet weight (layers_per_block=2: 3 slots a block)."""
    head, _, leaf = key.rpartition(".")
    if head in _UNET_FIXED:
        return f"{_UNET_FIXED[head]}.{leaf}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", key):
        side, block, kind, j, rest = m.groups()
        index = 3 * int(block) + int(j) + (1 if side == "down" else 0)
        prefix = "input_blocks" if side == "down" else "output_blocks"
        return (
            f"{prefix}.{index}.0.{_ldm_resnet(rest)}"
            if kind == "resnets"
            else f"{prefix}.{index}.1.{rest}"
        )
    if m := re.fullmatch(r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{3 * int(m[1]) + 3}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.conv\.(.+)", key):
        slot = 1 if m[1] == "0" else 2  # after the attention in cross-attention up blocks
        return f"output_blocks.{3 * int(m[1]) + 2}.{slot}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_ldm_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    raise AssertionError(f"unmapped UNet key {key}")


def _ldm_vae_item(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The CompVis name (and 1x1-conv shape, for attention projections) of a 4-block VAE weight."""
    part, _, rest = key.partition(".")
    if m := re.fullmatch(r"(down|up)_blocks\.(\d)\.resnets\.(\d)\.(.+)", rest):
        block = int(m[2]) if m[1] == "down" else 3 - int(m[2])
        return (
            f"{part}.{m[1]}.{block}.block.{m[3]}.{m[4].replace('conv_shortcut', 'nin_shortcut')}",
            value,
        )
    if m := re.fullmatch(r"(down|up)_blocks\.(\d)\.(down|up)samplers\.0\.conv\.(.+)", rest):
        block = int(m[2]) if m[1] == "down" else 3 - int(m[2])
        return f"{part}.{m[1]}.{block}.{m[3]}sample.conv.{m[4]}", value
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}.{m[2]}", value
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        conv = value[:, :, None, None] if m[1] != "group_norm" and m[2] == "weight" else value
        return f"{part}.mid.attn_1.{_VAE_ATTN[m[1]]}.{m[2]}", conv
    return key.replace("conv_norm_out", "norm_out"), value


def _to_ldm_checkpoint(model: StableDiffusion) -> dict[str, torch.Tensor]:
    ckpt = {
        f"model.diffusion_model.{_ldm_unet_key(k)}": v for k, v in model.unet.state_dict().items()
    }
    for key, value in model.vae.state_dict().items():
        name, tensor = _ldm_vae_item(key, value)
        ckpt[f"first_stage_model.{name}"] = tensor
    for key, value in model.text_encoder.state_dict().items():
        ckpt[f"cond_stage_model.transformer.text_model.{key}"] = value
    return {k: v.contiguous() for k, v in ckpt.items()}


@pytest.fixture(scope="module")
def tiny_single_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_file(_to_ldm_checkpoint(tiny), str(path))
    return path


def test_single_file_round_trip_gives_identical_models(tiny, tiny_single_file):
    loaded = load_stable_diffusion(str(tiny_single_file), "tiny", text_encoder=True)
    _assert_same_weights(loaded, tiny)
    assert loaded.source == str(tiny_single_file) and loaded.arch == "tiny"
    assert loaded.scheduler.config.steps_offset == 0


def test_single_file_checks_architecture_and_completeness(tiny, tiny_single_file, tmp_path):
    with pytest.raises(ValueError, match=r"arch=one of"):
        load_stable_diffusion(str(tiny_single_file))
    with pytest.raises(ValueError, match=r"32-d text conditioning.*'sd15' expects 768"):
        load_stable_diffusion(str(tiny_single_file), "sd15")
    ckpt = _to_ldm_checkpoint(tiny)
    del ckpt["model.diffusion_model.out.2.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(ckpt, str(partial))
    with pytest.raises(ValueError, match=r"\(UNet\): the checkpoint lacks 1 weights.*conv_out"):
        load_stable_diffusion(str(partial), "tiny")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(
        ValueError, match=r"could not read the single-file checkpoint .*garbage\.ckpt"
    ):
        load_stable_diffusion(str(garbage), "tiny")
    vae_only = tmp_path / "vae.safetensors"
    save_file({k: v for k, v in ckpt.items() if k.startswith("first_stage_model.")}, str(vae_only))
    with pytest.raises(ValueError, match="not an original-format Stable Diffusion checkpoint"):
        load_stable_diffusion(str(vae_only), "tiny")


# --- images -> latents -------------------------------------------------------------------------


def test_encode_images_is_the_scaled_posterior_mean_of_2x_minus_1(tiny):
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    latents = tiny.encode_images(images)
    assert latents.shape == (2, 4, 6, 8)
    expected = tiny.vae.encode(images * 2 - 1).latent_dist.mean * 0.18215
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)


def test_encode_images_sample_draws_from_the_posterior(tiny):
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mean = tiny.encode_images(images)
    a = tiny.encode_images(images, sample=True, generator=torch.Generator().manual_seed(5))
    b = tiny.encode_images(images, sample=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, mean)
    posterior = tiny.vae.encode(images * 2 - 1).latent_dist
    z = (a / 0.18215 - posterior.mean) / posterior.std  # standardised draw ~ N(0, 1)
    assert abs(z.mean().item()) < 0.5 and 0.6 < z.std().item() < 1.4


@pytest.mark.parametrize(
    ("images", "problem"),
    [
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float tensor"),
        (torch.rand(1, 1, 32, 32), r"\(B, 3, H, W\).*\(1, 1, 32, 32\)"),
        (torch.rand(1, 4, 32, 32), r"\(1, 4, 32, 32\)"),
        (torch.rand(3, 32, 32), r"\(3, 32, 32\)"),
        (torch.rand(1, 3, 32, 32) * 255, r"\[0, 1\].*max 2"),
        (torch.rand(1, 3, 32, 32) * 2 - 1, r"\[0, 1\].*min -"),
        (torch.rand(1, 3, 36, 32), "multiples of 8; got H=36, W=32"),
        (torch.full((1, 3, 8, 8), float("nan")), r"\[0, 1\].*nan"),
    ],
)
def test_encode_images_rejects_wrong_image_modes(tiny, images, problem):
    with pytest.raises(ValueError, match=problem):
        tiny.encode_images(images)


# --- noising ---------------------------------------------------------------------------------


def test_add_noise_matches_the_closed_form(tiny):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    # Hedlin et al.'s optimisation timestep: sqrt(abar)=0.917, sqrt(1-abar)=0.398.
    assert abs(abar[140].sqrt().item() - 0.917) < 1e-3
    assert abs((1 - abar[140]).sqrt().item() - 0.398) < 1e-3
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.rand(2, 4, 8, 8, generator=gen)
    for t in (0, 140, 200, 999):
        expected = abar[t].sqrt() * latents + (1 - abar[t]).sqrt() * noise
        torch.testing.assert_close(tiny.add_noise(latents, t, noise), expected.float())


def test_add_noise_draws_the_named_noise_reproducibly(tiny):
    latents = torch.zeros(4, 4, 16, 16)
    abar = tiny.scheduler.alphas_cumprod[200]
    uniform = tiny.add_noise(latents, 200, "uniform", torch.Generator().manual_seed(7))
    eps = uniform / (1 - abar).sqrt()
    assert eps.min() >= 0 and eps.max() < 1 + 1e-6 and abs(eps.mean().item() - 0.5) < 0.05
    expected = sample_noise(latents.shape, "uniform", torch.Generator().manual_seed(7))
    torch.testing.assert_close(eps, expected)
    gaussian = tiny.add_noise(latents, 200, "gaussian", torch.Generator().manual_seed(7))
    g = gaussian / (1 - abar).sqrt()
    assert abs(g.mean().item()) < 0.1 and abs(g.std().item() - 1) < 0.1 and g.min() < 0


def test_sample_noise_kinds_and_bad_arguments(tiny):
    u = sample_noise((10_000,), "uniform", torch.Generator().manual_seed(0), dtype=torch.float64)
    assert u.dtype == torch.float64 and u.min() >= 0 and u.max() < 1
    with pytest.raises(ValueError, match="'laplace'.*'uniform' or 'gaussian'"):
        sample_noise((2,), "laplace")
    latents = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 1000\); got 1000"):
        tiny.add_noise(latents, 1000)
    with pytest.raises(ValueError, match="integer; got 0.5"):
        tiny.add_noise(latents, 0.5)
    with pytest.raises(ValueError, match=r"noise shape \(1, 4, 4, 4\)"):
        tiny.add_noise(latents, 10, torch.zeros(1, 4, 4, 4))


# --- prompts ---------------------------------------------------------------------------------


def test_encode_prompt_shape_and_errors(tiny):
    embeddings = tiny.encode_prompt(["a photo of a cat", ""])
    assert embeddings.shape == (2, 77, 32)
    assert not torch.equal(embeddings[0], embeddings[1])
    with pytest.raises(ValueError, match="list of strings"):
        tiny.encode_prompt("a photo of a cat")
    bare = load_stable_diffusion(None, "tiny")
    with pytest.raises(RuntimeError, match="text_encoder=True"):
        bare.encode_prompt(["a cat"])
