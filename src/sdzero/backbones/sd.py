"""Stable Diffusion as a frozen backbone: loading, images -> VAE latents, forward noising.

Weights come from a Hugging Face hub id, a local diffusers folder, a single-file ``.safetensors`` /
``.ckpt`` checkpoint, or nowhere: ``weights=None`` builds random weights of a named architecture
(see :mod:`sdzero.backbones.architectures`) and warns loudly. A hub id that is neither cached nor
downloadable raises :class:`WeightsNotFoundError`; nothing ever falls back to random weights.

The scheduler is always a ``DDIMScheduler`` with ``set_alpha_to_one=False, clip_sample=False`` and
the SD betas (the official correspondence code's scheduler). Its ``steps_offset`` comes from the
scheduler config stored with the weights (1 in the SD hub repos); single files and random weights
have none and get 0, which is what the official correspondence code ran with (diffusers 0.8). It
only shifts ``set_timesteps``; :meth:`StableDiffusion.add_noise` takes the timestep itself.
"""

from __future__ import annotations

import logging
import operator
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn
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
from sdzero.backbones.errors import WeightsFormatError, WeightsNotFoundError
from sdzero.errors import ConfigError

log = logging.getLogger(__name__)

NoiseKind = Literal["uniform", "gaussian"]
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Slack for float rounding only; anything further out is a different image convention.
_RANGE_TOLERANCE = 1e-3
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_T = TypeVar("_T")


def sample_noise(
    shape: Sequence[int],
    kind: NoiseKind,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Noise of ``shape``: U[0, 1) for ``"uniform"`` (Hedlin et al.'s ``torch.rand_like`` quirk) or
    N(0, 1) for ``"gaussian"``.

    With a generator the draw happens on the generator's device and is then moved to ``device``, so
    a CPU generator gives the same noise whatever device the caller computes on.
    """
    draw = {"uniform": torch.rand, "gaussian": torch.randn}.get(kind)
    if draw is None:
        raise ValueError(f"noise kind {kind!r} is not supported; expected 'uniform' or 'gaussian'")
    at = generator.device if generator is not None else device
    return draw(tuple(shape), generator=generator, device=at, dtype=dtype).to(device)


def validate_images(images: Any) -> None:
    """Raise ``ValueError`` unless ``images`` is a ``(B, 3, H, W)`` float tensor with values in
    [0, 1] and H, W multiples of 8 (the VAE downsamples by 8)."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor (B, 3, H, W); got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must have shape (B, 3, H, W) (RGB, channels first); got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor with values in [0, 1]; got dtype {images.dtype} "
            "(convert uint8 with images.float() / 255)"
        )
    if images.numel() == 0:
        raise ValueError(f"images is empty: shape {tuple(images.shape)}")
    lo, hi = images.min().item(), images.max().item()
    if not (lo >= -_RANGE_TOLERANCE and hi <= 1 + _RANGE_TOLERANCE):
        raise ValueError(
            f"image values must lie in [0, 1]; got min {lo:.4g}, max {hi:.4g} "
            "(divide 0..255 values by 255; map [-1, 1] with (x + 1) / 2; clamp after resizing)"
        )
    h, w = images.shape[-2:]
    if h % 8 or w % 8:
        raise ValueError(f"image height and width must be multiples of 8; got H={h}, W={w}")


class StableDiffusion(nn.Module):
    """Frozen Stable Diffusion parts.

    ``unet``, ``vae``, ``scheduler`` (DDIM), optional ``text_encoder`` and ``tokenizer``; ``arch``
    (architecture name; ``"custom"`` for weights matching none), ``source`` (where the weights came
    from) and ``random_weights``. Every parameter has ``requires_grad=False`` and the module stays
    in eval mode even when a parent module calls ``.train()``.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: DDIMScheduler,
        *,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        arch: str,
        source: str,
        random_weights: bool,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.arch = arch
        self.source = source
        self.random_weights = random_weights
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> StableDiffusion:
        # A frozen backbone: Lightning's module.train() must not switch on dropout in here.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def encode_images(
        self,
        images: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """VAE latents ``(B, 4, H/8, W/8)`` of ``images`` ``(B, 3, H, W)`` in [0, 1].

        The VAE encodes ``2x - 1``; the result is the posterior mean (Hedlin et al.) or, with
        ``sample=True``, a posterior sample (OVDiff), times ``vae.config.scaling_factor``.
        """
        validate_images(images)
        x = images.to(device=self.vae.device, dtype=self.vae.dtype) * 2 - 1
        posterior = self.vae.encode(x).latent_dist
        latents = posterior.sample(generator=generator) if sample else posterior.mean
        return latents * self.vae.config.scaling_factor

    def add_noise(
        self,
        latents: torch.Tensor,
        t: int,
        noise: NoiseKind | torch.Tensor = "uniform",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Forward-diffuse ``latents`` ``(B, C, h, w)`` to timestep ``t``:
        ``sqrt(abar_t) * latents + sqrt(1 - abar_t) * eps``.

        ``eps`` is drawn by :func:`sample_noise` (``"uniform"``, the official correspondence
        quirk, or ``"gaussian"``) or given as a tensor of the latents' shape.
        """
        steps = self.scheduler.config.num_train_timesteps
        try:
            t = operator.index(t)
        except TypeError:
            raise ValueError(f"timestep t must be an integer; got {t!r}") from None
        if not 0 <= t < steps:
            raise ValueError(f"timestep t must lie in [0, {steps}); got {t}")
        if isinstance(noise, torch.Tensor):
            if noise.shape != latents.shape:
                raise ValueError(
                    f"noise shape {tuple(noise.shape)} must equal latents shape "
                    f"{tuple(latents.shape)}"
                )
            eps = noise.to(latents)
        else:
            eps = sample_noise(latents.shape, noise, generator, latents.device, latents.dtype)
        return self.scheduler.add_noise(latents, eps, torch.tensor([t], device=latents.device))

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder last hidden state ``(B, 77, D)`` for B prompts (padded/truncated to 77)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError(
                f"this Stable Diffusion ({self.source}) was loaded without a text encoder; "
                "load it with load_stable_diffusion(..., text_encoder=True) to encode prompts"
            )
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a list of strings; got {prompts!r}")
        length = self.text_encoder.config.max_position_embeddings
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device)).last_hidden_state


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
    kind, location = _classify(weights)
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
        parts = _single_file_parts(Path(location), spec, text_encoder)
        source = location
    else:
        parts = _pretrained_parts(location, text_encoder, hub=kind == "hub")
        arch = _resolve_arch(parts["unet"].config, arch, location)
        source = location
    model = StableDiffusion(**parts, arch=arch, source=source, random_weights=kind == "random")
    return model.to(device=device, dtype=dtype)


