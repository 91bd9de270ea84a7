"""Which classes and background prototypes take part for an image (OVDiff's two filters).

* CLIP pre-filter (official ``CLIPClassifierThresh``): prompts "a {name}", a softmax over the raw
  cosine similarities to the image (no temperature); a class is a candidate if its probability is
  >= 1/C; none -> the 10 most similar; more than 10 -> the 10 most probable of them. Then every
  non-empty subset of the candidates is prompted as "a X and a Y ..." and the subset whose text is
  most similar to the image is kept. Stuff classes never enter the filter and are always kept.
  Bounded whatever the number of classes: at most ``topk`` (10) candidates, so at most 1,023
  subset prompts an image (:data:`MAX_CANDIDATES` caps ``topk`` at 4,095 prompts), encoded in
  batches of :data:`TEXT_BATCH`, and at most :data:`SUBSET_CACHE` subset embeddings kept across
  images (least recently used first out); the C class prompts are encoded once.
* Stuff filter (official ``filter_proto_bg2allfg`` in ``ctx_mode``): stuff classes' own background
  prototypes are dropped, and another class's background prototype is dropped when its cosine
  similarity to any stuff-class foreground prototype exceeds a threshold (0.85), per extractor.

The decisions are plain functions of tensors, so tests can feed constructed similarities.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from itertools import combinations
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdzero.segmentation.settings import CLIP_FILTER_DTYPES, OVDIFF

MAX_CANDIDATES = 12  # 2**12 - 1 = 4,095 subset prompts an image at most (official topk 10: 1,023)
TEXT_BATCH = 256  # prompts per text-encoder call
SUBSET_CACHE = 16384  # subset-prompt embeddings kept across images (LRU; 512-d: 32 MiB)


class ClipClassifier(Protocol):
    """What the filter needs of CLIP: L2-normalised embeddings."""

    def encode_text(self, prompts: Sequence[str]) -> Tensor: ...  # (P, D)

    def encode_image(self, images: Tensor) -> Tensor: ...  # (B, D) from (B, 3, h, w) in [0, 1]


def clip_candidates(similarity: Tensor, topk: int = 10) -> list[int]:
    """First stage: candidate class indices from the image's raw cosine similarities ``(C,)``.

    Kept in the official order (it decides the word order of the subset prompts): ascending index
    when the 1/C threshold selects at most ``topk``, else by decreasing probability / similarity.
    """
    if similarity.ndim != 1 or similarity.numel() == 0:
        raise ValueError(
            f"similarity must be a non-empty (C,) tensor, got {tuple(similarity.shape)}"
        )
    probs = torch.softmax(similarity.float(), dim=0)
    chosen = probs >= 1.0 / similarity.numel()
    candidates = torch.nonzero(chosen).flatten().tolist()
    k = min(topk, similarity.numel())
    if not candidates:  # only when rounding puts every probability of a flat softmax below 1/C
        return torch.topk(similarity, k).indices.tolist()
    if len(candidates) > topk:
        return torch.topk(torch.where(chosen, probs, torch.zeros_like(probs)), k).indices.tolist()
    return candidates


def subsets(candidates: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset, by size then in combination order (the official powerset order).
    At most :data:`MAX_CANDIDATES` candidates (2**n - 1 subsets): more is an error, not a hang."""
    if len(candidates) > MAX_CANDIDATES:
        raise ValueError(
            f"{len(candidates)} candidates would make {2 ** len(candidates) - 1} subset prompts; "
            f"the CLIP filter takes at most {MAX_CANDIDATES}"
        )
    return [c for r in range(1, len(candidates) + 1) for c in combinations(candidates, r)]


def subset_prompt(names: Sequence[str], subset: Sequence[int]) -> str:
    """The second-stage prompt of a subset: "a X and a Y ..."."""
    return " and ".join(f"a {names[i]}" for i in subset)


def best_subset(
    image_embedding: Tensor, subset_embeddings: Tensor, options: Sequence[tuple]
) -> tuple:
    """The subset whose prompt embedding ``(S, D)`` is most similar to the image's ``(D,)`` (first on
    ties)."""
    if len(options) != len(subset_embeddings):
        raise ValueError(f"{len(options)} subsets but {len(subset_embeddings)} embeddings")
    return options[int(torch.argmax(subset_embeddings.float() @ image_embedding.float()))]


