"""The crop boxes a pair's fit and inference will draw, known before they run (exact replay).

Every random draw of an item comes from its own generator in a fixed order
(:meth:`~sdzero.correspondence.fitting.PromptCorrespondence.optimise`: the initial tensor, then per
step the crop box and the noise; :meth:`~sdzero.correspondence.fitting.PromptCorrespondence.infer`
continues the same stream: per inference crop a box, except for the 4 corners, and the noise), so
replaying those draws on copies of the generators gives the boxes without running the model. The
optimisation boxes of a pair can then be encoded up front, in large batches
(:meth:`~sdzero.correspondence.latent_cache.LatentCache.prefetch`); the inference boxes after the
corners depend on the running maps and are replayed here only for a given peak (benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdzero.backbones.sd_model import sample_noise
from sdzero.correspondence.crops import corner_crops
from sdzero.correspondence.latent_cache import Box


def _copies(generators: Sequence[torch.Generator]) -> list[torch.Generator]:
    return [torch.Generator().set_state(g.get_state()) for g in generators]


def _noise(pc, generators: Sequence[torch.Generator]) -> None:
    lat = pc.size // 8
    for g in generators:  # advances each stream as ``draw_noise`` does (on the CPU)
        sample_noise((1, 4, lat, lat), pc.cfg.noise, generator=g)


def _fit_replay(pc, points, generators, groups) -> tuple[list[Box], list[torch.Generator]]:
    gens = _copies(generators)
    for g in gens:
        torch.randn(pc.cond_shape, generator=g)
    share = groups if pc.cfg.shared_crop else None
    boxes: list[Box] = []
    for _ in range(pc.cfg.steps):
        boxes += pc.draw_boxes(points, gens, share)
        _noise(pc, gens)
    return boxes, gens


def fit_boxes(
    pc,
    points: torch.Tensor,
    generators: Sequence[torch.Generator],
    groups: Sequence[int] | None = None,
) -> list[Box]:
    """Every box ``pc.optimise(source, points, generators, groups)`` draws, in draw order
    (``steps x items``; without early stopping, which ends items early).

    :param pc: a :class:`~sdzero.correspondence.fitting.PromptCorrespondence`.
    :param points: ``(B, 2)`` query points, model frame.
    :param generators: the items' generators, in the state ``optimise`` will get them (unchanged).
    """
    return _fit_replay(pc, points, generators, groups)[0]


def inference_boxes(
    pc,
    points: torch.Tensor,
    peaks: torch.Tensor,
    generators: Sequence[torch.Generator],
) -> list[Box]:
    """The boxes ``pc.infer`` would draw after fitting ``points`` with ``generators`` if every
    item's running map peaked at ``peaks`` ``(B, 2)`` (model frame) throughout: the 4 corners, then
    random crops around the peak (the real peaks move; a benchmark's stand-in)."""
    _, gens = _fit_replay(pc, points, generators, None)
    corners = corner_crops(pc.size, pc.crop)
    boxes: list[Box] = []
    for k in range(pc.cfg.inference_crops):
        boxes += [corners[k]] * len(gens) if k < 4 else pc.draw_boxes(peaks, gens)
        _noise(pc, gens)
    return boxes
