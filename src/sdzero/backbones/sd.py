"""Loading Stable Diffusion as a frozen backbone (:class:`~sdzero.backbones.sd_model.StableDiffusion`).

Weights come from a Hugging Face hub id, a local diffusers folder, a single-file ``.safetensors`` /
``.ckpt`` checkpoint, or nowhere: ``weights=None`` builds random weights of a named architecture
(see :mod:`sdzero.backbones.architectures`) and warns loudly. A hub id that is neither cached nor
downloadable raises :class:`WeightsNotFoundError`; nothing ever falls back to random weights.

The scheduler convention and the module itself: :mod:`sdzero.backbones.sd_model`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdzero.backbones.architectures import (
    SCHEDULER_CONFIG,
    Architecture,
    architecture_names,
    check_buildable,
    check_unet_config,
    get_architecture,
    matching_architectures,
    unet_topology,
)
from sdzero.backbones.dtypes import as_dtype
from sdzero.backbones.errors import WeightsFormatError, WeightsNotFoundError
from sdzero.backbones.sd_checkpoint import single_file_parts
from sdzero.backbones.sd_model import (
    NoiseKind,
    StableDiffusion,
    ddim_scheduler,
    sample_noise,
    validate_images,
)
from sdzero.backbones.sources import (
    SINGLE_FILE_SUFFIXES,
    classify_weights,
    describe_source,
    hub_offline,
)
from sdzero.errors import ConfigError

# The module's names, importable from here as before the split.
__all__ = [
    "NoiseKind",
    "StableDiffusion",
    "WeightsNotFoundError",
    "as_dtype",
    "describe_source",
    "load_stable_diffusion",
    "sample_noise",
    "validate_images",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def load_stable_diffusion(
    weights: str | None,
    arch: str | None = None,
    *,
    text_encoder: bool = False,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> StableDiffusion:
    """Load Stable Diffusion, frozen and in eval mode.

    ``weights``: a hub id (``"CompVis/stable-diffusion-v1-4"``), a local diffusers folder, a
    ``.safetensors``/``.ckpt`` single file (needs ``arch``), or None for random weights of ``arch``
    (seeded with ``seed``; loud warning). With ``arch`` given, hub/folder weights must have its
    UNet topology. The text encoder and tokenizer are loaded only with ``text_encoder=True``.
    """
    kind, location = classify_weights(weights)
    spec = get_architecture(arch) if arch is not None else None
    dtype = as_dtype(dtype)
    if kind == "missing":
        raise WeightsNotFoundError(
            f"backbone weights {weights!r}: no such file or folder, and not a Hugging Face hub id "
            "(owner/name); expected a hub id, a diffusers folder or a "
            f"{'/'.join(SINGLE_FILE_SUFFIXES)} file"
        )
    if kind in ("random", "file") and spec is None:
        what = "random weights (weights=None)" if kind == "random" else f"single file {location}"
        raise ConfigError(
            f"{what} need an architecture to build the models; pass arch=one of "
            f"{list(architecture_names())}"
        )
    if spec is not None:
        check_buildable(spec)
    if kind == "random":
        _warn_random(spec.name)
        parts = _random_parts(spec, text_encoder, seed)
        source = f"random:{spec.name}:seed={seed}"
    elif kind == "file":
        parts = single_file_parts(Path(location), spec, text_encoder)
        source = location
    else:
        parts = _pretrained_parts(location, text_encoder, hub=kind == "hub")
        arch = _resolve_arch(parts["unet"].config, arch, location)
        source = location
    model = StableDiffusion(**parts, arch=arch, source=source, random_weights=kind == "random")
    return model.to(device=device, dtype=dtype)


def _warn_random(arch: str) -> None:
    message = (
        f"Stable Diffusion '{arch}' has RANDOM weights (backbone.weights=null): every metric "
        "computed with it is MEANINGLESS. Set backbone.weights to a hub id, a diffusers folder or "
        "a checkpoint file for real results."
    )
    log.warning(message)
    bar = "!" * 78
    print(f"{bar}\n!! {message}\n{bar}", file=sys.stderr)


def _seeded(seed: int, build: Callable[[], _T]) -> _T:
    # diffusers' test convention: reseed before each component, so each is reproducible alone.
    torch.manual_seed(seed)
    return build()


def _random_parts(spec: Architecture, text_encoder: bool, seed: int) -> dict[str, Any]:
    # fork_rng keeps the caller's random stream untouched by the reseeding below.
    with torch.random.fork_rng(devices=[]):
        parts: dict[str, Any] = {
            "unet": _seeded(seed, lambda: UNet2DConditionModel(**spec.unet)),
            "vae": _seeded(seed, lambda: AutoencoderKL(**spec.vae)),
            "scheduler": ddim_scheduler(SCHEDULER_CONFIG),
        }
        if text_encoder:
            parts["text_encoder"] = _seeded(
                seed, lambda: CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
            )
            from sdzero.backbones.tokenizer import offline_clip_tokenizer  # open_clip's BPE: lazy

            parts["tokenizer"] = offline_clip_tokenizer(pad_token=spec.pad_token)
    return parts


def _pretrained_parts(source: str, text_encoder: bool, *, hub: bool) -> dict[str, Any]:
    """Components from a diffusers layout: a local folder or a hub id (cache or download)."""
    subfolders = ["unet", "vae", "scheduler"] + (
        ["text_encoder", "tokenizer"] if text_encoder else []
    )
    if not hub:
        missing = [s for s in subfolders if not (Path(source) / s).is_dir()]
        if missing:
            raise WeightsNotFoundError(
                f"{source} is not a diffusers Stable Diffusion folder: missing {missing}. Expected "
                f"the subfolders {subfolders} (as written by `hf download <id> --local-dir DIR` or "
                "StableDiffusionPipeline.save_pretrained)"
            )
    offline = not hub or hub_offline()
    kw = {"local_files_only": offline}
    try:
        check_unet_config(UNet2DConditionModel.load_config(source, subfolder="unet", **kw), source)
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw),
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **kw),
            "scheduler": ddim_scheduler(
                DDIMScheduler.load_config(source, subfolder="scheduler", **kw)
            ),
        }
        if text_encoder:
            parts["text_encoder"] = CLIPTextModel.from_pretrained(
                source, subfolder="text_encoder", **kw
            )
            parts["tokenizer"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
    except OSError as err:
        if not hub:
            raise WeightsFormatError(
                f"diffusers folder {source} could not be loaded: {type(err).__name__}: {err}"
            ) from err
        raise WeightsNotFoundError(_not_found_message(source, offline, err)) from err
    return parts


def _not_found_message(repo_id: str, offline: bool, cause: Exception) -> str:
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    reason = (
        "HF_HUB_OFFLINE is set"
        if offline
        else "the Hugging Face hub could not be reached (or refused the download)"
    )
    return (
        f"Stable Diffusion weights {repo_id!r} are not in the Hugging Face cache ({cache}) and "
        f"{reason}.\n"
        f"  On a machine with network run:  hf download {repo_id}\n"
        f"  then copy {cache}/models--{repo_id.replace('/', '--')} into the same folder here "
        "(or point HF_HOME at a copy of the cache);\n"
        f"  or run  hf download {repo_id} --local-dir /path/to/folder  and set "
        "backbone.weights=/path/to/folder.\n"
        "  (Gated repos need `hf auth login` and the licence accepted on huggingface.co.)\n"
        f"  No local folder {Path(repo_id).resolve()} exists either.\n"
        f"  Underlying error: {type(cause).__name__}: {cause}"
    )


def _resolve_arch(unet_config: Mapping[str, Any], arch: str | None, weights: str) -> str:
    """``arch`` checked against the loaded UNet, or inferred from it (``"custom"`` if none fits).

    sd14 and sd15 share a topology; without ``arch`` the default hub id decides, else sd14.
    """
    matches = matching_architectures(unet_config)
    if arch is not None:
        if arch not in matches:
            raise WeightsFormatError(
                f"weights {weights!r} have a UNet with {unet_topology(unet_config)}, which is not "
                f"architecture {arch!r} ({unet_topology(get_architecture(arch).unet)}); "
                "fix backbone.arch or backbone.weights"
            )
        return arch
    by_hub_id = [name for name in matches if get_architecture(name).hub_id == weights]
    return (by_hub_id or matches or ["custom"])[0]
