"""Correspondence by nearest neighbours of dense features: the shape of DIFT, SD+DINO and students.

A feature method maps a batch of model-frame images ``(B, 3, S, S)`` to dense descriptors
``(B, C, h, w)`` on a grid over the ``S x S`` frame (cell ``(i, j)`` covers model pixels
``[j S/w, (j+1) S/w) x [i S/h, (i+1) S/h)``; coordinates are continuous, 0 = the frame's left/top
edge). A source point's descriptor is bilinearly sampled from its grid at the point; its match is
the target cell of highest cosine similarity, reported at the cell's centre. A method whose
settings have ``match_resolution=image`` matches instead as DIFT's official code does
(:func:`nearest_pixels`): both maps upsampled to their original images' pixel grids, the argmax
pixel.

A method whose descriptor of an image depends on the pair (SD+DINO's co-PCA) overrides
:meth:`FeatureMatching.pair_descriptors`; one whose source point reads its cell rather than a
bilinear sample overrides :meth:`FeatureMatching.query_descriptors`. The matching rules below then
serve every method.

GeoAware-SC's test-time options (:mod:`sdzero.correspondence.refine`): ``method.flip_align``
matches the left-right mirrored source too and keeps the orientation whose descriptors agree
better with the target's (``method.flip_score``, ``flip_mask``, ``flip_grid``; the mirrored
source's keypoint ids by ``method.flip_keypoints``, :mod:`sdzero.correspondence.mirror_keypoints`);
``method.soft_argmax_window`` replaces the argmax cell by the window soft-argmax (cell matching
only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdzero.backbones.feature_cache import MethodFeatureCache
from sdzero.correspondence.base import CorrespondenceModule, PairInfo, check_query_points
from sdzero.correspondence.feature_settings import FeatureSettings
from sdzero.correspondence.mirror_keypoints import (
    SPAIR_MIRROR_PARTNERS,
    mirrored_queries,
    partner_map,
)
from sdzero.correspondence.refine import (
    box_mask,
    mirror_box,
    mutual_nn_distance,
    nn_distance,
    window_soft_argmax,
)
from sdzero.errors import ConfigError, InputError
from sdzero.tasks.correspondence import CorrespondenceTask

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


class FeatureMatching(CorrespondenceModule):
    """A correspondence method that only defines :meth:`features`; matching is
    :meth:`match_grid` of the two images' descriptors (one extraction per image)."""

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

    def make_task(self, datamodule: Any) -> CorrespondenceTask:
        """The base's task; with ``method.flip_keypoints=spair`` every category of the
        datamodule must have a row in the SPair-71k partner table."""
        task = super().make_task(datamodule)
        s = self.settings
        if s.flip_align and s.flip_keypoints != "none":
            missing = sorted(set(datamodule.category_names) - set(SPAIR_MIRROR_PARTNERS))
            if missing:
                raise ConfigError(
                    f"method.flip_keypoints={s.flip_keypoints} has left/right keypoint partners "
                    f"for SPair-71k's categories only, not {missing}; use flip_keypoints=none"
                )
        return task

    def pair_descriptors(
        self, src_features: torch.Tensor, trg_features: torch.Tensor, src_name: str, trg_name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(C, h, w)`` descriptors matched for a pair, from the two images'
        :meth:`image_features` (named ``src_name``, ``trg_name``): here the features as they
        are; a method whose descriptors depend on the pair overrides this."""
        return src_features, trg_features

    def query_descriptors(self, features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` descriptors of source ``points`` ``(N, 2)`` (model pixels) on a
        ``(C, h, w)`` grid: :func:`sample_descriptors` (bilinear)."""
        return sample_descriptors(features, points, self.settings.image_size)

    def match_grid(
        self, src_desc: torch.Tensor, trg_desc: torch.Tensor, points: torch.Tensor
    ) -> torch.Tensor:
        """Model-frame matches ``(N, 2)`` of source ``points`` ``(N, 2)`` from ``(C, h, w)``
        descriptors: the centre of the target cell of highest cosine similarity with the
        :meth:`query_descriptors`, or with ``method.soft_argmax_window`` the window soft-argmax
        of the same similarities, in model pixels."""
        s = self.settings
        grid = tuple(trg_desc.shape[-2:])
        scores = similarity(self.query_descriptors(src_desc, points), trg_desc)
        if not s.soft_argmax_window:
            return cell_centres(scores.argmax(dim=1), grid, s.image_size)
        cells = window_soft_argmax(scores, grid, s.soft_argmax_window, s.soft_argmax_temperature)
        return cells * torch.tensor([s.image_size / grid[1], s.image_size / grid[0]]).to(cells)

    def orientation_distance(
        self,
        src_desc: torch.Tensor,
        trg_desc: torch.Tensor,
        src_box: tuple[float, ...] | None,
        trg_box: tuple[float, ...] | None,
    ) -> float:
        """How far apart a pair's ``(C, h, w)`` descriptors lie (``method.flip_score``); with
        ``method.flip_mask=box``, :func:`~sdzero.correspondence.refine.nn_distance` reads the
        cells inside each image's box (model pixels; None: every cell) on its score grid."""
        s = self.settings
        if s.flip_score == "mutual_nn":
            return mutual_nn_distance(src_desc, trg_desc)
        masks = [None, None]
        if s.flip_mask == "box":
            masks = [
                box_mask(
                    box, (s.flip_grid,) * 2 if s.flip_grid else tuple(d.shape[-2:]), s.image_size
                )
                for box, d in ((src_box, src_desc), (trg_box, trg_desc))
            ]
        return nn_distance(src_desc, trg_desc, *masks, grid=s.flip_grid)

    def flip_aligned(
        self,
        src: torch.Tensor,
        trg: torch.Tensor,
        points: torch.Tensor,
        pair: PairInfo,
        mirror_extent: float,
        match_features: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        boxes: tuple[tuple[float, ...] | None, tuple[float, ...] | None] = (None, None),
    ) -> torch.Tensor:
        """``match_features(src_desc, trg_desc, points)`` on the :meth:`pair_descriptors` of the
        pair's ``(1, 3, S, S)`` images; with ``method.flip_align``, GeoAware-SC's pose alignment:
        the source mirrored left-right (features cached under ``src_name + "#flip"``, paired with
        the target as its own pair) gives the matches when its :meth:`orientation_distance` to
        the target is strictly lower, for the queries of
        :func:`~sdzero.correspondence.mirror_keypoints.mirrored_queries` (``x -> mirror_extent -
        x``; ``method.flip_keypoints``). ``boxes``: the source's and target's object boxes in
        model pixels (``method.flip_mask=box``). The choice is recorded in ``self.flips``
        (pairs flipped, pairs seen)."""
        s = self.settings
        src_feats = self.image_features(src, pair.src_name, pair.category)
        trg_feats = self.image_features(trg, pair.trg_name, pair.category)
        points = points.to(src_feats.device)
        src_desc, trg_desc = self.pair_descriptors(
            src_feats, trg_feats, pair.src_name, pair.trg_name
        )
        pred = match_features(src_desc, trg_desc, points)
        if not s.flip_align:
            return pred
        if s.flip_keypoints != "none" and pair.kps_ids is None:
            raise InputError(
                f"method.flip_keypoints={s.flip_keypoints} needs the pair's keypoint ids "
                "(SPair-71k's kps_ids); this pair has none"
            )
        name = pair.src_name + "#flip"
        mirrored = self.image_features(src.flip(-1), name, pair.category)
        mir_desc, mir_trg_desc = self.pair_descriptors(mirrored, trg_feats, name, pair.trg_name)
        src_box, trg_box = boxes
        mir_box = mirror_box(src_box, s.image_size)
        flipped = self.orientation_distance(
            mir_desc, mir_trg_desc, mir_box, trg_box
        ) < self.orientation_distance(src_desc, trg_desc, src_box, trg_box)
        done, seen = getattr(self, "flips", (0, 0))
        self.flips = (done + int(flipped), seen + 1)
        if not flipped:
            return pred
        partners = partner_map(s.flip_keypoints, pair.category)
        queries, takes = mirrored_queries(points, mirror_extent, pair.kps_ids, partners)
        mirrored_pred = match_features(mir_desc, mir_trg_desc, queries)
        return torch.where(takes[:, None].to(pred.device), mirrored_pred, pred)

    @torch.no_grad()
    def match(
        self, src: torch.Tensor, trg: torch.Tensor, points: torch.Tensor, pair: PairInfo
    ) -> torch.Tensor:
        """Model-frame :meth:`match_grid` through :meth:`flip_aligned`. Model-frame images carry
        no boxes: ``method.flip_mask=box`` reads them in :meth:`predict_pair`, which maps the
        pair's boxes into the frame."""
        size = self.settings.image_size
        return self.flip_aligned(src, trg, points, pair, size, self.match_grid)

    def predict_pair(
        self,
        src_img: torch.Tensor,
        trg_img: torch.Tensor,
        src_kps: torch.Tensor,
        pair: PairInfo | None = None,
    ) -> torch.Tensor:
        """As :meth:`CorrespondenceModule.predict_pair` (original pixels in and out), through
        :meth:`flip_aligned` with the pair's boxes in the model frame: :meth:`match_grid` in the
        model frame, or with ``method.match_resolution=image`` :func:`nearest_pixels` on the
        original images' pixel grids (with ``method.flip_align``, the mirrored source's points
        are then ``x -> W - 1 - x``, pixel indices)."""
        pair = pair or PairInfo()
        src_frame, trg_frame = self.frame(src_img), self.frame(trg_img)
        check_query_points(src_kps, src_frame.w, src_frame.h)
        boxes = (_model_box(src_frame, pair.src_bbox), _model_box(trg_frame, pair.trg_bbox))
        src_hw, trg_hw = (src_frame.h, src_frame.w), (trg_frame.h, trg_frame.w)

        def match_pixels(src_desc: torch.Tensor, trg_desc: torch.Tensor, points: torch.Tensor):
            return nearest_pixels(src_desc, trg_desc, points.float(), src_hw, trg_hw)

        with torch.no_grad():
            src = src_frame.image(src_img).to(self.device)
            trg = trg_frame.image(trg_img).to(self.device)
            if self.settings.match_resolution == "image":
                pred = self.flip_aligned(
                    src, trg, src_kps, pair, src_frame.w - 1, match_pixels, boxes
                )
                return pred.cpu()
            points = src_frame.to_model(src_kps.float())
            size = self.settings.image_size
            pred = self.flip_aligned(src, trg, points, pair, size, self.match_grid, boxes)
        return trg_frame.to_original(pred.cpu())


def _model_box(frame: Any, box: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """An ``(x1, y1, x2, y2)`` box of original pixels in ``frame``'s model pixels."""
    if box is None:
        return None
    return tuple(
        frame.to_model(torch.tensor(box, dtype=torch.float32).view(2, 2)).flatten().tolist()
    )
