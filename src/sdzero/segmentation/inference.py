"""OVDiff inference: sliding windows, prototype scoring, ensembling and the final labels.

Frames: the *original* image (the dataset file, ``(H, W)``) and the *working* frame, the original
LANCZOS-resized to a short side of 448 (official ``predict.py``). Windows, score maps and PAMR live
in the working frame; the scores are bilinearly upsampled to the output (label) size before the
argmax. Prototypes are scored by :class:`~sdzero.segmentation.bank.PrototypeBank` (re-exported here). Channels are the label space's classes: the background channel (if the dataset has one)
scores the background prototypes of the kept classes, every other channel its class's foreground
prototypes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdzero.progress import Progress, progress
from sdzero.segmentation.bank import BankScores, PrototypeBank
from sdzero.segmentation.features import FeatureExtractor
from sdzero.segmentation.pamr import pamr
from sdzero.segmentation.settings import OVDIFF


def resize_short_side(image: Tensor, short_side: int) -> Tensor:
    """``(3, H, W)`` uint8 -> uint8 with the short side ``short_side`` (LANCZOS, as torchvision's
    ``resize(pil, int)``: the long side becomes ``int(short_side * long / short)``)."""
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"image must be (3, H, W) uint8, got {tuple(image.shape)} {image.dtype}")
    height, width = image.shape[1:]
    if height <= width:
        size = (int(short_side * width / height), short_side)
    else:
        size = (short_side, int(short_side * height / width))
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    out = np.asarray(pil.resize(size, Image.Resampling.LANCZOS))
    return torch.from_numpy(out.copy()).permute(2, 0, 1)


@dataclass(frozen=True)
class Window:
    """A crop ``[x1, x2) x [y1, y2)`` in working-frame pixels."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.y2 - self.y1, self.x2 - self.x1


def sliding_windows(height: int, width: int, sizes: Sequence[int], stride: int) -> list[Window]:
    """The official window grid, then the full image.

    For each size ``s``: ``ceil(max(H - s, 0) / stride) + 1`` rows (and columns likewise) starting
    at multiples of ``stride``; the last one is shifted back to end flush with the image border
    (mmseg's ``slide_inference``). A side shorter than ``s`` gives crops as long as that side.
    """
    if stride < 1 or any(s < 1 for s in sizes):
        raise ValueError(f"window sizes and stride must be >= 1, got {list(sizes)}, {stride}")
    windows = []
    for s in sizes:
        rows = (max(height - s, 0) + stride - 1) // stride + 1
        cols = (max(width - s, 0) + stride - 1) // stride + 1
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * stride + s, height), min(c * stride + s, width)
                windows.append(Window(max(x2 - s, 0), max(y2 - s, 0), x2, y2))
    return [*windows, Window(0, 0, width, height)]


class ScoreAccumulator:
    """Average of window score maps over every (extractor, window) pair covering each pixel."""

    def __init__(self, channels: int, height: int, width: int, device: Any = "cpu") -> None:
        self.total = torch.zeros(channels, height, width, device=device)
        self.count = torch.zeros(1, height, width, device=device)

    def add(self, window: Window, scores: Tensor) -> None:
        """``scores`` ``(K, gh, gw)``: bilinearly resized to the window, clamped to [-1, 1]."""
        resized = F.interpolate(scores[None].float(), size=window.size, mode="bilinear")[0]
        self.total[:, window.y1 : window.y2, window.x1 : window.x2] += resized.clamp(-1, 1)
        self.count[:, window.y1 : window.y2, window.x1 : window.x2] += 1

    def mean(self) -> Tensor:
        """``(K, H, W)``; pixels no window covered are 0."""
        return self.total / self.count.clamp(min=1)


def labels_from_scores(scores: Tensor, size: tuple[int, int], never: int | None = None) -> Tensor:
    """``(K, h, w)`` working-frame scores -> ``(H, W)`` int64 labels at ``size`` ``(H, W)``.

    Scores are bilinearly upsampled, those <= 0 zeroed, and the argmax taken: where nothing is
    positive the lowest index wins: the background (index 0) on the official datasets; without a
    background channel, as the official ``reduce_zero_label`` path, the first class. ``never``: a
    label that is not predicted at all (a background class without background prototypes).
    """
    up = F.interpolate(scores[None].float(), size=tuple(size), mode="bilinear")[0]
    up = torch.where(up > 0, up, torch.zeros_like(up))
    if never is not None:
        up[never] = -1.0
    return up.argmax(dim=0)


