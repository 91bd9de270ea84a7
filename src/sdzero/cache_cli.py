"""``sdzero cache list|clear [--kind prototypes|features] [--random-only] [DIR]``.

Two caches, read by their on-disk names only (files of others in the same folder are never
touched):

- ``prototypes`` (default root: :func:`~sdzero.segmentation.module.default_cache_root`): files
  ``<class>.<extractor>.<hash12>.pt`` (:class:`~sdzero.segmentation.prototypes.PrototypeCache`),
  whose payload records the settings they were built with, and the sampled support sets
  ``support/<class>-<hash12>/`` with their ``support.json``
  (:class:`~sdzero.segmentation.support.GeneratedSupport`). Both name the weights' source, so
  random-weight entries are known.
- ``features`` (no default folder: DIR is required): files ``<sha256>.pt``
  (:class:`~sdzero.backbones.feature_cache.FeatureCache`). Their key holds a digest of the
  weights, not their source: whether an entry came from random weights is unknowable.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdzero.errors import InputError

PROTOTYPE_FILE = re.compile(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+\.[0-9a-f]{12}\.pt")
SUPPORT_FOLDER = re.compile(r"[A-Za-z0-9_]+-[0-9a-f]{12}")
SUPPORT_FILE = re.compile(r"[0-9]{3,}\.png|attribution\.pt|support\.json")
FEATURE_FILE = re.compile(r"[0-9a-f]{64}\.pt")
KINDS = ("prototypes", "features")


@dataclass(frozen=True)
class Entry:
    """One cache entry: ``files`` it consists of, ``random`` True / False / None (unknowable or
    unreadable), ``what`` a short description."""

    path: Path
    files: tuple[Path, ...]
    size: int
    mtime: float
    random: bool | None
    what: str


def _uses_random_weights(settings: Any) -> bool:
    """Whether any weights source in a settings tree is random: an SD source ``random:<arch>:...``
    (:func:`~sdzero.backbones.sd.load_stable_diffusion`) or a ViT's ``weights: random``."""
    if isinstance(settings, dict):
        for key, value in settings.items():
            if key in ("backbone", "source") and str(value).startswith("random:"):
                return True
            if key == "weights" and value == "random":
                return True
            if _uses_random_weights(value):
                return True
    if isinstance(settings, list):
        return any(_uses_random_weights(v) for v in settings)
    return False


def _prototype_entry(path: Path) -> Entry:
    import torch

    from sdzero.segmentation.prototypes import _MAGIC

    stat = path.stat()
    try:
        data = path.read_bytes()
        if not data.startswith(_MAGIC):
            raise ValueError("not a prototype file")
        state = torch.load(io.BytesIO(data[len(_MAGIC) + 64 :]), weights_only=True)
        random = _uses_random_weights(state["settings"])
        what = f"class {state['class_name']!r}, extractor {state['extractor']}"
    except Exception as err:  # whatever makes a file unusable: listed, not fatal
        random, what = None, f"unreadable ({type(err).__name__}); rebuilt on next use"
    return Entry(path, (path,), stat.st_size, stat.st_mtime, random, what)


def _support_entry(folder: Path) -> Entry:
    files = tuple(sorted(p for p in folder.iterdir() if SUPPORT_FILE.fullmatch(p.name)))
    stats = [p.stat() for p in files]
    manifest = folder / "support.json"
    try:
        settings = json.loads(manifest.read_text(encoding="utf-8"))
        random = _uses_random_weights(settings)
        what = f"support set of {settings.get('class')!r}, {settings.get('count')} images"
    except (OSError, ValueError):
        random, what = None, "incomplete support set (no readable support.json); resampled"
    mtime = max((s.st_mtime for s in stats), default=folder.stat().st_mtime)
    return Entry(folder, files, sum(s.st_size for s in stats), mtime, random, what)


def _feature_entry(path: Path) -> Entry:
    stat = path.stat()
    return Entry(path, (path,), stat.st_size, stat.st_mtime, None, "per-image features")


