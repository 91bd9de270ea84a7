"""Correspondence by nearest neighbours of dense features: the shape of DIFT, SD+DINO and students.

A feature method maps a batch of model-frame images ``(B, 3, S, S)`` to dense descriptors
``(B, C, h, w)`` on a grid over the ``S x S`` frame (cell ``(i, j)`` covers model pixels
``[j S/w, (j+1) S/w) x [i S/h, (i+1) S/h)``; coordinates are continuous, 0 = the frame's left/top
edge). A source point's descriptor is bilinearly sampled from its grid at the point; its match is
the target cell of highest cosine similarity, reported at the cell's centre. A method whose
settings have ``match_resolution=image`` matches instead as DIFT's official code does
(:func:`nearest_pixels`): both maps upsampled to their original images' pixel grids, the argmax
pixel.

GeoAware-SC's test-time options (:mod:`sdzero.correspondence.refine`): ``method.flip_align``
matches the left-right mirrored source too and keeps the orientation whose features agree
better with the target's; ``method.soft_argmax_window`` replaces the argmax cell by the window
soft-argmax (cell matching only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from sdzero.backbones.feature_cache import MethodFeatureCache
from sdzero.correspondence.base import (
    CorrespondenceModule,
    PairInfo,
    ScoringSettings,
    check_query_points,
)
from sdzero.correspondence.refine import FLIP_SCORES, mirror_x, window_soft_argmax
from sdzero.errors import ConfigError

log = logging.getLogger(__name__)


def sample_descriptors(features: torch.Tensor, points: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear descriptors ``(N, C)`` of ``features`` ``(C, h, w)`` at ``points`` ``(N, 2)``
    (``(x, y)`` pixels of the ``size x size`` frame; borders replicate)."""
    grid = (points.to(features) * (2.0 / size) - 1.0).view(1, 1, -1, 2)
    out = F.grid_sample(
        features[None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[0, :, 0].T


def similarity(descriptors: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``(N, h*w)`` of ``descriptors`` ``(N, C)`` with every cell of ``features``
    ``(C, h, w)`` (cells in row-major order)."""
    cells = F.normalize(features.flatten(1), dim=0)
    return F.normalize(descriptors, dim=1) @ cells


def cell_centres(index: torch.Tensor, grid_hw: tuple[int, int], size: int) -> torch.Tensor:
    """``(N, 2)`` ``(x, y)`` model-frame centres of row-major cell indices ``index`` ``(N,)``."""
    h, w = grid_hw
    rows, cols = index // w, index % w
    return torch.stack([(cols + 0.5) * (size / w), (rows + 0.5) * (size / h)], dim=1).float()


def cell_of(points: torch.Tensor, grid_hw: tuple[int, int], size: int) -> torch.Tensor:
    """Row-major index ``(N,)`` of the cell holding each ``(x, y)`` point ``(N, 2)`` (clamped)."""
    h, w = grid_hw
    cols = (points[:, 0] * (w / size)).floor().long().clamp(0, w - 1)
    rows = (points[:, 1] * (h / size)).floor().long().clamp(0, h - 1)
    return rows * w + cols


def nearest_neighbours(
    src_features: torch.Tensor, trg_features: torch.Tensor, points: torch.Tensor, size: int
) -> torch.Tensor:
    """Matches ``(N, 2)`` (target cell centres, model-frame pixels) of source ``points``
    ``(N, 2)``, from ``(C, h, w)`` source and target features."""
    scores = similarity(sample_descriptors(src_features, points, size), trg_features)
    return cell_centres(scores.argmax(dim=1), tuple(trg_features.shape[-2:]), size)


# method.match_resolution: cell (nearest_neighbours) | image (nearest_pixels)
MATCH_RESOLUTIONS = ("cell", "image")


def check_match_resolution(value: str, resize: str) -> None:
    """:class:`ConfigError` naming ``method.match_resolution`` unless ``value`` is one of
    ``MATCH_RESOLUTIONS``; ``image`` needs ``method.resize=stretch`` (the features must cover the
    whole image to be upsampled onto it)."""
    if value not in MATCH_RESOLUTIONS:
        raise ConfigError(
            f"method.match_resolution must be one of {list(MATCH_RESOLUTIONS)}, got {value!r}"
        )
    if value == "image" and resize != "stretch":
        raise ConfigError(
            f"method.match_resolution=image needs method.resize=stretch, got {resize!r} "
            "(letterboxed features do not cover the image); use match_resolution=cell"
        )


def nearest_pixels(
    src_features: torch.Tensor,
    trg_features: torch.Tensor,
    points: torch.Tensor,
    src_hw: tuple[int, int],
    trg_hw: tuple[int, int],
) -> torch.Tensor:
    """DIFT's matching rule, at image resolution: matches ``(N, 2)`` of source ``points``
    ``(N, 2)``, both ``(x, y)`` pixels of the ORIGINAL images, from ``(C, h, w)`` features of each
    image stretched to its model frame.

    Each map is upsampled bilinearly (``align_corners=False``) to its image's ``(H, W)`` pixel
    grid; pixel (row ``r``, column ``c``) stands at ``(x, y) = (c, r)``, the official convention
    (integer keypoints index pixels). A source point reads the pixel nearest to it; its match is
    the target pixel of highest cosine similarity (the first in row-major order on ties).
    """
    src_up = F.interpolate(src_features[None], size=src_hw, mode="bilinear", align_corners=False)
    cols = torch.floor(points[:, 0] + 0.5).long().clamp(0, src_hw[1] - 1)
    rows = torch.floor(points[:, 1] + 0.5).long().clamp(0, src_hw[0] - 1)
    descriptors = src_up[0][:, rows, cols].T
    del src_up
    trg_up = F.interpolate(trg_features[None], size=trg_hw, mode="bilinear", align_corners=False)
    best = similarity(descriptors, trg_up[0]).argmax(dim=1)
    return torch.stack([best % trg_hw[1], best // trg_hw[1]], dim=1).float()


@dataclass(frozen=True)
class FeatureSettings(ScoringSettings):
    """The ``method.*`` keys every feature-matching method has (beside the scoring keys).

    ``feature_cache``: a folder where each image's features are stored once computed and read
    back by later pairs, ranks and runs (:class:`~sdzero.backbones.feature_cache.MethodFeatureCache`
    says what the key holds); it may be shared by runs of any method, backbone and settings.
    ``feature_cache_gb``: its size bound in GB (10^9 bytes); the least recently used entries go
    first.

    ``flip_align``, ``flip_score``, ``soft_argmax_window``, ``soft_argmax_temperature``:
    GeoAware-SC's test-time pose alignment and window soft-argmax
    (:mod:`sdzero.correspondence.refine`); off by default. ``match_resolution``: the matching
    rule, :func:`nearest_neighbours` (``cell``) or :func:`nearest_pixels` (``image``).
    """

    feature_cache: str | None = None  # folder of the on-disk per-image feature cache; null: off
    feature_cache_gb: float = 20.0  # size bound of that folder (least recently used evicted first)
    flip_align: bool = False  # also match the mirrored source; keep the better-agreeing orientation
    flip_score: str = "nn_distance"  # orientation score: nn_distance (official) | mutual_nn
    soft_argmax_window: int = 0  # window half-size in cells (official 5: 11 x 11); 0: argmax
    soft_argmax_temperature: float = 0.02  # softmax temperature on cosine similarity (official)
    match_resolution: str = "cell"  # cell: nearest feature cell | image: nearest pixel (DIFT)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feature_cache is not None and not self.feature_cache.strip():
            raise ConfigError("method.feature_cache must be a folder or null (off), got ''")
        if not self.feature_cache_gb > 0:
            raise ConfigError(f"method.feature_cache_gb must be > 0, got {self.feature_cache_gb}")
        if self.feature_cache is not None and Path(self.feature_cache).is_file():
            raise ConfigError(
                f"method.feature_cache={self.feature_cache!r} is a file; expected a folder"
            )
        if self.flip_score not in FLIP_SCORES:
            raise ConfigError(
                f"method.flip_score must be one of {list(FLIP_SCORES)}, got {self.flip_score!r}"
            )
        if isinstance(self.soft_argmax_window, bool) or not (
            isinstance(self.soft_argmax_window, int) and self.soft_argmax_window >= 0
        ):
            raise ConfigError(
                f"method.soft_argmax_window must be an integer >= 0 (0: off), "
                f"got {self.soft_argmax_window!r}"
            )
        if not self.soft_argmax_temperature > 0:
            raise ConfigError(
                f"method.soft_argmax_temperature must be > 0, got {self.soft_argmax_temperature}"
            )
        check_match_resolution(self.match_resolution, self.resize)
        if self.soft_argmax_window and self.match_resolution != "cell":
            raise ConfigError(
                f"method.soft_argmax_window={self.soft_argmax_window} needs "
                f"method.match_resolution=cell, got {self.match_resolution!r} (the window "
                "soft-argmax runs on the feature grid, as GeoAware-SC's)"
            )


class FeatureMatching(CorrespondenceModule):
    """A correspondence method that only defines :meth:`features`; matching is
    :func:`nearest_neighbours` of the two images' features (one extraction per image)."""

    def features(self, images: torch.Tensor, names: Sequence[str], category: str) -> torch.Tensor:
        """``(B, 3, S, S)`` [0, 1] model-frame images -> ``(B, C, h, w)`` descriptors; ``names``
        name the images (``B`` of them), ``category`` is the pair's (for class prompts)."""
        raise NotImplementedError

    def image_features(self, image: torch.Tensor, name: str, category: str) -> torch.Tensor:
        """``(C, h, w)`` descriptors of one ``(1, 3, S, S)`` image. With ``method.feature_cache``
        set and the module in eval mode, through that cache: ``self.feature_cache`` (a
        :class:`~sdzero.backbones.feature_cache.MethodFeatureCache`, made on the first call)
        counts its hits and misses. A method whose features ignore the category sets
        ``features_use_category = False``; settings that do not change its features may be named
        in ``non_feature_keys``."""

        def compute() -> torch.Tensor:
            return self.features(image, [name], category)[0]

        folder = self.settings.feature_cache
        if folder is None or self.training:  # training: the weights change at every step
            return compute()
        cache = getattr(self, "feature_cache", None)
        if cache is None or cache.folder != Path(folder):
            bound = int(self.settings.feature_cache_gb * 1e9)
            # the scoring and cache keys never change features
            ignored = [f.name for f in fields(FeatureSettings)]
            cache = self.feature_cache = MethodFeatureCache(folder, bound, ignored)
        return cache.image_features(self, image, name, category, compute)

    def on_test_end(self) -> None:
        """Log this rank's feature-cache counts and flip-alignment choices."""
        if self.settings.flip_align:
            done, seen = getattr(self, "flips", (0, 0))
            log.info(
                "rank %d: flip alignment kept the mirrored source in %d of %d pairs",
                self.global_rank,
                done,
                seen,
            )
        cache = getattr(self, "feature_cache", None)
        if cache is not None:
            log.info(
                "rank %d: feature cache %s: %d hits, %d misses (%d corrupt entries rebuilt), "
                "%d entries evicted",
                self.global_rank,
                cache.folder,
                cache.hits,
                cache.misses,
                cache.rebuilt,
                cache.evicted,
            )

    def setup(self, stage: str) -> None:
        """Refuse GeoAware's options on a method whose :meth:`match` is its own (they would be
        ignored), before the base setup loads anything."""
        s = self.settings
        options = s.flip_align or s.soft_argmax_window or s.match_resolution != "cell"
        if type(self).match is not FeatureMatching.match and options:
            raise ConfigError(
                f"method.flip_align / method.soft_argmax_window / method.match_resolution are "
                f"not supported by {type(self).__name__}, which matches with its own rule"
            )
        super().setup(stage)

    def match_grid(
        self, src_features: torch.Tensor, trg_features: torch.Tensor, points: torch.Tensor
    ) -> torch.Tensor:
        """Model-frame matches ``(N, 2)`` of source ``points`` ``(N, 2)`` from ``(C, h, w)``
        grids: :func:`nearest_neighbours`, or with ``method.soft_argmax_window`` the window
        soft-argmax of the same similarities, in model pixels."""
        s = self.settings
        if not s.soft_argmax_window:
            return nearest_neighbours(src_features, trg_features, points, s.image_size)
        grid = tuple(trg_features.shape[-2:])
        scores = similarity(sample_descriptors(src_features, points, s.image_size), trg_features)
        cells = window_soft_argmax(scores, grid, s.soft_argmax_window, s.soft_argmax_temperature)
        return cells * torch.tensor([s.image_size / grid[1], s.image_size / grid[0]]).to(cells)

    def flip_aligned(
        self,
        src: torch.Tensor,
        trg: torch.Tensor,
        points: torch.Tensor,
        pair: PairInfo,
        mirror_extent: float,
        match_features: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``match_features(src_features, trg_features, points)`` on the pair's ``(1, 3, S, S)``
        images; with ``method.flip_align``, GeoAware-SC's pose alignment: the source mirrored
        left-right (features cached under ``src_name + "#flip"``) is matched instead, with
        :func:`~sdzero.correspondence.refine.mirror_x` points (``x -> mirror_extent - x``),
        when its ``method.flip_score`` with the target is strictly lower. The choice is
        recorded in ``self.flips`` (pairs flipped, pairs seen)."""
        src_feats = self.image_features(src, pair.src_name, pair.category)
        trg_feats = self.image_features(trg, pair.trg_name, pair.category)
        points = points.to(src_feats.device)
        if not self.settings.flip_align:
            return match_features(src_feats, trg_feats, points)
        mirrored = self.image_features(src.flip(-1), pair.src_name + "#flip", pair.category)
        score = FLIP_SCORES[self.settings.flip_score]
        flipped = score(mirrored, trg_feats) < score(src_feats, trg_feats)
        done, seen = getattr(self, "flips", (0, 0))
        self.flips = (done + int(flipped), seen + 1)
        if flipped:
            return match_features(mirrored, trg_feats, mirror_x(points, mirror_extent))
        return match_features(src_feats, trg_feats, points)

    @torch.no_grad()
    def match(
        self, src: torch.Tensor, trg: torch.Tensor, points: torch.Tensor, pair: PairInfo
    ) -> torch.Tensor:
        size = self.settings.image_size
        return self.flip_aligned(src, trg, points, pair, size, self.match_grid)

    def predict_pair(
        self,
        src_img: torch.Tensor,
        trg_img: torch.Tensor,
        src_kps: torch.Tensor,
        pair: PairInfo | None = None,
    ) -> torch.Tensor:
        """As :meth:`CorrespondenceModule.predict_pair` (original pixels in and out). With
        ``method.match_resolution=image`` the match is :func:`nearest_pixels` on the original images' pixel grids instead of
        :meth:`match` in the model frame (with ``method.flip_align``, the mirrored source's
        points are ``x -> W - 1 - x``, pixel indices)."""
        if self.settings.match_resolution == "cell":
            return super().predict_pair(src_img, trg_img, src_kps, pair)
        pair = pair or PairInfo()
        src_frame, trg_frame = self.frame(src_img), self.frame(trg_img)
        check_query_points(src_kps, src_frame.w, src_frame.h)
        src_hw, trg_hw = (src_frame.h, src_frame.w), (trg_frame.h, trg_frame.w)

        def match_pixels(src_feats: torch.Tensor, trg_feats: torch.Tensor, points: torch.Tensor):
            return nearest_pixels(src_feats, trg_feats, points.float(), src_hw, trg_hw)

        with torch.no_grad():
            src = src_frame.image(src_img).to(self.device)
            trg = trg_frame.image(trg_img).to(self.device)
            pred = self.flip_aligned(src, trg, src_kps, pair, src_frame.w - 1, match_pixels)
        return pred.cpu()
