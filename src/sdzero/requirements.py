"""What a run needs besides its config, checked before any model loads: packages and weights.

A method lists its needs (:meth:`~sdzero.evaluation.EvaluationModule.requirements`): each a
:class:`Requirement` naming the config key that asks for it, what it is, how to avoid it, and
either a local problem already found (a package not installed, a file missing) or the Hugging Face
hub files that hold it. :func:`check_requirements` reports every unmet need in one line before
anything loads. Weights on the hub are looked up in the local cache; when the hub must be asked
(something is not cached, or ``HF_HUB_OFFLINE`` is unset) it is probed once, briefly: an
unreachable hub switches the process to offline mode, so loads read the cache without the
libraries' retry storms, and what is not cached is an error now, not a minute later.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from sdzero.backbones.errors import WeightsNotFoundError
from sdzero.errors import MissingDependencyError

PROBE_SECONDS = 3.0  # how long the one connection attempt to the hub may take


@dataclass(frozen=True)
class Requirement:
    """One thing a run needs: ``key`` asks for it (``method.clip_filter``), ``what`` it is,
    ``avoid`` the setting that does without it ("" if none); ``problem`` a reason it is unusable
    found already (``package``: a package that is not installed), or ``hub`` its
    ``(repo id, files)`` on the Hugging Face hub (any one file of the tuple suffices)."""

    key: str
    what: str
    avoid: str = ""
    problem: str | None = None
    hub: tuple[str, tuple[str, ...]] | None = None
    package: bool = False  # the problem is a package that is not installed


def sd_requirements(backbone: dict, key: str = "backbone.weights") -> list[Requirement]:
    """The Stable Diffusion weights of a ``backbone`` group (none for random weights)."""
    from sdzero.backbones.sources import classify_weights

    weights = backbone.get("weights")
    kind, location = classify_weights(weights)
    what = f"Stable Diffusion weights {str(weights)!r}"
    if kind == "missing":
        return [Requirement(key, what, problem="no such file or folder, and not a hub id")]
    if kind != "hub":
        return []
    return [Requirement(key, what, hub=(location, ("unet/config.json",)))]


def vit_requirements(name: str, weights: str, key: str, avoid: str = "") -> list[Requirement]:
    """The pretrained weights of ViT backbone ``name`` (none for random weights or a file)."""
    from sdzero.backbones.vit import get_vit_spec

    spec = get_vit_spec(name)
    what = f"{name} weights ({spec.arch})"
    if weights == "random":
        return []
    if weights != "pretrained":
        if Path(weights).expanduser().is_file():
            return []
        return [Requirement(key, what, avoid, problem=f"checkpoint {weights!r} does not exist")]
    if spec.library == "timm":
        import timm

        repo = timm.models.get_pretrained_cfg(spec.arch).hf_hub_id
        files = ("model.safetensors", "pytorch_model.bin")
    else:
        import open_clip

        repo = open_clip.get_pretrained_cfg(spec.arch, spec.tag).get("hf_hub", "").rstrip("/")
        files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    if not repo:  # fetched by URL, not from the hub: nothing to look up
        return []
    return [Requirement(key, what, avoid, hub=(repo, files))]


def package_requirement(module: str, key: str, what: str, avoid: str = "") -> list[Requirement]:
    """An importable ``module`` (found without importing it)."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return []
    problem = f"the package {module!r} is not installed"
    return [Requirement(key, what, avoid, problem=problem, package=True)]


def _cached(repo: str, files: Sequence[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


_PROBED: dict[str, bool] = {}


def hub_reachable() -> bool:
    """Whether one TCP connection to the hub's host opens within :data:`PROBE_SECONDS` (asked
    once per process)."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if host not in _PROBED:
        try:
            socket.create_connection((host, 443), timeout=PROBE_SECONDS).close()
            _PROBED[host] = True
        except OSError:
            _PROBED[host] = False
    return _PROBED[host]


_OFFLINE_HERE: list[bool] = []  # set when go_offline switched this process offline


def go_offline() -> None:
    """Put this process (and the processes it starts) in the hub's offline mode."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    _OFFLINE_HERE.append(True)
    for name in ("huggingface_hub.constants", "diffusers.utils.constants"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "HF_HUB_OFFLINE"):
            module.HF_HUB_OFFLINE = True


def check_requirements(needs: Sequence[Requirement]) -> None:
    """Raise one error line listing every unmet need (with the key that avoids it) before
    anything loads; probe the hub at most once, going offline when it cannot be reached."""
    from sdzero.backbones.sources import hub_offline

    problems = [(n, n.problem) for n in needs if n.problem is not None]
    on_hub = [n for n in needs if n.problem is None and n.hub is not None]
    if on_hub and not hub_offline() and not hub_reachable():
        go_offline()
    if hub_offline():
        why = "the Hugging Face hub cannot be reached" if _OFFLINE_HERE else "HF_HUB_OFFLINE is set"
        problems += [
            (
                n,
                f"not in the Hugging Face cache and {why}; on a machine with network run "
                f"`hf download {n.hub[0]}` and copy the cache here",
            )
            for n in on_hub
            if not _cached(*n.hub)
        ]
    if not problems:
        return
    merged: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for need, why in problems:  # one entry per thing, naming every key that asks for it
        keys, avoids = merged.setdefault((need.what, why), ([], []))
        keys += [need.key] if need.key not in keys else []
        avoids += [need.avoid] if need.avoid and need.avoid not in avoids else []
    text = "; ".join(
        f"{', '.join(keys)}: {what}: {why}" + (f" (or set {', '.join(off)})" if off else "")
        for (what, why), (keys, off) in merged.items()
    )
    package = any(need.package for need, _ in problems)  # an ImportError, as importing would be
    error = MissingDependencyError if package else WeightsNotFoundError
    raise error(f"{text}. Nothing was loaded")