@dataclass
class PairScores:
    """One (extractor, window) pair's channel maps at feature resolution, kept for explanations:
    ``values`` ``(K, gh, gw)``; ``owner`` the label index of the class whose prototype won and
    ``prototype`` its row in that class's ``fg`` (``bg`` on the background channel), -1 for none."""

    window: Window
    extractor: int
    values: Tensor
    owner: Tensor
    prototype: Tensor


@dataclass
class Segmentation:
    """``labels`` ``(H, W)`` int64 at the output size; ``scores`` ``(K, h, w)`` in the working frame;
    ``kept`` the label indices the class filter kept; ``image_size`` the original ``(H, W)``."""

    labels: Tensor
    scores: Tensor
    kept: list[int]
    image_size: tuple[int, int]
    background_index: int | None
    extractors: list[str]
    pairs: list[PairScores] = field(default_factory=list)


class Segmenter:
    """OVDiff's sliding-window prototype segmentation of one image.

    :param extractors: feature extractors; ``banks[i]`` holds ``extractors[i]``'s prototypes of
        every class but the background.
    :param num_classes: K, the label space's size; ``background_index`` its background class.
    :param class_filter: working-frame image ``(3, h, w)`` uint8 -> label indices to keep (None:
        all); the others score -1 and their background prototypes leave the background channel.
    :param window_batch: per extractor, windows whose prepared input has the same shape go through
        it in batches of at most this many (1: one window per forward call); scores are the same
        as one at a time up to float rounding and are accumulated in window order either way.
    :param score_memory_mb: MiB of prototype similarities held at once per extractor call
        (:meth:`~sdzero.segmentation.bank.PrototypeBank.score`).
    :param background_prototypes: whether the background channel scores the kept classes'
        background prototypes (official); False: it stays at -1 and the background label is never
        predicted (``method.background=none`` on a benchmark with a background class).
    """

    def __init__(
        self,
        extractors: Sequence[FeatureExtractor],
        banks: Sequence[PrototypeBank],
        num_classes: int,
        background_index: int | None = 0,
        *,
        window_sizes: Sequence[int] = OVDIFF.window_sizes,
        stride: int = OVDIFF.stride,
        short_side: int = OVDIFF.short_side,
        use_pamr: bool = False,
        class_filter: Callable[[Tensor], Collection[int]] | None = None,
        window_batch: int = OVDIFF.window_batch,
        background_prototypes: bool = True,
        score_memory_mb: float = OVDIFF.score_memory_mb,
        device: Any = "cpu",
    ) -> None:
        if not extractors or len(extractors) != len(banks):
            raise ValueError(f"need one bank per extractor, got {len(extractors)} and {len(banks)}")
        for extractor, bank in zip(extractors, banks, strict=True):
            if extractor.name != bank.extractor:
                raise ValueError(f"extractor {extractor.name!r} got {bank.extractor!r} prototypes")
        expected = [c for c in range(num_classes) if c != background_index]
        for bank in banks:
            if bank.classes != expected:
                raise ValueError(
                    f"{bank.extractor!r} prototypes cover classes {bank.classes}, expected {expected}"
                )
        if background_index is not None and not 0 <= background_index < num_classes:
            raise ValueError(f"background_index {background_index} outside [0, {num_classes})")
        if short_side < 1:
            raise ValueError(f"short_side must be >= 1, got {short_side}")
        if window_batch < 1:
            raise ValueError(f"window_batch must be >= 1, got {window_batch}")
        self.extractors = list(extractors)
        self.banks = [b.to(device) for b in banks]
        self.num_classes = num_classes
        self.background_index = background_index
        self.window_sizes = list(window_sizes)
        self.stride = stride
        self.short_side = short_side
        self.use_pamr = use_pamr
        self.class_filter = class_filter
        self.window_batch = window_batch
        self.background_prototypes = background_prototypes
        self.score_memory_mb = score_memory_mb
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(
        self,
        image: Tensor,
        out_size: tuple[int, int] | None = None,
        explain: bool = False,
        image_index: int = 0,
    ) -> Segmentation:
        """Segment ``image`` ``(3, H, W)`` uint8; labels at ``out_size`` ``(H, W)`` (default: the
        image's); ``explain`` keeps each pair's maps (for :mod:`sdzero.segmentation.explain`).
        ``image_index`` (the dataset index) keys the random draws of its windows (SD noise)."""
        work = resize_short_side(image, self.short_side)
        kept = sorted(self.class_filter(work)) if self.class_filter else list(self.banks[0].classes)
        height, width = work.shape[1:]
        pixels = work.to(self.device).float() / 255
        windows = sliding_windows(height, width, self.window_sizes, self.stride)
        acc = ScoreAccumulator(self.num_classes, height, width, self.device)
        pairs = []
        units = len(windows) * len(self.extractors)
        with progress(f"segment: {len(windows)} windows", units, "windows") as report:
            for index, (extractor, bank) in enumerate(
                zip(self.extractors, self.banks, strict=True)
            ):
                maps = self._window_maps(
                    extractor, bank, pixels, windows, kept, image_index, report
                )
                for window, (values, owner, proto) in zip(windows, maps, strict=True):
                    acc.add(window, values)
                    if explain:
                        pairs.append(PairScores(window, index, values, owner, proto))
        scores = acc.mean()
        if self.use_pamr:
            scores = pamr(work.to(self.device).float()[None], scores[None])[0]
        size = tuple(out_size) if out_size is not None else tuple(image.shape[1:])
        never = None if self.background_prototypes else self.background_index
        return Segmentation(
            labels_from_scores(scores, size, never).cpu(),
            scores,
            kept,
            tuple(image.shape[1:]),
            self.background_index,
            [e.name for e in self.extractors],
            pairs,
        )

    def _window_maps(
        self,
        extractor: FeatureExtractor,
        bank: PrototypeBank,
        pixels: Tensor,
        windows: Sequence[Window],
        kept: Sequence[int],
        image_index: int,
        report: Progress,
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per window of ``pixels`` ``(3, H, W)`` in [0, 1], in ``windows`` order: its
        :meth:`_channels` maps ``(K, gh, gw)``. Each window is prepared alone; those whose prepared
        input has the same shape are stacked and run ``window_batch`` at a time, window ``i``
        keyed ``(image_index, i)``."""
        groups: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
        for i, w in enumerate(windows):
            prepared = extractor.prepare(pixels[None, :, w.y1 : w.y2, w.x1 : w.x2])[0]
            groups.setdefault(tuple(prepared.shape), []).append((i, prepared))
        maps: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        for group in groups.values():
            for start in range(0, len(group), self.window_batch):
                chunk = group[start : start + self.window_batch]
                keys = [(image_index, i) for i, _ in chunk]
                batch = torch.stack([x for _, x in chunk])
                features = extractor.window_features(batch, keys).float()
                features = F.normalize(features, dim=1, eps=1e-6)
                scores = bank.score(features, kept, self.score_memory_mb)
                values, owner, proto = self._channels(scores, kept)
                for b, (i, _) in enumerate(chunk):
                    maps[i] = (values[b], owner[b], proto[b])
                report.advance(len(chunk))
        return [maps[i] for i in range(len(windows))]

    def _channels(self, s: BankScores, kept: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Label-space maps ``(B, K, gh, gw)``: values (-1 for classes not kept), owner, prototype."""
        batch, height, width = s.bg.shape
        shape = (batch, self.num_classes, height, width)
        values = s.bg.new_full(shape, -1.0)
        owner = torch.arange(self.num_classes, device=s.bg.device).view(1, -1, 1, 1)
        owner = owner.repeat(batch, 1, height, width)
        proto = torch.full(shape, -1, dtype=torch.long, device=s.bg.device)
        values[:, kept], proto[:, kept] = s.fg, s.fg_arg
        if self.background_index is not None and self.background_prototypes:
            b = self.background_index
            values[:, b], owner[:, b], proto[:, b] = s.bg, s.bg_owner, s.bg_arg
        return values, owner, proto
