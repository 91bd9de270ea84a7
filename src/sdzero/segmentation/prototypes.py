"""OVDiff prototypes: per class and extractor, foreground and background feature prototypes.

For each side (FG, BG) of a class: the class mean over all pooled pixels, one mean per support
image, and k-means centres (K = 32, sklearn's ``random_state=0`` -> ``kmeans_seed``), on raw,
unnormalised features (``gen_proto_sd.py`` / ``gen_proto_vit.py``). Masks reach the feature grid
by bilinear interpolation and ``.bool()``: a cell is set iff one of the 2×2 pixels around its
block's centre is. A support image with no foreground cell is skipped for both sides. Each
prototype remembers the support image and grid region it stands for, so a prediction can be
explained.

:class:`PrototypeCache` stores one file per (class, extractor, settings); :func:`build_prototypes`
fills it, building each class that misses any extractor once.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from sdzero.progress import Progress, progress
from sdzero.records import write_bytes_atomic
from sdzero.segmentation.features import FeatureExtractor
from sdzero.segmentation.kmeans import kmeans
from sdzero.segmentation.masks import build_mask_proposer
from sdzero.segmentation.settings import OVDIFF
from sdzero.segmentation.support import SupportSet, settings_hash, slug

log = logging.getLogger(__name__)

CLASS_MEAN, IMAGE_MEAN, KMEANS_CENTRE = 0, 1, 2
# Default kmeans_sample: 0 = k-means++ and Lloyd on all pooled pixels, sklearn's procedure (the
# official call). The speed option `kmeans_sample=24576` seeds and converges k-means on a subsample of
# that size (768 per centre at K = 32), then refines on all: on 100k x 7680 pooled-feature-like
# points (benchmarks/bench_kmeans.py) ~13x faster than sklearn's KMeans (the exact mode: ~4x) at
# inertia +0.4 % on average over 8 seeds (sklearn's own seeds spread over 0.9 %).
KMEANS_SAMPLE = OVDIFF.kmeans_sample
# 2: official CutLER ranking edge cases and no BG from images without FG on the grid.
FORMAT = 2
_MAGIC = b"SDZPROTO1\n"


@dataclass
class Prototypes:
    """Prototypes of one class from one extractor (``P`` FG, ``Q`` BG rows; ``(gh, gw)`` the grid
    of the extractor on the support images). Kinds: 0 class mean, 1 per-image mean, 2 k-means
    centre. ``*_image``: index into ``support`` of the image that best explains the row (-1 none);
    ``*_region``: that image's grid cells the row stands for."""

    class_name: str
    extractor: str
    fg: torch.Tensor  # (P, D) float32
    bg: torch.Tensor  # (Q, D)
    fg_kind: torch.Tensor  # (P,) int8
    bg_kind: torch.Tensor  # (Q,)
    fg_image: torch.Tensor  # (P,) int64
    bg_image: torch.Tensor
    fg_region: torch.Tensor  # (P, gh, gw) bool
    bg_region: torch.Tensor
    support: list[str]

    def __post_init__(self) -> None:
        dims = {self.fg.shape[-1], self.bg.shape[-1]}
        for side in ("fg", "bg"):
            rows = getattr(self, side)
            n = rows.shape[0]
            kind, image, region = (
                getattr(self, f"{side}_{s}") for s in ("kind", "image", "region")
            )
            ok = (
                rows.ndim == 2
                and rows.dtype == torch.float32
                and kind.shape == (n,)
                and kind.dtype == torch.int8
                and image.shape == (n,)
                and image.dtype == torch.int64
                and region.ndim == 3
                and region.shape[0] == n
                and region.dtype == torch.bool
            )
            if not ok:
                raise ValueError(
                    f"inconsistent {side} prototypes of {self.class_name!r}: rows "
                    f"{tuple(rows.shape)} {rows.dtype}, kind {tuple(kind.shape)} {kind.dtype}, "
                    f"image {tuple(image.shape)} {image.dtype}, region {tuple(region.shape)}"
                )
        if len(dims) != 1:
            raise ValueError(f"fg and bg prototypes of {self.class_name!r} differ in dim: {dims}")
        images = torch.cat([self.fg_image, self.bg_image])
        if len(images) and not (int(images.min()) >= -1 and int(images.max()) < len(self.support)):
            raise ValueError(
                f"prototypes of {self.class_name!r} refer to support images "
                f"{int(images.min())}..{int(images.max())} but support has {len(self.support)}"
            )


