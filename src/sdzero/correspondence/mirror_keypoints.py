"""Which query answers for a keypoint when the mirrored source is matched (GeoAware-SC's pose
alignment, ``pck_train.py`` with ``--ADAPT_FLIP``): ``method.flip_keypoints``.

Mirroring an image turns an object's left parts into what look like right parts: on a car seen
from its left, the left headlight of the mirrored picture stands where the right one would. A
keypoint id names a part of the object (SPair-71k: "left headlight"), so the mirrored source
answers for keypoint ``a`` at the mirrored position of ``a``'s left/right partner ``b``. The
official rule, per query keypoint ``a`` of a pair whose mirrored source is kept:

* ``a`` has no partner (a part on the object's symmetry plane): its query is ``a`` mirrored;
* ``a``'s partner ``b`` is annotated in the pair too (SPair lists exactly the keypoints visible in
  both images, the official ``vis``): its query is ``b`` mirrored;
* ``b`` is not in the pair: ``a`` keeps its match from the source as it is (the official
  ``vis_flip`` gate).

``none`` treats every keypoint as its own mirror (ids that follow pixels, as the synthetic
``mirror`` pairs number them). ``spair`` reads :data:`SPAIR_MIRROR_PARTNERS`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdzero.correspondence.refine import mirror_x

# SPair-71k's left/right keypoint partners, by category, as slot ids of its ImageAnnotation
# ``kps`` (the pair JSON's ``kps_ids``). Slots absent here lie on the object's symmetry plane or
# are never annotated (bicycle 11 and 12, bus 8 and 9). The pairs are those of GeoAware-SC's
# training-time table, in the original slot ids; each pair is one left and one right slot of its
# per-slot side table, every sided slot is in a pair, and with the never-annotated slots removed
# and the rest renumbered in order they are its test-time table.
SPAIR_MIRROR_PARTNERS: dict[str, tuple[tuple[int, int], ...]] = {
    "aeroplane": ((4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19), (20, 21)),
    "bicycle": ((2, 3), (6, 7), (9, 10)),
    "bird": ((1, 2), (4, 5), (7, 8), (10, 11), (12, 13), (14, 15)),
    "boat": ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)),
    "bottle": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)),
    "bus": (
        (0, 1), (2, 3), (5, 6), (10, 20), (11, 21), (12, 22), (13, 23), (14, 24), (15, 25),
        (16, 17), (18, 19), (26, 27), (28, 29),
    ),
    "car": (
        (0, 1), (2, 3), (6, 7), (10, 20), (11, 21), (12, 22), (13, 23), (14, 24), (15, 25),
        (16, 17), (18, 19), (26, 27), (28, 29),
    ),
    "cat": ((0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12)),
    "chair": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13)),
    "cow": ((0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12), (15, 16), (17, 18), (19, 20)),
    "dog": ((0, 1), (2, 3), (4, 5), (9, 10), (11, 12)),
    "horse": ((0, 1), (2, 3), (4, 5), (6, 7), (10, 11), (12, 13), (16, 17), (18, 19)),
    "motorbike": ((0, 1), (2, 3)),
    "person": ((0, 1), (2, 3), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19)),
    "pottedplant": ((0, 2), (4, 5), (6, 8)),
    "sheep": ((0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12), (15, 16), (17, 18), (19, 20)),
    "train": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17)),
    "tvmonitor": ((0, 2), (4, 6), (3, 7), (8, 10), (11, 15), (12, 14)),
}  # fmt: skip

# method.flip_keypoints: none (every keypoint its own mirror) | spair (SPAIR_MIRROR_PARTNERS)
MIRROR_KEYPOINT_TABLES = ("none", "spair")


def partner_map(table: str, category: str) -> dict[int, int]:
    """``{id: partner id}`` (both directions) of ``category`` under ``table`` (one of
    :data:`MIRROR_KEYPOINT_TABLES`); ``KeyError`` for a category the table lacks."""
    if table == "none":
        return {}
    pairs = SPAIR_MIRROR_PARTNERS[category]
    return {**{a: b for a, b in pairs}, **{b: a for a, b in pairs}}


def mirrored_queries(
    points: torch.Tensor,
    extent: float,
    kps_ids: Sequence[int] | None,
    partners: dict[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries in the mirrored source for source ``points`` ``(N, 2)`` (``(x, y)`` in the
    frame that :func:`~sdzero.correspondence.refine.mirror_x` mirrors with ``extent``), whose
    first ``len(kps_ids)`` are keypoints with those ids (None only with no ``partners``; points
    past them, such as ``data.query_points=grid:N``'s, have no id and are their own mirror):
    ``(queries (N, 2), takes (N,) bool)``, ``takes[n]`` False where point ``n`` keeps its match
    from the unmirrored source (the module docstring's rule)."""
    mirrored = mirror_x(points, extent)
    takes = torch.ones(len(points), dtype=torch.bool)
    if not partners:
        return mirrored, takes
    if kps_ids is None or len(kps_ids) > len(points):
        raise ValueError(f"{len(points)} query points cannot have the keypoint ids {kps_ids}")
    row = {int(k): n for n, k in enumerate(kps_ids)}
    source = list(range(len(points)))
    for n, k in enumerate(kps_ids):
        partner = partners.get(int(k))
        if partner is None:
            continue
        if partner in row:
            source[n] = row[partner]
        else:
            takes[n] = False
    return mirrored[source], takes
