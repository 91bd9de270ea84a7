"""What every correspondence method shares: the scoring keys, the model frame, one pair in, points out.

A correspondence method subclasses :class:`CorrespondenceModule`, names a settings dataclass that
inherits :class:`ScoringSettings` (and has an ``image_size``: the side of the square model frame)
and implements :meth:`CorrespondenceModule.match`: source and target images already in the model
frame, source points in model-frame pixels, target points out. The base maps the original images
and points into that frame and back, checks the query points, and builds the PCK task over the
datamodule's categories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sdzero.backbones.dtypes import as_dtype
from sdzero.correspondence.query_points import check_query_points
from sdzero.errors import ConfigError
from sdzero.evaluation import EvaluationModule
from sdzero.tasks.correspondence import CorrespondenceTask, Scoring
from sdzero.tasks.frames import ModelFrame


@dataclass(frozen=True)
class PairInfo:
    """What a method may know about a pair besides its pixels: the dataset index (keys per-pair
    random streams), the category (class prompts), the images' names (per-image caches and
    streams), and the annotations GeoAware-SC's pose alignment reads: the object boxes
    ``(x1, y1, x2, y2)`` in ORIGINAL pixels of each image (None: none annotated) and the query
    points' keypoint ids (SPair-71k's ``kps_ids``; None: the dataset has none)."""

    index: int = 0
    category: str = ""
    src_name: str = "source"
    trg_name: str = "target"
    src_bbox: tuple[float, ...] | None = None
    trg_bbox: tuple[float, ...] | None = None
    kps_ids: tuple[int, ...] | None = None

    @classmethod
    def of(cls, batch: dict[str, Any]) -> PairInfo:
        """The pair of a benchmark sample (a NaN box counts as none)."""

        def box(key: str) -> tuple[float, ...] | None:
            value = batch.get(key)
            if value is None or not torch.isfinite(torch.as_tensor(value)).all():
                return None
            return tuple(float(v) for v in value)

        ids = dict(batch.get("extra") or {}).get("kps_ids")
        return cls(
            int(batch["index"]),
            str(batch["category"]),
            str(batch.get("src_name", "source")),
            str(batch.get("trg_name", "target")),
            box("src_bbox"),
            box("trg_bbox"),
            None if ids is None else tuple(int(i) for i in ids),
        )


@dataclass(frozen=True)
class ScoringSettings:
    """The ``method.*`` keys of the model frame and of PCK, shared by every correspondence method;
    the subclass adds ``image_size``. Defaults are the official Hedlin code's.

    ``pck_threshold``: ``bbox-target`` | ``bbox-source`` | ``bbox-keypoints`` |
    ``bbox-keypoints-padded`` | ``image`` | ``bbox-target-xscale`` (the official CUB quirk, in
    ``pck_frame=resized`` only), measured in ``pck_frame``: ``original`` pixels of the target, or
    ``resized`` (the model frame, as the official code measures).
    """

    resize: str = "stretch"  # stretch (official) | letterbox (keeps the aspect ratio)
    pck_threshold: str = "bbox-target"
    pck_frame: str = "original"  # original (target pixels) | resized (model frame, official)
    pck_alphas: tuple[float, ...] = (0.05, 0.1, 0.15)
    pck_inclusive: bool = True  # <= (official, DIFT) | < (SD-DINO)

    def __post_init__(self) -> None:
        self.scoring()  # validates the scoring keys

    def scoring(self) -> Scoring:
        return Scoring(
            threshold=self.pck_threshold,
            frame=self.pck_frame,
            alphas=self.pck_alphas,
            inclusive=self.pck_inclusive,
            image_size=self.image_size,  # type: ignore[attr-defined]  (the subclass's field)
            resize=self.resize,
        )


class CorrespondenceModule(EvaluationModule):
    """Base of the correspondence methods; ``self.settings`` is a :class:`ScoringSettings`.

    :param backbone: the ``backbone`` config group (``weights``, ``arch``, ``dtype``), read by
        :meth:`load_sd` for methods on a frozen Stable Diffusion.
    :param seed: the run seed (keys the method's random streams).
    """

    settings: Any
    uses_sd: ClassVar[bool] = True  # whether the method loads the backbone group's SD

    def __init__(self, backbone: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.backbone_cfg = dict(backbone or {})
        self.backbone_dtype = as_dtype(self.backbone_cfg.get("dtype", "float32"), "backbone.dtype")
        self.seed = int(seed)
        self.sd: Any = None
        self.prompt_embeds: dict[str, torch.Tensor] = {}

    def requirements(self) -> list[Any]:
        """The ``backbone`` group's Stable Diffusion weights, for methods that use it
        (:attr:`uses_sd`)."""
        from sdzero.requirements import sd_requirements

        return sd_requirements(self.backbone_cfg) if self.uses_sd else []

    def load_sd(self, text_encoder: bool = False) -> Any:
        """The frozen Stable Diffusion of the ``backbone`` group, loaded once (it flags random
        weights on the module)."""
        if self.sd is None:
            from sdzero.backbones.sd import load_stable_diffusion  # diffusers: only when used

            cfg = self.backbone_cfg
            self.sd = load_stable_diffusion(
                cfg.get("weights"),
                cfg.get("arch"),
                text_encoder=text_encoder,
                dtype=self.backbone_dtype,
            )
            self.random_weights |= bool(self.sd.random_weights)
        return self.sd

    def prompt_embedding(self, category: str) -> torch.Tensor:
        """``(1, 77, D)`` text embedding of the settings' ``prompt`` (``{category}`` filled in),
        computed once per prompt with the loaded Stable Diffusion's text encoder."""
        prompt = self.settings.prompt.format(category=category)
        if prompt not in self.prompt_embeds:
            with torch.no_grad():
                self.prompt_embeds[prompt] = self.sd.encode_prompt([prompt])
        return self.prompt_embeds[prompt]

    def make_task(self, datamodule: Any) -> CorrespondenceTask:
        """PCK over the datamodule's ``category_names`` with the settings' scoring."""
        if not hasattr(datamodule, "category_names"):
            raise ConfigError(
                f"{type(self).__name__} needs a keypoint-pair datamodule; "
                f"{type(datamodule).__name__} lacks category_names"
            )
        return CorrespondenceTask(self.settings.scoring(), datamodule.category_names)

    def frame(self, image: torch.Tensor) -> ModelFrame:
        """The model frame of a ``(3, H, W)`` image."""
        return ModelFrame(
            int(image.shape[2]), int(image.shape[1]), self.settings.image_size, self.settings.resize
        )

    def match(
        self, src: torch.Tensor, trg: torch.Tensor, points: torch.Tensor, pair: PairInfo
    ) -> torch.Tensor:
        """Target points ``(N, 2)`` for source ``points`` ``(N, 2)``, all ``(x, y)`` pixels of the
        model frame; ``src``/``trg``: ``(1, 3, S, S)`` float in [0, 1] on the module's device."""
        raise NotImplementedError

    def predict_pair(
        self,
        src_img: torch.Tensor,
        trg_img: torch.Tensor,
        src_kps: torch.Tensor,
        pair: PairInfo | None = None,
    ) -> torch.Tensor:
        """Predicted target points ``(N, 2)`` in ORIGINAL target pixels for source points ``(N, 2)``
        in original source pixels; images are ``(3, H, W)`` uint8."""
        src_frame, trg_frame = self.frame(src_img), self.frame(trg_img)
        check_query_points(src_kps, src_frame.w, src_frame.h)
        pred = self.match(
            src_frame.image(src_img).to(self.device),
            trg_frame.image(trg_img).to(self.device),
            src_frame.to_model(src_kps.float()),
            pair or PairInfo(),
        )
        return trg_frame.to_original(pred.cpu())

    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """``(N, 2)`` predicted target points of the pair, in original target pixels."""
        return self.predict_pair(
            batch["src_img"], batch["trg_img"], batch["src_kps"], PairInfo.of(batch)
        )
