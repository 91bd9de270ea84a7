"""The ``method.*`` keys every feature-matching method has (:class:`FeatureSettings`), each
checked once here: the feature cache, GeoAware-SC's test-time options and the matching rule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdzero.correspondence.base import ScoringSettings
from sdzero.correspondence.mirror_keypoints import MIRROR_KEYPOINT_TABLES
from sdzero.correspondence.refine import FLIP_MASKS, FLIP_SCORES
from sdzero.errors import ConfigError

# method.match_resolution: cell (nearest feature cell) | image (nearest pixel, DIFT)
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


@dataclass(frozen=True)
class FeatureSettings(ScoringSettings):
    """The ``method.*`` keys every feature-matching method has (beside the scoring keys).

    ``feature_cache``: a folder where each image's features are stored once computed and read
    back by later pairs, ranks and runs (:class:`~sdzero.backbones.feature_cache.MethodFeatureCache`
    says what the key holds); it may be shared by runs of any method, backbone and settings.
    ``feature_cache_gb``: its size bound in GB (10^9 bytes); the least recently used entries go
    first.

    ``flip_align``, ``flip_score``, ``flip_mask``, ``flip_grid``, ``flip_keypoints``,
    ``soft_argmax_window``, ``soft_argmax_temperature``: GeoAware-SC's test-time pose alignment
    and window soft-argmax (:mod:`sdzero.correspondence.refine`); off by default, and their
    defaults are the plainest rule (GeoAware's own values are in ``experiment=geoaware_zs``).
    ``match_resolution``: the matching rule, :func:`~sdzero.correspondence.matching.FeatureMatching.match_grid` (``cell``)
    or :func:`~sdzero.correspondence.matching.nearest_pixels` (``image``).
    """

    feature_cache: str | None = None  # folder of the on-disk per-image feature cache; null: off
    feature_cache_gb: float = 20.0  # size bound of that folder (least recently used evicted first)
    flip_align: bool = False  # also match the mirrored source; keep the better-agreeing orientation
    flip_score: str = "nn_distance"  # orientation score: nn_distance (official) | mutual_nn
    flip_mask: str = "none"  # cells nn_distance reads: none (all) | box (the annotated boxes)
    flip_grid: int = 0  # nn_distance on grids resized to this side (official 64); 0: as they are
    flip_keypoints: str = "none"  # mirrored-source ids: none (its own) | spair (left/right swapped)
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
        if self.flip_mask not in FLIP_MASKS:
            raise ConfigError(
                f"method.flip_mask must be one of {list(FLIP_MASKS)}, got {self.flip_mask!r}"
            )
        if self.flip_keypoints not in MIRROR_KEYPOINT_TABLES:
            raise ConfigError(
                f"method.flip_keypoints must be one of {list(MIRROR_KEYPOINT_TABLES)}, "
                f"got {self.flip_keypoints!r}"
            )
        for key in ("soft_argmax_window", "flip_grid"):
            value = getattr(self, key)
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 0):
                raise ConfigError(f"method.{key} must be an integer >= 0 (0: off), got {value!r}")
        if self.flip_score == "mutual_nn" and (self.flip_mask != "none" or self.flip_grid):
            raise ConfigError(
                f"method.flip_score=mutual_nn reads every cell of the grids as they are; "
                f"method.flip_mask={self.flip_mask!r} and method.flip_grid={self.flip_grid} "
                "apply to flip_score=nn_distance only (set none and 0)"
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
