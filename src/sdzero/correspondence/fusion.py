"""SD+DINO's descriptor of an image pair (Zhang et al., NeurIPS 2023, github Junyi42/sd-dino):
co-PCA of each Stable Diffusion layer over the pair, the layers fused coarse to fine, and the SD
and DINO parts each L2-normalised, weighted and concatenated (``method.fusion=co_pca``).
GeoAware-SC's zero-shot descriptor (github Junyi42/GeoAware-SC, ``pck_train.py`` with
``--DUMMY_NET``) keeps the raw layers instead, each resized once to the finest grid
(:func:`stack_layers`, ``method.fusion=concat``), then the same normalised concatenation.

Every map here is ``(C, h, w)`` on one image's feature grid, rows first (cell ``(i, j)`` is row
``i``, column ``j``); a pair's two maps have the same grid.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

PCA_SOLVERS = ("lowrank", "svd")  # lowrank: torch.pca_lowrank (official) | svd: exact
FUSIONS = ("co_pca", "concat")  # method.fusion: SD+DINO's per-pair co-PCA | GeoAware's raw layers


@contextmanager
def seeded_draws(device: torch.device, seed: int) -> Iterator[None]:
    """Run the block with the global random stream of ``device`` (and of the CPU) seeded by
    ``seed``, restoring both afterwards: ``torch.pca_lowrank`` draws its random projection there
    and takes no generator."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            index = torch.cuda.current_device() if device.index is None else device.index
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def co_pca(
    src: torch.Tensor, trg: torch.Tensor, dim: int, solver: str = "lowrank", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two ``(C, h, w)`` maps of a pair projected to ``(dim, h, w)`` each, on the principal
    axes of their cells pooled (the official ``co_pca``): the ``2 h w`` rows are centred on their
    joint mean and multiplied by the first ``dim`` right singular vectors. ``solver="lowrank"`` takes
    them from ``torch.pca_lowrank(rows, q=dim)`` (randomised, 2 power iterations, as the official
    code) with its random draws seeded by ``seed``; ``"svd"`` from an exact SVD."""
    if src.shape != trg.shape:
        raise ValueError(f"co-PCA needs maps of one shape, got {tuple(src.shape)} and {trg.shape}")
    channels, h, w = src.shape
    rows = torch.cat([src.flatten(1), trg.flatten(1)], dim=1).T.float()
    if not 0 < dim <= min(rows.shape):
        raise ValueError(
            f"co-PCA to {dim} dimensions needs 1..{min(rows.shape)} for a pair of "
            f"{channels}-channel {h}x{w} maps (method.pca_dims)"
        )
    centred = rows - rows.mean(dim=0, keepdim=True)
    if solver == "lowrank":
        with seeded_draws(centred.device, seed):
            axes = torch.pca_lowrank(centred, q=dim)[2]
    elif solver == "svd":
        axes = torch.linalg.svd(centred, full_matrices=False).Vh.T
    else:
        raise ValueError(f"method.pca_solver must be one of {list(PCA_SOLVERS)}, got {solver!r}")
    reduced = (centred @ axes[:, :dim]).T  # (dim, 2 h w)
    return reduced[:, : h * w].reshape(dim, h, w), reduced[:, h * w :].reshape(dim, h, w)


def fuse_layers(maps: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``(sum C_i, h, w)``: the SD layer maps ``maps`` (coarse to fine) folded as the official code
    folds s5, s4, s3: start from the coarsest; for each finer map, the running stack is resized
    to its grid (bilinear, ``align_corners=False``) and put behind it. The channels thus run
    finest first; ``weights[i]`` then multiplies the i-th run of ``C_i`` channels counted in the
    order of ``maps`` (the official slices, which meet the layers they name only when every
    ``C_i`` is equal, as with the default 256 each)."""
    if len(maps) != len(weights):
        raise ValueError(f"{len(weights)} layer weights for {len(maps)} layers")
    fused = maps[0][None]
    for finer in maps[1:]:
        grown = F.interpolate(fused, size=finer.shape[-2:], mode="bilinear", align_corners=False)
        fused = torch.cat([finer[None], grown], dim=1)
    scale = torch.cat(
        [torch.full((m.shape[0],), float(k)) for m, k in zip(maps, weights, strict=True)]
    )
    return fused[0] * scale.to(fused).view(-1, 1, 1)


def stack_layers(maps: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``(sum C_i, h, w)``: the raw SD layer maps ``maps`` (coarse to fine) as GeoAware-SC stacks
    them: finest first, each coarser map resized bilinearly (``align_corners=False``) straight to
    the finest grid, ``maps[i]`` times ``weights[i]`` (GeoAware has no layer weights: 1 each)."""
    if len(maps) != len(weights):
        raise ValueError(f"{len(weights)} layer weights for {len(maps)} layers")
    size = maps[-1].shape[-2:]
    grown = [
        F.interpolate(m[None], size=size, mode="bilinear", align_corners=False)[0] * float(k)
        for m, k in zip(maps, weights, strict=True)
    ]
    return torch.cat(grown[::-1], dim=0)


def fuse_descriptors(
    sd: torch.Tensor, dino: torch.Tensor, sd_weight: float, dino_weight: float
) -> torch.Tensor:
    """``(C_sd + C_dino, h, w)``: at each cell the SD and the DINO descriptor, each divided by its
    L2 norm, times ``sd_weight`` / ``dino_weight``, concatenated (SD first). Every cell's norm is
    then the same, so the official nearest neighbour by L2 distance is the one by cosine."""
    if sd.shape[-2:] != dino.shape[-2:]:
        raise ValueError(f"SD grid {tuple(sd.shape[-2:])} != DINO grid {tuple(dino.shape[-2:])}")
    sd = sd / sd.norm(dim=0, keepdim=True) * sd_weight
    dino = dino / dino.norm(dim=0, keepdim=True) * dino_weight
    return torch.cat([sd, dino.to(sd)], dim=0)


def pack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat float32 tensor holding the ``(C, h, w)`` maps ``parts``: their count, their
    shapes, then their values (what the per-image feature cache stores)."""
    head = [len(parts), *(d for p in parts for d in p.shape)]
    values = [p.detach().float().flatten() for p in parts]
    return torch.cat([torch.tensor(head, dtype=torch.float32, device=values[0].device), *values])


def unpack(flat: torch.Tensor) -> list[torch.Tensor]:
    """The maps of :func:`pack`, in order."""
    count = int(flat[0])
    shapes = flat[1 : 1 + 3 * count].long().view(count, 3).tolist()
    sizes = [c * h * w for c, h, w in shapes]
    values = flat[1 + 3 * count :].split(sizes)
    return [v.view(*shape) for v, shape in zip(values, shapes, strict=True)]
