"""Foreground/background mask proposers for support images (OVDiff's FG/BG split).

A proposer maps one support image ``(3, H, W)`` in [0, 1] and its attribution map ``(H, W)`` in
[0, 1] (or None) to boolean ``(fg, bg)`` masks ``(H, W)``. Registered kinds:

- ``attention``: the official fallback when CutLER finds nothing: fg = attribution > 0.5,
  bg = attribution < 0.2. Needs attribution maps (generated support sets have them).
- ``cutler``: the official default: CutLER instance masks ranked by mean attribution (see
  :func:`rank_instance_masks`); needs detectron2, the CutLER code and its weights.
- ``saliency``: for support images read from a folder (no attribution): the attention thresholds
  applied to a border-contrast saliency map (colour distance to the median border colour,
  min-max normalised). A heuristic that suits centred objects on plain backgrounds; not in OVDiff.
- ``full``: the whole image is foreground and there is no background (no BG prototypes).

Add a kind with ``@register_mask_proposer("name")`` on a factory ``(**options) -> MaskProposer``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from sdzero.errors import MissingDependencyError, MissingFileError

FG_THRESHOLD = 0.5
BG_THRESHOLD = 0.2
CUTLER_SCORE_THRESHOLD = 0.35


class MaskProposer(Protocol):
    def __call__(
        self, image: torch.Tensor, attribution: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


_REGISTRY: dict[str, Callable[..., MaskProposer]] = {}


def register_mask_proposer(
    name: str,
) -> Callable[[Callable[..., MaskProposer]], Callable[..., MaskProposer]]:
    """Decorator registering a proposer factory under ``name``."""

    def add(factory: Callable[..., MaskProposer]) -> Callable[..., MaskProposer]:
        if name in _REGISTRY:
            raise ValueError(f"mask proposer {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return add


def available_mask_proposers() -> list[str]:
    return sorted(_REGISTRY)


def build_mask_proposer(kind: str, **options: Any) -> MaskProposer:
    """The proposer registered as ``kind``, built once (load models here, not per image)."""
    if kind not in _REGISTRY:
        raise ValueError(
            f"unknown mask proposer {kind!r}; expected one of {available_mask_proposers()}"
        )
    return _REGISTRY[kind](**options)


def propose_masks(
    kind: str, image: torch.Tensor, attribution: torch.Tensor | None, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fg, bg)`` bool ``(H, W)`` masks of ``image`` ``(3, H, W)`` by the ``kind`` proposer."""
    return build_mask_proposer(kind, **options)(image, attribution)


