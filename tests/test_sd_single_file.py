"""Stable Diffusion from original-format (CompVis/LDM) single files: the tiny model written in
that layout by hand here, loaded back identically; wrong architectures and gaps are errors."""

import re

import pytest
import torch
from safetensors.torch import save_file

from sdzero.backbones.sd import StableDiffusion, load_stable_diffusion


@pytest.fixture(scope="module")
def tiny() -> StableDiffusion:
    return load_stable_diffusion(None, "tiny", text_encoder=True, seed=0)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# --- LDM key layout -------------------------------------------------------------------------------

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
