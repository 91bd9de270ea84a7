"""Every ``method.*`` key of ``ovdiff``, with its default: the official code's (github
karazijal/sdov: ``sample_support_set.py``, ``gen_proto_*.py``, ``predict.py``).

This dataclass is the only place these defaults are written; the segmentation parts
(support sampling, prototypes, windows, filters) take theirs from it.
"""

from __future__ import annotations

from dataclasses import dataclass

EXTRACTOR_KINDS = ("sd", "dino", "clip", "colour")
CLIP_FILTER_DTYPES = ("auto", "float32")
SYNONYM_MODES = ("first", "all")
BACKGROUND_RULES = ("auto", "prototypes", "none")


@dataclass(frozen=True)
class OVDiffSettings:
    """OVDiff (Karazija et al.): open-vocabulary segmentation by generated prototypes."""

    # --- support sets and prototypes
    num_support: int = 32  # support images sampled per class (code default; the paper may say 64)
    guidance_scale: float = 8.0  # classifier-free guidance of support sampling
    sampling_steps: int = 30  # DPM-Solver++ (2M) steps of support sampling
    sample_batch: int = 8  # support images per pipeline call (part of the support cache key)
    support_seed: int = 42  # support sampling seed, re-seeded per class (official)
    support_size: int = 512  # side of the support images, sampled or read (official 512)
    # None = sample with SD; a folder of <class name>/*.png (then use mask_proposer saliency or
    # full); "auto" = the datamodule's support_root
    support_folder: str | None = None
    # FG/BG split of support images: cutler (official; needs detectron2 + CutLER weights, fails
    # early without) | attention (official fallback thresholds 0.5/0.2, no extra model) |
    # saliency | full
    mask_proposer: str = "cutler"
    # similarity maps averaged over these: sd (attention queries of 9 layers), dino (ViT-B/8
    # keys), clip (ViT-B/16 block -2 keys); also colour; dino/clip may name a ViT (dino:<vit>)
    extractors: tuple[str, ...] = ("sd", "dino", "clip")
    kmeans_k: int = 32  # k-means centres per class and side (plus class mean and image means)
    # 0 = k-means++ on all pixels (the official sklearn procedure); N > 0: seeded and converged
    # on N pooled pixels, then refined on all (24576: ~3x faster, inertia +0.4 %; see README)
    kmeans_sample: int = 0
    sd_timestep: int = 200  # noise level of the SD feature pass
    sd_input_size: int = 512  # side the SD features' inputs are resized to (official 512)
    vit_weights: str = (
        "pretrained"  # DINO/CLIP (and CLIP filter) weights: pretrained | random | file
    )
    # classes with several prompt names (the label space's synonyms, e.g. SCLIP's person / tv
    # monitor lists): first = one support set from the first name (official: one prompt a class)
    # | all = a support set and prototypes per name, the class scored by the best of them all
    synonyms: str = "first"
    # prototype + support cache folder, reused across runs and datasets; None =
    # $SDZERO_CACHE/prototypes or ~/.cache/sdzero/prototypes; "run" = <run folder>/prototypes
    prototype_cache: str | None = None
    # --- inference
    clip_filter: bool = True  # CLIP pre-filter of the classes per image (p >= 1/C, <= 10, subsets)
    clip_model: str = "clip_vitb16"  # the filter's CLIP: OpenAI ViT-B/16
    # the filter's precision: auto = official (clip.load: float16 on CUDA, float32 on CPU) |
    # float32 everywhere
    clip_filter_dtype: str = "auto"
    # the background channel: prototypes = the max over the kept classes' background prototypes
    # (official; needs a background class: VOC-21, Context-60, COCO-Object) | none = no background
    # channel, every pixel gets its best class (the background label, if any, is never predicted)
    # | auto = prototypes where the label space has a background class, none elsewhere
    background: str = "auto"
    stuff_threshold: float = 0.85  # drop BG prototypes with cosine > this to a stuff FG prototype
    window_sizes: tuple[int, ...] = (448, 336)  # sliding windows (plus the full image)
    stride: int = 224  # window stride (pixels of the resized image)
    short_side: int = 448  # test images are LANCZOS-resized to this short side
    # windows of one prepared shape per extractor forward call; 1 = one at a time (same scores
    # up to float rounding, less memory)
    window_batch: int = 8
    # MiB of prototype similarities computed at once (per extractor call): the scoring runs over
    # blocks of whole classes' prototypes, so 150+ classes stay within memory (same scores)
    score_memory_mb: int = 256
    pamr: bool = False  # PAMR refinement (10 iterations, dilations 1,2,4,8,12,24); off officially

    def __post_init__(self) -> None:
        from sdzero.segmentation.masks import available_mask_proposers

        extractors = list(self.extractors)
        bad = [e for e in extractors if e.partition(":")[0] not in EXTRACTOR_KINDS]
        if not extractors or bad or len(set(extractors)) != len(extractors):
            raise ValueError(
                f"method.extractors must be distinct names among {list(EXTRACTOR_KINDS)} (dino/clip "
                f"may name a ViT as dino:<vit>), got {extractors}"
            )
        if self.mask_proposer not in available_mask_proposers():
            raise ValueError(
                f"method.mask_proposer must be one of {available_mask_proposers()}, got "
                f"{self.mask_proposer!r}"
            )
        positive = {
            "num_support": self.num_support,
            "sampling_steps": self.sampling_steps,
            "kmeans_k": self.kmeans_k,
            "stride": self.stride,
            "short_side": self.short_side,
            "sample_batch": self.sample_batch,
            "window_batch": self.window_batch,
            "score_memory_mb": self.score_memory_mb,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"method.{key} must be >= 1, got {value}")
        for key in ("support_size", "sd_input_size"):  # the UNet halves the latent 3 times
            if getattr(self, key) < 64 or getattr(self, key) % 64:
                raise ValueError(f"method.{key} must be a multiple of 64, got {getattr(self, key)}")
        if min(self.window_sizes, default=1) < 1:
            raise ValueError(f"method.window_sizes must be >= 1, got {list(self.window_sizes)}")
        if self.kmeans_sample < 0:
            raise ValueError(
                f"method.kmeans_sample must be >= 0 (0: k-means++ on all pixels), got "
                f"{self.kmeans_sample}"
            )
        if self.clip_filter_dtype not in CLIP_FILTER_DTYPES:
            raise ValueError(
                f"method.clip_filter_dtype must be one of {list(CLIP_FILTER_DTYPES)}, got "
                f"{self.clip_filter_dtype!r}"
            )
        if self.background not in BACKGROUND_RULES:
            raise ValueError(
                f"method.background must be one of {list(BACKGROUND_RULES)}, got "
                f"{self.background!r}"
            )
        if self.synonyms not in SYNONYM_MODES:
            raise ValueError(
                f"method.synonyms must be one of {list(SYNONYM_MODES)}, got {self.synonyms!r}"
            )
        if not 0 <= self.stuff_threshold <= 1:
            raise ValueError(
                f"method.stuff_threshold must lie in [0, 1], got {self.stuff_threshold}"
            )


OVDIFF = OVDiffSettings  # the defaults, read as class attributes (``OVDIFF.stride``)