def clip_input(image: Tensor) -> Tensor:
    """The classifier's input: the (short side 448) image LANCZOS-resized to 512² as the official
    ``prep_sample``; ``(3, H, W)`` uint8 -> ``(1, 3, 512, 512)`` float in [0, 1]."""
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    arr = np.asarray(pil.resize((512, 512), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def clip_filter_dtype(setting: str, device: torch.device | str) -> torch.dtype:
    """The CLIP filter's dtype for ``method.clip_filter_dtype`` on ``device``: ``auto`` is the
    official one (``clip.load`` gives float16 on CUDA, float32 on CPU); ``float32`` always."""
    if setting not in CLIP_FILTER_DTYPES:
        raise ValueError(
            f"method.clip_filter_dtype must be one of {list(CLIP_FILTER_DTYPES)}, got {setting!r}"
        )
    if setting == "auto" and torch.device(device).type == "cuda":
        return torch.float16
    return torch.float32


class ClipFilter:
    """The CLIP pre-filter as a :class:`~sdzero.segmentation.inference.Segmenter` class filter.

    :param classifier: CLIP ViT-B/16 with ``encode_text`` / ``encode_image`` (L2-normalised;
        run in the dtype :func:`clip_filter_dtype` picks).
    :param classes: ``{label index: prompt name}`` of the filterable classes.
    :param always: label indices kept for every image without asking CLIP (the stuff classes).
    :param topk: at most this many candidates (10: at most 1023 subset prompts an image).
    """

    def __init__(
        self,
        classifier: ClipClassifier,
        classes: Mapping[int, str],
        always: Collection[int] = (),
        topk: int = 10,
        device: Any = "cpu",
    ) -> None:
        if not classes:
            raise ValueError("the CLIP filter needs at least one filterable class")
        if len(set(classes.values())) != len(classes):
            raise ValueError(f"the CLIP filter's class names must be distinct, got {classes}")
        if not 1 <= topk <= MAX_CANDIDATES:
            raise ValueError(f"topk must lie in [1, {MAX_CANDIDATES}], got {topk}")
        self.classifier = classifier
        self.labels = list(classes)
        self.names = list(classes.values())
        self.always = sorted(always)
        self.topk = topk
        self.device = device
        self._classes: dict[str, Tensor] = {}  # "a {name}" -> embedding, encoded once
        self._subsets: OrderedDict[str, Tensor] = OrderedDict()  # LRU of the other subset prompts

    def _encode_new(self, prompts: list[str]) -> Tensor:
        """``(P, D)`` float32 CPU embeddings, :data:`TEXT_BATCH` prompts per encoder call."""
        parts = [
            self.classifier.encode_text(prompts[i : i + TEXT_BATCH]).float().cpu()
            for i in range(0, len(prompts), TEXT_BATCH)
        ]
        return torch.cat(parts)

    def _encode_subsets(self, prompts: list[str]) -> Tensor:
        # Subset prompts recur across images: the recent ones are kept, each encoded once; a
        # one-class subset's prompt is its class prompt.
        found = {p: self._classes[p] for p in prompts if p in self._classes}
        found.update((p, self._subsets[p]) for p in prompts if p in self._subsets)
        new = [p for p in dict.fromkeys(prompts) if p not in found]
        if new:
            found.update(zip(new, self._encode_new(new), strict=True))
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._classes:
                self._subsets[prompt] = found[prompt]
                self._subsets.move_to_end(prompt)
        while len(self._subsets) > SUBSET_CACHE:
            self._subsets.popitem(last=False)
        return torch.stack([found[p] for p in prompts])

    def __call__(self, image: Tensor) -> list[int]:
        """Sorted label indices kept for ``image`` ``(3, h, w)`` uint8 (working frame)."""
        pixels = clip_input(image).to(self.device)
        embedding = self.classifier.encode_image(pixels).float().cpu()[0]
        if not self._classes:
            prompts = [f"a {n}" for n in self.names]
            self._classes = dict(zip(prompts, self._encode_new(prompts), strict=True))
        similarity = torch.stack(list(self._classes.values())) @ embedding
        options = subsets(clip_candidates(similarity, self.topk))
        prompts = [subset_prompt(self.names, s) for s in options]
        # Officially the subset embeddings (not the class ones) are normalised again in float32,
        # which moves float16-normalised ones by rounding.
        chosen = best_subset(embedding, F.normalize(self._encode_subsets(prompts), dim=-1), options)
        return sorted({self.labels[i] for i in chosen} | set(self.always))


def keep_background(
    bg: Tensor, stuff_fg: Tensor, threshold: float = OVDIFF.stuff_threshold
) -> Tensor:
    """Which background prototypes ``(Q, D)`` survive the stuff filter: ``(Q,)`` bool.

    A prototype is dropped when its cosine similarity to any stuff-class foreground prototype
    (``stuff_fg`` ``(S, D)``; raw features) exceeds ``threshold``. As in the official code, a set of
    at most one background prototype is never filtered.
    """
    keep = torch.ones(len(bg), dtype=torch.bool, device=bg.device)
    if len(bg) <= 1 or len(stuff_fg) == 0:
        return keep
    sim = (
        F.normalize(bg.float(), dim=-1, eps=1e-6)
        @ F.normalize(stuff_fg.float(), dim=-1, eps=1e-6).T
    )
    return (sim <= threshold).all(dim=-1)
