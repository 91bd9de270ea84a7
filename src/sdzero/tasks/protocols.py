"""Correspondence scoring protocols as named presets (``protocol=<name>``).

A protocol is how a paper's official code scores PCK: the threshold length, the frame errors are
measured in, the alphas, ``<=`` or ``<``, and which averages it reports. Config composition applies
its ``method.pck_*`` values after the experiment and before the command line (an explicit
``method.pck_*`` override still wins), to any correspondence method; ``metrics.json`` names it and
lists its averages. ``protocol=null`` keeps the method's and experiment's own values.

Averages are ``metrics.json`` keys: ``pck`` (mean over pairs of the per-pair percentage: "per
image"), ``pck_point`` (pooled over all keypoints: "per point"), ``pck_category_mean`` and
``pck_point_category_mean`` (unweighted means over categories of the per-category per-pair or
pooled values). The first one listed is the number the paper's tables print.

A benchmark without the protocol's threshold (PF-Willow has no object boxes) gets the value its
papers use instead, keyed by the data option name (``by_data``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sdzero.errors import ConfigError

SCORING_KEYS = ("pck_threshold", "pck_frame", "pck_alphas", "pck_inclusive")
AVERAGES = ("pck", "pck_point", "pck_category_mean", "pck_point_category_mean")


@dataclass(frozen=True)
class Protocol:
    """One scoring preset: ``scoring`` holds ``method.pck_*`` values (see
    :class:`~sdzero.correspondence.base.ScoringSettings`), ``by_data`` the values that differ on a
    data option (``{"pfwillow": {"pck_threshold": "bbox-keypoints"}}``), ``averages`` the
    ``metrics.json`` averages the protocol reports, headline first."""

    name: str
    description: str
    scoring: Mapping[str, Any]
    averages: tuple[str, ...]
    by_data: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for values in (self.scoring, *self.by_data.values()):
            unknown = sorted(set(values) - set(SCORING_KEYS))
            if unknown:
                raise ValueError(
                    f"protocol {self.name!r}: {unknown} are not scoring keys {SCORING_KEYS}"
                )
        if not self.averages or not set(self.averages) <= set(AVERAGES):
            raise ValueError(
                f"protocol {self.name!r}: averages {self.averages} must be some of {AVERAGES}"
            )

    def method_values(self, data_option: str | None) -> dict[str, Any]:
        """The ``method.pck_*`` values on the data option ``data_option`` (lists, not tuples)."""
        values = {**self.scoring, **self.by_data.get(str(data_option), {})}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


_PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(protocol: Protocol) -> Protocol:
    """Make ``protocol`` available as ``protocol=<its name>``."""
    _PROTOCOLS[protocol.name] = protocol
    return protocol


def protocol_names() -> list[str]:
    return sorted(_PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    """The registered protocol ``name``; :class:`ConfigError` listing the known ones otherwise."""
    if name not in _PROTOCOLS:
        close = difflib.get_close_matches(str(name), protocol_names(), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown protocol {name!r}; expected null or one of {', '.join(protocol_names())}."
            f"{hint}"
        )
    return _PROTOCOLS[name]


# Keypoint boxes on PF-Willow, the image on PF-PASCAL (no paper of these three scores them
# otherwise): what DistillDIFT, SD-DINO and GeoAware-SC use there.
_FIELD_DATA = MappingProxyType(
    {"pfwillow": {"pck_threshold": "bbox-keypoints"}, "pfpascal": {"pck_threshold": "image"}}
)

register_protocol(
    Protocol(
        name="hedlin",
        description=(
            "ubc-vision/LDM_correspondences (utils/evaluation.py): errors and thresholds in the "
            "512x512 stretched frame, <=, alpha 0.05 and 0.1, mean over pairs (and over "
            "categories). SPair: the SOURCE box (a CATs leftover); PF-Willow: the keypoint box "
            "with the -1 padding; CUB: the target box times the x-scale only; PF-PASCAL: the "
            "image, as in CATs, whose loaders the code took"
        ),
        scoring={
            "pck_threshold": "bbox-source",
            "pck_frame": "resized",
            "pck_alphas": (0.05, 0.1),
            "pck_inclusive": True,
        },
        averages=("pck", "pck_category_mean"),
        by_data={
            "pfwillow": {"pck_threshold": "bbox-keypoints-padded"},
            "cub": {"pck_threshold": "bbox-target-xscale"},
            "pfpascal": {"pck_threshold": "image"},
        },
    )
)
register_protocol(
    Protocol(
        name="dift",
        description=(
            "Tsingularity/dift (eval_spair.py): the target box in original pixels, <=, alpha "
            "0.1, per image (mean over all pairs) and per point (pooled)"
        ),
        scoring={
            "pck_threshold": "bbox-target",
            "pck_frame": "original",
            "pck_alphas": (0.1,),
            "pck_inclusive": True,
        },
        averages=("pck", "pck_point"),
        by_data=_FIELD_DATA,
    )
)
_STRICT = {
    "pck_threshold": "bbox-target",
    "pck_frame": "original",  # their 840 px letterbox scales errors and box alike
    "pck_alphas": (0.01, 0.05, 0.1),
    "pck_inclusive": False,
}
_STRICT_DATA = MappingProxyType(
    {**_FIELD_DATA, "pfpascal": {"pck_threshold": "image", "pck_alphas": (0.05, 0.1, 0.15)}}
)
register_protocol(
    Protocol(
        name="geoaware",
        description=(
            "Junyi42/GeoAware-SC (pck_train.py): the target box, strict <, alpha 0.01/0.05/0.1; "
            "per image by default (categories weighted by pair count = the mean over all pairs), "
            "per point with KPT_RESULT (weighted by points = pooled). PF-PASCAL: the image, "
            "alpha 0.05/0.1/0.15"
        ),
        scoring=_STRICT,
        averages=("pck", "pck_point"),
        by_data=_STRICT_DATA,
    )
)
register_protocol(
    Protocol(
        name="sd_dino",
        description=(
            "Junyi42/sd-dino (pck_spair_pascal.py): GeoAware's scoring; keypoints pooled per "
            "category, then the categories averaged (its 'Average PCK'; it samples 20 pairs per "
            "category by default, where its weighted mean equals this one)"
        ),
        scoring=_STRICT,
        averages=("pck_point_category_mean", "pck_point"),
        by_data=_STRICT_DATA,
    )
)
