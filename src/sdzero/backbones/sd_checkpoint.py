"""Stable Diffusion components from an original-format (CompVis/LDM) single-file checkpoint.

diffusers' single-file key conversions, but each component loaded strictly: a missing weight is an
error, never a random initialisation left in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from sdzero.backbones.architectures import SCHEDULER_CONFIG, Architecture
from sdzero.backbones.errors import WeightsFormatError
from sdzero.backbones.sd_model import ddim_scheduler
from sdzero.backbones.sources import SINGLE_FILE_SUFFIXES

# Keys an LDM/CompVis single file must hold: the first cross-attention's key projection (its input
# width is the text dimension) and the VAE encoder's first convolution.
_LDM_CROSS_ATTN_KEY = (
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
)
_LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")
_LDM_OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"


def single_file_parts(path: Path, spec: Architecture, text_encoder: bool) -> dict[str, Any]:
    """Components from an original-format (CompVis/LDM) single file, configured by ``spec``.

    Uses diffusers' single-file key conversions but loads each component itself, failing on any
    missing weight: ``from_single_file`` loads with ``strict=False``, which would leave a missing
    component at its random initialisation without a word.
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        load_single_file_checkpoint,
    )

    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise WeightsFormatError(
            f"single-file checkpoint {path} has suffix {path.suffix!r}; expected one of "
            f"{list(SINGLE_FILE_SUFFIXES)}"
        )
    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except OSError as err:
        raise WeightsFormatError(
            f"could not read the single-file checkpoint {path}: {err} (.ckpt files are read with "
            "torch.load(weights_only=True), which refuses pickled training objects; a .safetensors "
            "file, a diffusers folder or a hub id avoids that)"
        ) from err
    to_k = checkpoint.get(_LDM_CROSS_ATTN_KEY)
    if to_k is None or not any(k.startswith(_LDM_VAE_PREFIXES) for k in checkpoint):
        raise WeightsFormatError(
            f"{path} is not an original-format Stable Diffusion checkpoint: expected UNet keys "
            f"'model.diffusion_model.*' (e.g. {_LDM_CROSS_ATTN_KEY}) and VAE keys "
            f"'first_stage_model.*'"
        )
    if to_k.shape[-1] != spec.unet["cross_attention_dim"]:
        raise WeightsFormatError(
            f"{path} has {to_k.shape[-1]}-d text conditioning but architecture {spec.name!r} "
            f"expects {spec.unet['cross_attention_dim']}; pass the matching arch"
        )
    parts: dict[str, Any] = {
        "unet": _load_converted(
            UNet2DConditionModel(**spec.unet),
            convert_ldm_unet_checkpoint(checkpoint, dict(spec.unet), extract_ema=True),
            f"{path} (UNet)",
        ),
        "vae": _load_converted(
            AutoencoderKL(**spec.vae),
            convert_ldm_vae_checkpoint(checkpoint, dict(spec.vae)),
            f"{path} (VAE)",
        ),
        "scheduler": ddim_scheduler(SCHEDULER_CONFIG),
    }
    if text_encoder:
        model = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
        if _LDM_OPEN_CLIP_KEY in checkpoint:
            state = convert_open_clip_checkpoint(model, checkpoint)
        else:
            state = convert_ldm_clip_checkpoint(checkpoint)
        # Single files store the pre-5.x transformers layout, which nested the text model.
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
        parts["text_encoder"] = _load_converted(model, state, f"{path} (text encoder)")
        from sdzero.backbones.tokenizer import offline_clip_tokenizer  # open_clip's BPE: lazy

        parts["tokenizer"] = offline_clip_tokenizer(pad_token=spec.pad_token)
    return parts


def _load_converted(model: nn.Module, state: Mapping[str, Any], what: str) -> nn.Module:
    state = {k: v for k, v in state.items() if v is not None}
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise WeightsFormatError(f"{what}: weights do not fit the architecture: {err}") from err
    if missing:
        raise WeightsFormatError(
            f"{what}: the checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}; "
            "is it a checkpoint of this architecture?"
        )
    return model