def _check_kmeans_sample(kmeans_sample: int) -> None:
    if not isinstance(kmeans_sample, int) or isinstance(kmeans_sample, bool) or kmeans_sample < 0:
        raise ValueError(
            f"kmeans_sample must be an int >= 0 (0: k-means++ on all pixels), got {kmeans_sample!r}"
        )


def masks_to_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(N, H, W)`` bool -> ``(N, gh, gw)`` bool: bilinear interpolation (half-pixel centres),
    then any nonzero; for an integer factor a cell is set iff one of the 2×2 pixels around its
    block's centre is (the official ``F.interpolate(...).bool()``)."""
    out = F.interpolate(masks[:, None].float(), size=grid, mode="bilinear", align_corners=False)
    return out[:, 0] != 0


def _side(
    features: torch.Tensor, masks: torch.Tensor, k: int, seed: int, sample: int, what: str
) -> tuple[torch.Tensor, ...]:
    """Prototypes of one side: rows, kind, image, region (see :class:`Prototypes`)."""
    n, d, gh, gw = features.shape
    # Non-finite pixels are dropped (OVDiff drops non-finite BG rows); empty images are skipped.
    valid = masks.to(features.device) & torch.isfinite(features).all(1)
    counts = valid.flatten(1).sum(1)
    kept = torch.nonzero(counts).flatten()
    if len(kept) == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return (
            torch.empty(0, d),
            empty.to(torch.int8),
            empty,
            torch.empty(0, gh, gw, dtype=torch.bool),
        )
    pixels = torch.cat([features[i].flatten(1).T[valid[i].flatten()] for i in kept.tolist()])
    owner = torch.repeat_interleave(kept, counts[kept])  # support image of every pooled row
    where = torch.nonzero(valid[kept].flatten(1))[:, 1]  # its cell (y * gw + x)
    rows = [pixels.mean(0)] + [pixels[owner == i].mean(0) for i in kept.tolist()]
    biggest = int(kept[counts[kept].argmax()])
    image = [biggest, *kept.tolist()]
    region = [valid[biggest]] + [valid[i] for i in kept.tolist()]
    if k > len(pixels):
        log.warning(
            "%s: only %d pixels for K=%d k-means centres; using K=%d",
            what,
            len(pixels),
            k,
            len(pixels),
        )
        k = len(pixels)
    result = kmeans(pixels, k, seed=seed, init_sample=sample)
    for c in range(k):
        members = result.labels == c
        per_image = torch.bincount(owner[members], minlength=n)
        best = int(per_image.argmax()) if members.any() else -1
        cells = torch.zeros(gh * gw, dtype=torch.bool, device=features.device)
        cells[where[members & (owner == best)]] = True
        image.append(best)
        region.append(cells.view(gh, gw))
    rows = torch.cat([torch.stack(rows), result.centres])
    kind = [CLASS_MEAN] + [IMAGE_MEAN] * len(kept) + [KMEANS_CENTRE] * k
    return (
        rows.float().cpu(),
        torch.tensor(kind, dtype=torch.int8),
        torch.tensor(image, dtype=torch.int64),
        torch.stack(region).cpu(),
    )