def check_support_image(image: torch.Tensor, attribution: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless ``image`` is ``(3, H, W)`` and ``attribution`` ``(H, W)``."""
    if not (isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"support image must be a (3, H, W) tensor in [0, 1], got {got}")
    if attribution is not None and tuple(attribution.shape) != tuple(image.shape[1:]):
        raise ValueError(
            f"attribution map must be (H, W) = {tuple(image.shape[1:])}, got "
            f"{tuple(attribution.shape)}"
        )


def threshold_masks(attribution: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OVDiff's fallback: fg = attribution > 0.5, bg = attribution < 0.2."""
    return attribution > FG_THRESHOLD, attribution < BG_THRESHOLD


def _need_attribution(kind: str, attribution: torch.Tensor | None) -> torch.Tensor:
    if attribution is None:
        raise ValueError(
            f"mask proposer {kind!r} needs attribution maps, which only generated support sets "
            "have; for support images read from a folder use mask_proposer='saliency' or 'full'"
        )
    return attribution


@register_mask_proposer("attention")
def _attention() -> MaskProposer:
    def propose(image: torch.Tensor, attribution: torch.Tensor | None):
        check_support_image(image, attribution)
        return threshold_masks(_need_attribution("attention", attribution))

    return propose


def border_saliency(image: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` in [0, 1]: RGB distance to the median colour of the 1-pixel image border,
    min-max scaled."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    dist = (image - border.median(dim=1).values[:, None, None]).norm(dim=0)
    return (dist - dist.min()) / (dist.max() - dist.min()).clamp(min=1e-12)


@register_mask_proposer("saliency")
def _saliency() -> MaskProposer:
    def propose(image: torch.Tensor, attribution: torch.Tensor | None):
        check_support_image(image, attribution)
        return threshold_masks(border_saliency(image.float()))

    return propose


@register_mask_proposer("full")
def _full() -> MaskProposer:
    def propose(image: torch.Tensor, attribution: torch.Tensor | None):
        check_support_image(image, attribution)
        shape = image.shape[1:]
        return torch.ones(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)

    return propose


def erode(mask: torch.Tensor) -> torch.Tensor:
    """One binary erosion with the 4-neighbour cross; pixels beyond the border count as set
    (``skimage.morphology.binary_erosion``'s default footprint and border)."""
    padded = F.pad(mask[None, None].float(), (1, 1, 1, 1), value=1.0)[0, 0]
    out = mask.clone()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        out &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]] > 0
    return out


def rank_instance_masks(
    instances: torch.Tensor, attribution: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """OVDiff's CutLER ranking. ``instances`` ``(M, H, W)`` bool, ``attribution`` ``(H, W)``.

    Mask 0 is the complement of the instances' union; every mask is weighted by its mean
    attribution and the masks are ranked by weight, highest first. Each pixel goes to the ranked
    mask maximising ``covers * weight`` (first on ties), so to the covering mask of highest weight.
    fg = the pixels of the top-ranked mask; bg = those of the lowest-ranked mask that owns any
    pixel, with attribution < 0.2, eroded once. As officially, an empty mask (no instance pixel,
    or instances covering every pixel) has weight 0/0 = NaN, ranks first and owns every pixel
    (NaN wins the argmax): fg is the whole image. With no instance (M = 0) the threshold
    fallback is used.
    """
    if instances.shape[0] == 0:
        return threshold_masks(attribution)
    masks = torch.cat([~instances.any(0, keepdim=True), instances.bool()]).float()
    weight = (masks * attribution.float()).sum((1, 2)) / masks.sum((1, 2))
    order = torch.argsort(weight, descending=True, stable=True)  # NaN counts as largest
    # An uncovered pixel of a mask scores 0 (NaN for a NaN weight, which fills its whole plane).
    owner = (masks[order] * weight[order, None, None]).argmax(0)  # rank of each pixel's mask
    fg = owner == 0
    bg = erode((owner == owner.max()) & (attribution < BG_THRESHOLD))
    return fg, bg


@register_mask_proposer("cutler")
def _cutler(
    cutler_root: str | None = None,
    weights: str | None = None,
    config: str | None = None,
    device: str = "cpu",
) -> MaskProposer:
    """CutLER (Cascade Mask R-CNN R50-FPN, ``cutler_cascade_final.pth``, score threshold 0.35).

    ``cutler_root``: the ``cutler/`` folder of a CutLER checkout (env ``SDZERO_CUTLER_ROOT``);
    ``weights``: the checkpoint (env ``SDZERO_CUTLER_WEIGHTS``); ``config`` defaults to its
    ``model_zoo/configs/CutLER-ImageNet/cascade_mask_rcnn_R_50_FPN.yaml``.
    """
    predict = _load_cutler(cutler_root, weights, config, device)

    def propose(image: torch.Tensor, attribution: torch.Tensor | None):
        check_support_image(image, attribution)
        return rank_instance_masks(predict(image), _need_attribution("cutler", attribution))

    return propose


def short_side_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """``(h, w)`` of torchvision's ``Resize(short, max_size=max_size)``: the short side becomes
    ``short``, the long side ``int(short * long / short_side)``, both scaled down (rounding down)
    if the long side would exceed ``max_size``."""
    lo, hi = min(height, width), max(height, width)
    new_lo, new_hi = short, int(short * hi / lo)
    if new_hi > max_size:
        new_lo, new_hi = int(max_size * new_lo / new_hi), max_size
    return (new_lo, new_hi) if height <= width else (new_hi, new_lo)


class CutlerInstances:
    """``image (3, H, W) in [0, 1] -> instances (M, H, W) bool`` by a CutLER detectron2 ``model``,
    called as the official ``utils/cutler.py`` does: the RGB image times 255 (float), resized to a
    short side of ``min_size`` (long side at most ``max_size``) by bilinear interpolation without
    antialias (torchvision 0.13 on tensors), in a batch of one with the original size as the output
    size. The model sees RGB, its ``INPUT.FORMAT``; detectron2's ``DefaultPredictor`` would take
    BGR and flip it itself."""

    def __init__(self, model: Callable[[list[dict[str, Any]]], Any], min_size: int, max_size: int):
        self.model = model
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        size = short_side_size(height, width, self.min_size, self.max_size)
        pixels = F.interpolate(
            image[None].float() * 255, size=size, mode="bilinear", align_corners=False
        )[0]
        out = self.model([{"image": pixels, "height": height, "width": width}])
        return out[0]["instances"].pred_masks.cpu().bool()


_CUTLER_HELP = (
    "The 'cutler' mask proposer needs detectron2, the CutLER code and its weights:\n"
    "  pip install 'git+https://github.com/facebookresearch/detectron2.git'\n"
    "  git clone https://github.com/facebookresearch/CutLER\n"
    "  wget http://dl.fbaipublicfiles.com/cutler/checkpoints/cutler_cascade_final.pth\n"
    "then set SDZERO_CUTLER_ROOT=<CutLER>/cutler and SDZERO_CUTLER_WEIGHTS=<.pth> (or pass "
    "cutler_root= / weights=). Without it use mask_proposer='attention' (OVDiff's fallback)."
)


def cutler_missing(
    cutler_root: str | None = None, weights: str | None = None
) -> tuple[type[Exception], str] | None:
    """What the ``cutler`` proposer lacks (detectron2, the CutLER code, its weights; the folders
    default to ``SDZERO_CUTLER_ROOT`` / ``SDZERO_CUTLER_WEIGHTS``) as ``(error class, reason)``,
    or None; checked without importing anything."""
    import importlib.util

    root = cutler_root or os.environ.get("SDZERO_CUTLER_ROOT")
    weights = weights or os.environ.get("SDZERO_CUTLER_WEIGHTS")
    if importlib.util.find_spec("detectron2") is None:
        return MissingDependencyError, "detectron2 is not installed"
    if not root or not (Path(root) / "config" / "cutler_config.py").is_file():
        return MissingFileError, f"CutLER code not found at cutler_root={root!r}"
    if not weights or not Path(weights).is_file():
        return MissingFileError, f"CutLER weights not found at {weights!r}"
    return None


def _load_cutler(
    cutler_root: str | None, weights: str | None, config: str | None, device: str
) -> CutlerInstances:
    """The CutLER model of the official ``utils/cutler.py`` (CutLER's own ``build_model``, whose
    registries hold its cascade heads), wrapped as :class:`CutlerInstances`."""
    import sys

    missing = cutler_missing(cutler_root, weights)
    if missing is not None:
        error, reason = missing
        raise error(f"method.mask_proposer=cutler: {reason}.\n{_CUTLER_HELP}")
    root = cutler_root or os.environ.get("SDZERO_CUTLER_ROOT")
    weights = weights or os.environ.get("SDZERO_CUTLER_WEIGHTS")
    config = config or str(
        Path(root) / "model_zoo" / "configs" / "CutLER-ImageNet" / "cascade_mask_rcnn_R_50_FPN.yaml"
    )
    if root not in sys.path:
        sys.path.insert(0, root)
    from config import add_cutler_config
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from modeling import build_model

    cfg = get_cfg()
    add_cutler_config(cfg)
    cfg.merge_from_file(config)
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = CUTLER_SCORE_THRESHOLD
    # SyncBN needs a process group; single-process inference is identical with plain BN.
    cfg.MODEL.RESNETS.NORM = cfg.MODEL.FPN.NORM = "BN"
    model = build_model(cfg)
    model.eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return CutlerInstances(model, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
