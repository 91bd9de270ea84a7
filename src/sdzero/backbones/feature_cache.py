"""On-disk cache of per-image dense features, so a feature method extracts each image once.

:class:`FeatureCache` is the storage: one file ``<sha256 of key>.pt`` per key, holding a magic line,
the SHA-256 of the payload and the payload (the key and the tensor, on CPU, dtype as given), written
to a temporary file in the same folder and ``os.replace``d: a reader sees no file or a whole one,
and processes (DDP ranks, concurrent runs) writing the same key at once leave one valid file. A
truncated or corrupt entry is detected on read, logged, deleted and recomputed. After each write
the least recently used entries (file modification time; a hit touches its file) are deleted until
the folder holds at most ``max_bytes``.

:class:`MethodFeatureCache` keys a feature method's per-image features by everything that could
change them (:meth:`MethodFeatureCache.key`). It imports no method: it reads the method as an
``nn.Module`` with a settings dataclass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdzero.records import write_bytes_atomic

log = logging.getLogger(__name__)

FORMAT = 1  # part of every key: a new entry layout or key rule invalidates all old entries
_MAGIC = b"SDZFEAT1\n"
_DIGEST = 64  # hex characters of a SHA-256
_ENTRY = re.compile(r"[0-9a-f]{64}\.pt")
_TEMP = re.compile(r"\.[0-9a-f]{64}\.pt\..+\.tmp")  # write_bytes_atomic's temporaries
_TEMP_MAX_AGE = 3600.0  # seconds: an older temporary is a killed writer's, removed on eviction


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (any device, any dtype)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


class FeatureCache:
    """Tensors on disk under ``folder`` by string key, at most ``max_bytes`` in all.

    ``hits``, ``misses`` count :meth:`get` lookups; ``rebuilt`` the corrupt entries found (each
    also a miss); ``evicted`` the entries this process deleted for the size bound.
    """

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = self.rebuilt = self.evicted = 0

    def path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.pt"

    def get(self, key: str, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The tensor stored under ``key`` (moved to ``device``; default: CPU), or None if absent
        or unusable (a corrupt entry is logged and deleted)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # never written, or evicted by another process meanwhile
            self.misses += 1
            return None
        try:
            tensor = _decode(data, key)
        except Exception as err:  # whatever makes an entry unusable, it is rebuilt
            log.warning("feature cache entry %s is unusable (%s); recomputing it", path, err)
            path.unlink(missing_ok=True)
            self.rebuilt += 1
            self.misses += 1
            return None
        self.hits += 1
        with contextlib.suppress(FileNotFoundError):  # evicted by another process meanwhile
            os.utime(path)  # the least recently used entries are evicted first
        return tensor if device is None else tensor.to(device)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store a CPU copy of ``tensor`` (dtype kept) under ``key``, then apply the size bound."""
        buffer = io.BytesIO()
        # clone: a view would otherwise save the whole storage it belongs to
        torch.save({"key": key, "tensor": tensor.detach().to("cpu").clone()}, buffer)
        payload = buffer.getvalue()
        digest = hashlib.sha256(payload).hexdigest().encode()
        write_bytes_atomic(self.path(key), _MAGIC + digest + payload)
        self._evict()

    def get_or_compute(
        self,
        key: str,
        compute: Callable[[], torch.Tensor],
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The cached tensor of ``key`` on ``device``, else ``compute()`` (returned as computed,
        and stored; a failed write, e.g. a full disk, is logged and the run goes on)."""
        cached = self.get(key, device)
        if cached is not None:
            return cached
        tensor = compute()
        try:
            self.put(key, tensor)
        except OSError as err:
            log.warning("feature cache %s: could not store an entry (%s)", self.folder, err)
        return tensor

    def _evict(self) -> None:
        """Delete the least recently used entries until the folder holds at most ``max_bytes``
        (entries and other writers' temporaries count; files of others are never touched)."""
        entries, total, now = [], 0, time.time()
        with os.scandir(self.folder) as found:
            for entry in found:
                entry_like, temp = _ENTRY.fullmatch(entry.name), _TEMP.fullmatch(entry.name)
                if not (entry_like or temp):
                    continue
                try:
                    stat = entry.stat()
                except FileNotFoundError:  # deleted by another process since the listing
                    continue
                if temp and now - stat.st_mtime > _TEMP_MAX_AGE:
                    Path(entry.path).unlink(missing_ok=True)
                    continue
                total += stat.st_size
                if entry_like:
                    entries.append((stat.st_mtime_ns, entry.name, stat.st_size))
        for _, name, size in sorted(entries):
            if total <= self.max_bytes:
                break
            (self.folder / name).unlink(missing_ok=True)
            total -= size
            self.evicted += 1


def _decode(data: bytes, key: str) -> torch.Tensor:
    """The tensor of an entry's bytes; ``ValueError`` if they are not a whole entry of ``key``."""
    head = len(_MAGIC)
    digest, payload = data[head : head + _DIGEST], data[head + _DIGEST :]
    if not data.startswith(_MAGIC) or hashlib.sha256(payload).hexdigest().encode() != digest:
        raise ValueError("checksum mismatch (truncated or corrupt)")
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    if state.get("key") != key or not isinstance(state.get("tensor"), torch.Tensor):
        raise ValueError("holds another key")
    return state["tensor"]


def _plain(value: Any) -> Any:
    """A JSON-able form of a config or settings value (unknown objects by their ``repr``; private
    and library-version keys of configs left out)."""
    if isinstance(value, Mapping):
        return {
            str(k): _plain(v)
            for k, v in value.items()
            if not str(k).startswith("_") and str(k) != "transformers_version"
        }
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _config(obj: Any) -> Mapping[str, Any] | None:
    """The configuration of a diffusers / transformers object (model, scheduler), else None."""
    config = getattr(obj, "config", None)
    if isinstance(config, Mapping):
        return config
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else None


class MethodFeatureCache(FeatureCache):
    """A :class:`FeatureCache` of one feature method's per-image features ``(C, h, w)``.

    The key (:meth:`key`) changes whenever the features could: the image (its name and a
    SHA-256 of the model-frame pixels, dtype and shape), the category unless the method declares
    ``features_use_category = False``, the method's class, its settings except ``ignored_keys``
    (scoring and cache keys: they do not change features) and the method's own
    ``non_feature_keys``, its run seed when it keeps one as ``seed`` (noise draws), the device
    type, and the backbone: a SHA-256 of every parameter and buffer of the module tree (weights
    source, architecture and dtype; for a trained method its current weights) plus the configs of
    the diffusers/transformers objects in it (models, schedulers). A backbone must therefore be
    a registered submodule. The weights digest is recomputed per tensor only when that tensor
    changed (object, storage, dtype, device or in-place version: an optimiser step, a
    ``load_state_dict``, ``.to()``). Library versions are not in the key: after an upgrade that
    changes numerics, delete the folder.
    """

    def __init__(
        self, folder: str | Path, max_bytes: int, ignored_keys: Collection[str] = ()
    ) -> None:
        super().__init__(folder, max_bytes)
        self.ignored_keys = frozenset(ignored_keys)
        self._tensors: dict[str, tuple[tuple, str]] = {}  # name -> (fingerprint, digest)
        self._backbone: tuple[tuple, str] | None = None  # (fingerprints, identity digest)

    def key(self, method: nn.Module, image: torch.Tensor, name: str, category: str) -> str:
        """The cache key of ``method``'s features of ``image`` ``(1, 3, S, S)`` named ``name``."""
        ignored = self.ignored_keys | set(getattr(method, "non_feature_keys", ()))
        settings = method.settings
        kind = type(method)
        parts = {
            "format": FORMAT,
            "method": f"{kind.__module__}.{kind.__qualname__}",
            "settings": {
                f.name: _plain(getattr(settings, f.name))
                for f in dataclasses.fields(settings)
                if f.name not in ignored
            },
            "seed": _plain(getattr(method, "seed", None)),
            "backbone": self._identity(method),
            "device": image.device.type,
            "name": name,
            "pixels": tensor_digest(image),
            "category": category if getattr(method, "features_use_category", True) else None,
        }
        return json.dumps(parts, sort_keys=True)

    def image_features(
        self,
        method: nn.Module,
        image: torch.Tensor,
        name: str,
        category: str,
        compute: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """``compute()``'s features of ``image``, from the cache when present (on the image's
        device)."""
        return self.get_or_compute(self.key(method, image, name, category), compute, image.device)

    def _identity(self, method: nn.Module) -> str:
        """SHA-256 of the weights and configs of ``method``'s module tree (recomputed on change)."""
        modules = list(method.named_modules())
        tensors = {  # one walk over the tree: named_parameters + named_buffers take twice as long
            f"{prefix}.{name}": t
            for prefix, module in modules
            for own in (module._parameters, module._buffers)
            for name, t in own.items()
            if t is not None
        }
        prints = tuple(
            (name, id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
            for name, t in sorted(tensors.items())
        )
        if self._backbone is not None and self._backbone[0] == prints:
            return self._backbone[1]
        weights = hashlib.sha256()
        for fingerprint in prints:
            name = fingerprint[0]
            known = self._tensors.get(name)
            if known is None or known[0] != fingerprint:
                known = self._tensors[name] = (fingerprint, tensor_digest(tensors[name]))
            weights.update(f"{name}:{known[1]};".encode())
        configs = {}
        for module_name, module in modules:
            public = [(a, v) for a, v in vars(module).items() if not a.startswith("_")]
            for attr, value in [("", module), *public]:
                config = None if isinstance(value, torch.Tensor) else _config(value)
                if config is not None:
                    configs[f"{module_name}:{attr}"] = _plain(config)
        both = json.dumps({"weights": weights.hexdigest(), "configs": configs}, sort_keys=True)
        identity = hashlib.sha256(both.encode()).hexdigest()
        self._backbone = (prints, identity)
        return identity