def describe_source(weights: str | None, arch: str | None) -> str:
    """One line saying where :func:`load_stable_diffusion` would load from; loads nothing."""
    kind, location = _classify(weights)
    name = get_architecture(arch).name if arch is not None else "unspecified"
    if kind == "random":
        return f"random weights, architecture {name} (metrics are meaningless)"
    if kind == "file":
        return f"single-file checkpoint {location} (architecture {name})"
    if kind == "folder":
        return f"local diffusers folder {location}"
    if kind == "missing":
        return f"{weights}: no such file or folder (and not a hub id)"
    snapshot = _cached_snapshot(location)
    if snapshot is not None:
        return f"hub id {location}, cached at {snapshot}"
    from huggingface_hub import constants

    if _hub_offline():
        return (
            f"hub id {location}, NOT in the cache {constants.HF_HUB_CACHE} (offline: download it)"
        )
    return (
        f"hub id {location}, not yet in the cache {constants.HF_HUB_CACHE}; downloads on first use"
    )


def _classify(weights: str | None) -> tuple[str, str]:
    """('random' | 'file' | 'folder' | 'hub' | 'missing', location) for a ``weights`` value."""
    if weights is None:
        return "random", ""
    if not isinstance(weights, str | os.PathLike) or not str(weights).strip():
        raise ConfigError(
            f"backbone weights must be a hub id, a folder, a checkpoint file or None; got {weights!r}"
        )
    path = Path(weights).expanduser()
    if path.is_file():
        return "file", str(path.resolve())
    if path.is_dir():
        return "folder", str(path.resolve())
    text = str(weights)
    if _HUB_ID.match(text) and not text.endswith(SINGLE_FILE_SUFFIXES):
        return "hub", text
    return "missing", text


def as_dtype(dtype: torch.dtype | str, key: str = "dtype") -> torch.dtype:
    """A float dtype from its name (``"float32"``, ``"float16"``, ``"bfloat16"``) or itself;
    ``key`` names the setting in the error message."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(
        f"{key} must be one of {list(_DTYPES)} (or a torch float dtype); got {dtype!r}"
    )


def _warn_random(arch: str) -> None:
    message = (
        f"Stable Diffusion '{arch}' has RANDOM weights (backbone.weights=null): every metric "
        "computed with it is MEANINGLESS. Set backbone.weights to a hub id, a diffusers folder or "
        "a checkpoint file for real results."
    )
    log.warning(message)
    bar = "!" * 78
    print(f"{bar}\n!! {message}\n{bar}", file=sys.stderr)


def _ddim(config: Mapping[str, Any]) -> DDIMScheduler:
    return DDIMScheduler.from_config(dict(config), set_alpha_to_one=False, clip_sample=False)


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
            "scheduler": _ddim(SCHEDULER_CONFIG),
        }
        if text_encoder:
            parts["text_encoder"] = _seeded(
                seed, lambda: CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
            )
            parts["tokenizer"] = _offline_tokenizer(spec)
    return parts


def _offline_tokenizer(spec: Architecture) -> CLIPTokenizer:
    from sdzero.backbones.tokenizer import offline_clip_tokenizer

    return offline_clip_tokenizer(pad_token=spec.pad_token)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # Read the variable now as well: it may be set after huggingface_hub was imported.
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def _cached_snapshot(repo_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "unet/config.json")
    return str(Path(found).parent.parent) if isinstance(found, str) else None


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
    offline = not hub or _hub_offline()
    kw = {"local_files_only": offline}
    try:
        check_unet_config(UNet2DConditionModel.load_config(source, subfolder="unet", **kw), source)
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw),
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **kw),
            "scheduler": _ddim(DDIMScheduler.load_config(source, subfolder="scheduler", **kw)),
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


# Keys an LDM/CompVis single file must hold: the first cross-attention's key projection (its input
# width is the text dimension) and the VAE encoder's first convolution.
_LDM_CROSS_ATTN_KEY = (
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
)
_LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")
_LDM_OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"


def _single_file_parts(path: Path, spec: Architecture, text_encoder: bool) -> dict[str, Any]:
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
        "scheduler": _ddim(SCHEDULER_CONFIG),
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
        parts["tokenizer"] = _offline_tokenizer(spec)
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