def entries(kind: str, root: Path) -> Iterator[Entry]:
    """The entries of the ``kind`` cache under ``root`` (none if ``root`` does not exist)."""
    if not root.is_dir():
        return
    if kind == "features":
        for path in sorted(root.iterdir()):
            if path.is_file() and FEATURE_FILE.fullmatch(path.name):
                yield _feature_entry(path)
        return
    for path in sorted(root.iterdir()):
        if path.is_file() and PROTOTYPE_FILE.fullmatch(path.name):
            yield _prototype_entry(path)
    support = root / "support"
    if support.is_dir():
        for folder in sorted(support.iterdir()):
            if folder.is_dir() and SUPPORT_FOLDER.fullmatch(folder.name):
                entry = _support_entry(folder)
                if entry.files:  # a folder left with foreign files only is not an entry
                    yield entry


def cache_root(kind: str, folder: str | None) -> Path:
    """``folder``, else the prototype cache's default root; features need a folder."""
    if folder is not None:
        return Path(folder).expanduser()
    if kind == "features":
        raise InputError(
            "sdzero cache --kind features: give DIR, the feature cache folder (the method's "
            "feature_cache key); feature caches have no default folder"
        )
    from sdzero.segmentation.module import default_cache_root

    return default_cache_root()


def human_size(size: int) -> str:
    """``size`` bytes as B / KiB / MiB / GiB."""
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def human_age(seconds: float) -> str:
    """An age in s / min / h / d (rounded down)."""
    for unit, length, next_unit in (("s", 1, 60), ("min", 60, 3600), ("h", 3600, 86400)):
        if seconds < next_unit:
            return f"{int(seconds // length)} {unit}"
    return f"{int(seconds // 86400)} d"


def _random_text(random: bool | None, kind: str) -> str:
    if random is None:
        return "unknown" if kind == "prototypes" else "unknowable"
    return "RANDOM" if random else "no"


def format_entries(kind: str, root: Path, found: list[Entry], now: float) -> str:
    """The listing: one line per entry (size, age, random weights, path relative to ``root``,
    what), then the total."""
    lines = [f"{kind} cache {root}"]
    if kind == "features":
        lines.append("  random weights: unknowable (feature keys hold a weights digest only)")
    lines.append(f"  {'size':>10}  {'age':>7}  {'random':>10}  entry")
    for e in found:
        lines.append(
            f"  {human_size(e.size):>10}  {human_age(max(now - e.mtime, 0.0)):>7}  "
            f"{_random_text(e.random, kind):>10}  {e.path.relative_to(root)}  ({e.what})"
        )
    total = sum(e.size for e in found)
    lines.append(f"  {len(found)} entries, {human_size(total)}")
    return "\n".join(lines)


def clear(found: list[Entry], random_only: bool) -> tuple[int, int]:
    """Delete the entries' own files (random-weight entries only with ``random_only``), then
    their support folders if left empty; returns (entries deleted, bytes freed)."""
    count = freed = 0
    for entry in found:
        if random_only and entry.random is not True:
            continue
        for path in entry.files:
            path.unlink(missing_ok=True)
        if entry.path.is_dir() and not any(entry.path.iterdir()):
            entry.path.rmdir()
        count, freed = count + 1, freed + entry.size
    return count, freed


def _run(args: argparse.Namespace) -> int:
    root = cache_root(args.kind, args.dir)
    if args.dir is not None and not root.is_dir():
        raise InputError(f"DIR {args.dir!r}: no such folder (expected a {args.kind} cache)")
    found = list(entries(args.kind, root))
    if args.action == "list":
        print(format_entries(args.kind, root, found, time.time()))
        return 0
    if args.random_only and args.kind == "features":
        raise InputError(
            "--random-only: feature cache entries do not record whether their weights were "
            "random (the key holds a weights digest only); clear the folder without it"
        )
    count, freed = clear(found, args.random_only)
    which = "random-weight " if args.random_only else ""
    print(f"deleted {count} {which}{args.kind} entries ({human_size(freed)}) from {root}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``sdzero cache list|clear`` (one subcommand each, so that options may come before
    DIR)."""
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("dir", nargs="?", metavar="DIR", help="cache folder (features: required)")
    shared.add_argument("--kind", choices=KINDS, default="prototypes", help="default: prototypes")
    p = sub.add_parser("cache", help="list or clear the prototype and feature caches")
    actions = p.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[shared], help="entries: size, age, random")
    listing.set_defaults(func=_run, random_only=False)
    clearing = actions.add_parser("clear", parents=[shared], help="delete the cache's entries")
    clearing.add_argument(
        "--random-only",
        action="store_true",
        help="only entries known to come from random weights",
    )
    clearing.set_defaults(func=_run)
