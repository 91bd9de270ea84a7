"""Where Stable Diffusion weights would load from, told without loading torch or diffusers.

A ``backbone.weights`` value is a Hugging Face hub id, a local diffusers folder, a single-file
checkpoint, or None (random weights of a named architecture). :func:`describe_source` is what
``sdzero info`` prints for each backbone; :func:`classify_weights` is the rule
:func:`~sdzero.backbones.sd.load_stable_diffusion` follows.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sdzero.backbones.architectures import get_architecture
from sdzero.errors import ConfigError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def classify_weights(weights: str | None) -> tuple[str, str]:
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


def hub_offline() -> bool:
    """Whether the Hugging Face hub may not be contacted (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    # Read the variable now as well: it may be set after huggingface_hub was imported.
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of a hub id's diffusers layout, if it is cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "unet/config.json")
    return str(Path(found).parent.parent) if isinstance(found, str) else None


def describe_source(weights: str | None, arch: str | None) -> str:
    """One line saying where :func:`~sdzero.backbones.sd.load_stable_diffusion` would load
    from; loads nothing."""
    kind, location = classify_weights(weights)
    name = get_architecture(arch).name if arch is not None else "unspecified"
    if kind == "random":
        return f"random weights, architecture {name} (metrics are meaningless)"
    if kind == "file":
        return f"single-file checkpoint {location} (architecture {name})"
    if kind == "folder":
        return f"local diffusers folder {location}"
    if kind == "missing":
        return f"{weights}: no such file or folder (and not a hub id)"
    snapshot = cached_snapshot(location)
    if snapshot is not None:
        return f"hub id {location}, cached at {snapshot}"
    from huggingface_hub import constants

    if hub_offline():
        return (
            f"hub id {location}, NOT in the cache {constants.HF_HUB_CACHE} (offline: download it)"
        )
    return (
        f"hub id {location}, not yet in the cache {constants.HF_HUB_CACHE}; downloads on first use"
    )
