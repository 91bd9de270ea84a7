"""OVDiff as an evaluation LightningModule: build missing prototypes once, then segment each image.

``on_test_start`` builds the prototypes of every class the datamodule names (sharded over ranks,
each class once; the cache makes the other ranks and later runs reuse them), then assembles the
:class:`~sdzero.segmentation.inference.Segmenter`. :meth:`OVDiffModule.predict` segments one
image; the segmentation task (:mod:`sdzero.tasks.segmentation`) turns the labels into the record,
its mask PNG and the dataset mIoU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdzero.errors import ConfigError
from sdzero.evaluation import EvaluationModule, SmokeTest
from sdzero.segmentation.features import SDQueryExtractor, build_extractor
from sdzero.segmentation.filters import ClipFilter, clip_filter_dtype
from sdzero.segmentation.inference import PrototypeBank, Segmenter
from sdzero.segmentation.prototypes import PrototypeCache, Prototypes, build_prototypes
from sdzero.segmentation.settings import OVDiffSettings
from sdzero.segmentation.support import FolderSupport, GeneratedSupport
from sdzero.segmentation.synonyms import class_prompts, class_prototypes
from sdzero.settings import build_settings
from sdzero.tasks.segmentation import SegmentationTask

log = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """``$SDZERO_CACHE/prototypes``, else ``$XDG_CACHE_HOME/sdzero/prototypes`` (``~/.cache``)."""
    if os.environ.get("SDZERO_CACHE"):
        return Path(os.environ["SDZERO_CACHE"]).expanduser() / "prototypes"
    base = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return base / "sdzero" / "prototypes"


class OVDiffModule(EvaluationModule):
    """OVDiff (Karazija et al.) with the official code's defaults; ``settings`` are the
    ``method.*`` keys of :class:`~sdzero.segmentation.settings.OVDiffSettings` (the single source
    of their defaults). ``backbone``: the ``backbone`` config group (``arch``, ``weights``,
    ``dtype``); ``seed``: the run's top-level seed (the official draws use fixed seeds)."""

    settings_class = OVDiffSettings
    smoke_test = SmokeTest(
        "demo_segmentation", ("data.num_images=3",), batching=(("method.window_batch=1",),)
    )

    def __init__(
        self,
        backbone: Mapping[str, Any],
        seed: int = 0,
        **settings: Any,
    ) -> None:
        super().__init__()
        self.settings = build_settings(OVDiffSettings, settings)
        self.backbone = dict(backbone)
        self.seed = seed
        self.segmenter: Segmenter | None = None
        self.prototypes: dict[int, dict[str, Prototypes]] = {}
        self._sd: Any = None
        self._extractors: list[Any] | None = None

    # ------------------------------------------------------------------------ preparation
    def requirements(self) -> list[Any]:
        """What OVDiff loads: Stable Diffusion (for the ``sd`` extractor or support sampling),
        the DINO/CLIP extractors' and the CLIP filter's weights, CutLER for ``cutler`` masks."""
        from sdzero.requirements import Requirement, sd_requirements, vit_requirements
        from sdzero.segmentation.features import VIT_MODELS
        from sdzero.segmentation.masks import cutler_missing

        s = self.settings
        needs = []
        if "sd" in s.extractors or s.support_folder is None:
            needs += sd_requirements(self.backbone)
        for name in s.extractors:
            kind, _, variant = name.partition(":")
            if kind in VIT_MODELS:
                vit = variant or VIT_MODELS[kind]
                needs += vit_requirements(vit, s.vit_weights, "method.extractors")
        if s.clip_filter:
            off = "method.clip_filter=false"
            needs += vit_requirements(s.clip_model, s.vit_weights, "method.clip_filter", off)
        missing = cutler_missing() if s.mask_proposer == "cutler" else None
        if missing is not None:
            what = "CutLER (detectron2, its code and weights: see the README)"
            off = "method.mask_proposer=attention"
            package = issubclass(missing[0], ImportError)
            needs.append(Requirement("method.mask_proposer", what, off, missing[1], None, package))
        return needs

    def cache_root(self) -> Path:
        """Where prototypes (and generated support sets) are cached."""
        if self.settings.prototype_cache == "run":
            if self._trainer is None:  # the runner's Trainer works in the run folder
                raise ConfigError("method.prototype_cache=run needs a run folder; give a path")
            return Path(self.trainer.default_root_dir) / "prototypes"
        if self.settings.prototype_cache:
            return Path(self.settings.prototype_cache).expanduser()
        return default_cache_root()

    def support_folder(self, support_root: str | Path | None) -> Path | None:
        """The folder of user support images (``method.support_folder``; ``auto``: the
        datamodule's ``support_root``), checked; None when support sets are sampled with SD."""
        folder = self.settings.support_folder
        if folder == "auto":
            if support_root is None:
                raise ConfigError(
                    "method.support_folder=auto takes the datamodule's support_root, and there is "
                    "none; give a folder of <class name>/*.png images or null (sample with SD)"
                )
            folder = support_root
        if folder is not None and not Path(folder).is_dir():
            raise ConfigError(f"method.support_folder={str(folder)!r} is not a folder")
        return None if folder is None else Path(folder)

    def _support_source(self, sd: Any, support_root: str | Path | None) -> Any:
        folder = self.support_folder(support_root)
        if folder is not None:
            return FolderSupport(folder, size=self.settings.support_size)
        return GeneratedSupport(
            sd,
            self.cache_root() / "support",
            num_support=self.settings.num_support,
            guidance_scale=self.settings.guidance_scale,
            steps=self.settings.sampling_steps,
            seed=self.settings.support_seed,
            batch_size=self.settings.sample_batch,
            size=self.settings.support_size,
        )

    def _load_sd(self) -> Any:
        from sdzero.backbones.sd import load_stable_diffusion

        sd = load_stable_diffusion(
            self.backbone.get("weights"),
            self.backbone.get("arch"),
            text_encoder=True,
            dtype=self.backbone.get("dtype", "float32"),
            device=self.device,
        )
        self.random_weights |= sd.random_weights
        return sd

    def _components(self) -> tuple[Any, list[Any]]:
        """Stable Diffusion (None if neither an extractor nor support sampling needs it) and the
        feature extractors, loaded once."""
        if self._extractors is None:
            uses_sd = "sd" in self.settings.extractors or self.settings.support_folder is None
            self._sd = self._load_sd() if uses_sd else None
            self._extractors = [self._extractor(name) for name in self.settings.extractors]
        return self._sd, self._extractors

    def _extractor(self, name: str) -> Any:
        if name == "sd":
            return SDQueryExtractor(
                self._sd, timestep=self.settings.sd_timestep, input_size=self.settings.sd_input_size
            ).to(self.device)
        self.random_weights |= (
            name.partition(":")[0] != "colour" and self.settings.vit_weights == "random"
        )
        return build_extractor(name, vit_weights=self.settings.vit_weights, device=self.device)

    def build_prototypes(
        self, names: Sequence[str], support_root: str | Path | None = None
    ) -> dict[str, dict[str, Prototypes]]:
        """``{name: {extractor: Prototypes}}``, from the cache or built. Under DDP each rank first
        builds its share of the classes, so every class is built once and read by the others."""
        names = list(names)
        if not names:
            raise ValueError("no class names to build prototypes for")
        self.cache_root()  # the user errors of these two keys come before any model loads
        self.support_folder(support_root)
        sd, extractors = self._components()
        args = (extractors, self._support_source(sd, support_root), self.settings.mask_proposer)
        kwargs = {"cache": PrototypeCache(self.cache_root()), "kmeans_k": self.settings.kmeans_k}
        kwargs["kmeans_sample"] = self.settings.kmeans_sample
        world, rank = self._world()
        if world > 1:
            if names[rank::world]:
                build_prototypes(names[rank::world], *args, **kwargs)
            self.trainer.strategy.barrier("ovdiff-prototypes")
        return build_prototypes(names, *args, **kwargs)

    def _world(self) -> tuple[int, int]:
        trainer = self._trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def prototype_names(
        self,
        prompt_names: Sequence[str],
        background_index: int | None,
        synonyms: Sequence[Sequence[str]] | None = None,
    ) -> dict[int, tuple[str, ...]]:
        """``{label index: prompt names}`` of every class but the background: the names whose
        prototypes score it (``method.synonyms``)."""
        classes = [i for i in range(len(prompt_names)) if i != background_index]
        try:
            return class_prompts(prompt_names, synonyms, self.settings.synonyms, classes)
        except ValueError as err:
            raise ConfigError(f"method.synonyms={self.settings.synonyms}: {err}") from err

    def prototype_sets(self, datamodule: Any) -> list[tuple[str, str]]:
        """Every ``(prompt name, extractor)`` prototype set an evaluation on ``datamodule``
        loads or builds (known from its label space alone, before any file is read)."""
        synonyms = getattr(getattr(datamodule, "labels", None), "prompt_synonyms", None)
        groups = self.prototype_names(
            datamodule.prompt_names, datamodule.background_index, synonyms
        ).values()
        names = dict.fromkeys(n for group in groups for n in group)
        return [(n, e) for n in names for e in self.settings.extractors]

    def background_prototypes(self, background_index: int | None) -> bool:
        """Whether the background channel scores background prototypes (``method.background``
        for a label space whose background class is ``background_index``, None: it has none)."""
        rule = self.settings.background
        if rule == "prototypes" and background_index is None:
            raise ConfigError(
                "method.background=prototypes needs a benchmark with a background class, and this "
                "label space has none (its background pixels are ignored; every pixel gets a class): "
                "use method.background=auto or none, or the benchmark's variant with background "
                "(data.background=true: VOC-21, Context-60)"
            )
        return background_index is not None and rule != "none"

    def prepare(
        self,
        prompt_names: Sequence[str],
        background_index: int | None = 0,
        stuff: Collection[int] = (),
        support_root: str | Path | None = None,
        synonyms: Sequence[Sequence[str]] | None = None,
    ) -> Segmenter:
        """Build/load the prototypes of every class but the background and assemble the segmenter.

        :param prompt_names: one name per label index (the background's is not used).
        :param stuff: label indices of stuff classes (always kept, own BG prototypes dropped).
        :param synonyms: per label index its prompt names, ``prompt_names[i]`` first (used with
            ``method.synonyms=all``; None: the prompt names alone).
        """
        use_background = self.background_prototypes(background_index)
        prompts = self.prototype_names(prompt_names, background_index, synonyms)
        classes = list(prompts)
        stuff = set(stuff) - {background_index}
        filterable = {i: prompt_names[i] for i in classes if i not in stuff}
        class_filter = None
        if (
            self.settings.clip_filter and filterable
        ):  # loaded first: a missing model fails before any build
            from sdzero.backbones.clip_text import build_clip_classifier

            dtype = clip_filter_dtype(self.settings.clip_filter_dtype, self.device)
            classifier = build_clip_classifier(
                self.settings.clip_model, self.settings.vit_weights, dtype
            ).to(self.device)
            self.random_weights |= self.settings.vit_weights == "random"
            class_filter = ClipFilter(classifier, filterable, sorted(stuff), device=self.device)
        names = list(dict.fromkeys(n for group in prompts.values() for n in group))
        built = self.build_prototypes(names, support_root)
        self.prototypes = class_prototypes(built, prompts, self.settings.extractors)
        banks = [
            PrototypeBank.build(
                {i: p[e] for i, p in self.prototypes.items()}, stuff, self.settings.stuff_threshold
            )
            for e in self.settings.extractors
        ]
        _, extractors = self._components()
        if "sd" not in self.settings.extractors:
            self._sd = None  # only support sampling needed it
        self.segmenter = Segmenter(
            extractors,
            banks,
            len(prompt_names),
            background_index,
            window_sizes=self.settings.window_sizes,
            stride=self.settings.stride,
            short_side=self.settings.short_side,
            window_batch=self.settings.window_batch,
            background_prototypes=use_background,
            score_memory_mb=self.settings.score_memory_mb,
            use_pamr=self.settings.pamr,
            class_filter=class_filter,
            device=self.device,
        )
        return self.segmenter

    # -------------------------------------------------------------------------- Lightning
    def make_task(self, datamodule: Any) -> SegmentationTask:
        """mIoU over the datamodule's label space."""
        missing = [
            a
            for a in ("class_names", "prompt_names", "ignore_index", "background_index", "stuff")
            if not hasattr(datamodule, a)
        ]
        if missing:
            raise ConfigError(
                f"OVDiff needs a segmentation datamodule; {type(datamodule).__name__} lacks {missing}"
            )
        return SegmentationTask(list(datamodule.class_names), datamodule.ignore_index)

    def on_test_start(self) -> None:
        datamodule = self.trainer.datamodule
        self.prepare(
            datamodule.prompt_names,
            datamodule.background_index,
            datamodule.stuff,
            getattr(datamodule, "support_root", None),
            getattr(getattr(datamodule, "labels", None), "prompt_synonyms", None),
        )

    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """``(H, W)`` int64 labels of one image at its ground truth's size."""
        label = batch["label"]
        seg = self.segmenter(
            batch["image"], out_size=tuple(label.shape[-2:]), image_index=int(batch["index"])
        )
        return seg.labels