def prototypes_from_features(
    features: torch.Tensor,
    fg_masks: torch.Tensor,
    bg_masks: torch.Tensor,
    *,
    class_name: str,
    extractor: str,
    support: Sequence[str] | None = None,
    kmeans_k: int = OVDIFF.kmeans_k,
    kmeans_seed: int = 0,
    kmeans_sample: int = KMEANS_SAMPLE,
) -> Prototypes:
    """Prototypes from support features ``(N, D, gh, gw)`` and bool masks ``(N, H, W)`` (pixels).

    Rows are ordered class mean, per-image means (image order), k-means centres. ``support``: one
    name (file path) per image, default ``"support #i"``. ``kmeans_sample``: k-means is seeded
    and first converged on that many pooled pixels, then refined on all (0: k-means++ on all
    pixels, sklearn's procedure; see :func:`~sdzero.segmentation.kmeans.kmeans`). An image with
    no foreground cell on the grid contributes to neither side. ``ValueError`` if no image has
    foreground on the grid; no background cells give ``Q = 0``.
    """
    _check_kmeans_sample(kmeans_sample)
    if features.ndim != 4 or fg_masks.shape != bg_masks.shape or fg_masks.ndim != 3:
        raise ValueError(
            f"expected features (N, D, gh, gw) and fg/bg masks (N, H, W); got "
            f"{tuple(features.shape)}, {tuple(fg_masks.shape)}, {tuple(bg_masks.shape)}"
        )
    if features.shape[0] != fg_masks.shape[0]:
        raise ValueError(f"{features.shape[0]} feature maps but {fg_masks.shape[0]} masks")
    support = [f"support #{i}" for i in range(len(features))] if support is None else list(support)
    if len(support) != len(features):
        raise ValueError(f"{len(support)} support names for {len(features)} feature maps")
    grid = tuple(features.shape[-2:])
    what = f"{class_name!r}/{extractor}"
    km = (kmeans_k, kmeans_seed, kmeans_sample)
    fg_grid = masks_to_grid(fg_masks, grid)
    fg = _side(features, fg_grid, *km, f"{what} fg")
    if len(fg[0]) == 0:
        raise ValueError(
            f"class {what}: no support image has foreground pixels; check the support images and "
            "the mask proposer"
        )
    # Officially an image without a foreground cell is skipped before its background is read.
    has_fg = fg_grid.flatten(1).any(1)[:, None, None]
    bg = _side(features, masks_to_grid(bg_masks, grid) & has_fg, *km, f"{what} bg")
    sides = {
        f"{side}{suffix}": part[j]
        for side, part in (("fg", fg), ("bg", bg))
        for j, suffix in enumerate(("", "_kind", "_image", "_region"))
    }
    return Prototypes(class_name=class_name, extractor=extractor, support=support, **sides)


class PrototypeCache:
    """Prototype files ``<root>/<class>.<extractor>.<hash>.pt``, one per class, extractor and
    settings (``hash``: :func:`~sdzero.segmentation.support.settings_hash` of everything the
    prototypes depend on). Files carry a SHA-256 of their payload and are replaced atomically, so
    concurrent writers leave one complete file; a corrupt or truncated file is reported and rebuilt.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, class_name: str, extractor: str, settings: Mapping[str, Any]) -> Path:
        key = settings_hash({"class": class_name, "extractor": extractor, **settings})
        return self.root / f"{slug(class_name)}.{slug(extractor)}.{key}.pt"

    def save(self, prototypes: Prototypes, settings: Mapping[str, Any]) -> Path:
        path = self.path(prototypes.class_name, prototypes.extractor, settings)
        buffer = io.BytesIO()
        state = {f.name: getattr(prototypes, f.name) for f in fields(prototypes)}
        torch.save({"format": FORMAT, "settings": dict(settings), **state}, buffer)
        payload = buffer.getvalue()
        write_bytes_atomic(path, _MAGIC + hashlib.sha256(payload).hexdigest().encode() + payload)
        return path

    def load(
        self, class_name: str, extractor: str, settings: Mapping[str, Any]
    ) -> Prototypes | None:
        """The cached prototypes, or None if absent or unreadable (with a warning)."""
        path = self.path(class_name, extractor, settings)
        if not path.is_file():
            return None
        try:
            data = path.read_bytes()
            digest, payload = data[len(_MAGIC) : len(_MAGIC) + 64], data[len(_MAGIC) + 64 :]
            if (
                not data.startswith(_MAGIC)
                or hashlib.sha256(payload).hexdigest().encode() != digest
            ):
                raise ValueError("checksum mismatch (truncated or corrupt)")
            state = torch.load(io.BytesIO(payload), weights_only=True)
            if state.pop("format") != FORMAT:
                raise ValueError("written by another sdzero version")
            state.pop("settings")
            protos = Prototypes(**state)
            if (protos.class_name, protos.extractor) != (class_name, extractor):
                raise ValueError(f"holds {protos.class_name!r}/{protos.extractor}")
        except Exception as err:  # whatever makes a file unusable, it is rebuilt
            log.warning("prototype cache file %s is unusable (%s); rebuilding it", path, err)
            return None
        return protos

    def get_or_build(
        self,
        class_name: str,
        build_fn: Callable[[list[str]], Mapping[str, Prototypes]],
        settings: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, Prototypes]:
        """Prototypes of ``class_name`` for every extractor in ``settings`` (extractor name ->
        its settings). Cached ones are loaded; ``build_fn(missing extractor names)`` is called at
        most once for the rest, and its results are saved."""
        found = {name: self.load(class_name, name, s) for name, s in settings.items()}
        missing = [name for name, protos in found.items() if protos is None]
        if missing:
            built = build_fn(missing)
            for name in missing:
                found[name] = built[name]
                self.save(built[name], settings[name])
        return found


class SupportSource(Protocol):
    def __call__(self, name: str) -> SupportSet: ...

    def settings(self, name: str) -> dict[str, Any]: ...


def build_prototypes(
    class_names: Sequence[str],
    extractors: Sequence[FeatureExtractor],
    support_source: SupportSource,
    mask_proposer: str = "attention",
    cache: PrototypeCache | None = None,
    *,
    mask_options: Mapping[str, Any] | None = None,
    kmeans_k: int = OVDIFF.kmeans_k,
    kmeans_seed: int = 0,
    kmeans_sample: int = KMEANS_SAMPLE,
    batch_size: int = 8,
) -> dict[str, dict[str, Prototypes]]:
    """``{class: {extractor name: Prototypes}}`` for every class and extractor.

    A class missing from ``cache`` for any extractor is built once: its support set is fetched,
    masked with ``mask_proposer`` (a registered kind, built with ``mask_options``), and every
    missing extractor runs on the support images in batches of ``batch_size``.
    """
    names = list(class_names)
    if not names or any(not isinstance(n, str) or not n.strip() for n in names):
        raise ValueError(
            f"class_names must be a non-empty list of non-empty strings, got {names!r}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"class_names has duplicates: {names}")
    by_name = {e.name: e for e in extractors}
    if not by_name or len(by_name) != len(extractors):
        raise ValueError(f"need distinct extractors, got {[e.name for e in extractors]}")
    if kmeans_k < 1 or batch_size < 1:
        raise ValueError(f"kmeans_k and batch_size must be >= 1, got {kmeans_k}, {batch_size}")
    _check_kmeans_sample(kmeans_sample)
    options = dict(mask_options or {})
    proposers: list[Any] = []  # built on the first miss: cached classes need no mask model

    def build(name: str, missing: list[str]) -> dict[str, Prototypes]:
        log.info("building prototypes of %r for %s", name, missing)
        if not proposers:  # before any support sampling, so a missing model fails cheaply
            proposers.append(build_mask_proposer(mask_proposer, **options))
        proposer = proposers[0]
        support = support_source(name)
        attribution = support.attribution
        masks = [
            proposer(image, None if attribution is None else attribution[i])
            for i, image in enumerate(support.images)
        ]
        fg, bg = (torch.stack([m[j] for m in masks]) for j in (0, 1))
        built, images = {}, support.images
        desc = f"features of {name!r} ({len(images)} support images x {len(missing)} extractors)"
        with progress(desc, len(images) * len(missing), "images") as report:
            for extractor_name in missing:  # one extractor's features in memory at a time
                built[extractor_name] = prototypes_from_features(
                    _extract(by_name[extractor_name], images, batch_size, report),
                    fg,
                    bg,
                    class_name=name,
                    extractor=extractor_name,
                    support=support.paths or None,
                    kmeans_k=kmeans_k,
                    kmeans_seed=kmeans_seed,
                    kmeans_sample=kmeans_sample,
                )
        return built

    result = {}
    with progress(f"prototypes of {len(names)} classes", len(names), "classes") as report:
        for name in names:
            report.note(name)
            common = {
                "format": FORMAT,
                "support": support_source.settings(name),
                "masks": {"kind": mask_proposer, **options},
                "kmeans_k": kmeans_k,
                "kmeans_seed": kmeans_seed,
                "kmeans_sample": kmeans_sample,
            }
            settings = {e: {**common, "extractor": by_name[e].settings} for e in by_name}
            if cache is None:
                result[name] = build(name, list(by_name))
            else:
                result[name] = cache.get_or_build(name, lambda m, n=name: build(n, m), settings)
            report.advance()
    return result


def _extract(
    extractor: FeatureExtractor, images: torch.Tensor, batch_size: int, report: Progress
) -> torch.Tensor:
    """``extractor``'s features of ``images`` ``(N, 3, H, W)``, ``batch_size`` at a time."""
    parts = []
    for start in range(0, len(images), batch_size):
        parts.append(extractor(images[start : start + batch_size].to(extractor.device)))
        report.advance(len(parts[-1]))
    return torch.cat(parts)
