"""What every trained feature matcher shares (``sdzero train``): the loss, validation PCK as the
benchmark scores it, the optimiser and its schedule, and loading a checkpoint for evaluation.

The loss is a cross-entropy over target positions: for each labelled source point, the cosine
similarities of its descriptor with every cell of the target, divided by ``temperature``, are the
logits of a distribution over target cells, and the labelled target point's cell is the class.
Every other cell is a negative (no mining), and it trains exactly the scores nearest-neighbour
matching reads at test time (their argmax). Against a soft-argmax regression of the matched
position it has two properties pseudo-labels need: its gradient per label is bounded (softmax minus
one-hot), so an outlier label pulls no harder than a correct one, where a regression's pull grows
with the outlier's distance; and a two-peaked similarity map (a symmetric part) is not pushed to
its mean position, which lies between the two peaks, on neither.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdzero.correspondence.base import PairInfo
from sdzero.correspondence.matching import (
    FeatureMatching,
    FeatureSettings,
    cell_centres,
    cell_of,
    sample_descriptors,
    similarity,
)
from sdzero.errors import ConfigError
from sdzero.tasks.correspondence import CorrespondenceTask

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainingSettings(FeatureSettings):
    """The ``method.*`` keys of training (beside the feature-matching keys)."""

    temperature: float = 0.1  # softmax temperature of the loss over target cells
    lr: float = 1e-3  # AdamW learning rate (the peak of the schedule)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    lr_schedule: str = "constant"  # constant | cosine (linear warm-up, cosine decay to 0)
    warmup_steps: int = 0  # optimiser steps of linear warm-up (cosine schedule)
    checkpoint: str | None = None  # weights to evaluate: a Lightning .ckpt written by sdzero train

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("temperature", "lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"method.{key} must be > 0, got {getattr(self, key)}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"method.weight_decay must be >= 0, got {self.weight_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"method.lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"method.warmup_steps must be >= 0, got {self.warmup_steps}")


class TrainedMatcher(FeatureMatching):
    """Base of the trainable feature matchers; ``self.settings`` is a :class:`TrainingSettings`.

    A subclass defines :meth:`~sdzero.correspondence.matching.FeatureMatching.features` (and
    :meth:`training_features` when training reads its features otherwise). Validation scores
    the validation split with the method's own PCK scoring (``val/pck@<alpha>``) and its loss
    (``val/loss``); ``monitor`` names the logged value
    :class:`~pytorch_lightning.callbacks.ModelCheckpoint` keeps the best checkpoint by, and
    whether lower is better. ``method.checkpoint`` is loaded in ``setup``; evaluated without
    one, the method is flagged as random weights.
    """

    monitor = ("val/loss", "min")

    def __init__(self, backbone: Any = None, seed: int = 0) -> None:
        super().__init__(backbone, seed)
        self.loaded = False
        self.val_task: CorrespondenceTask | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.random_weights |= not self.settings.checkpoint  # evaluated untrained: meaningless
        if self.settings.checkpoint and not self.loaded:
            load_weights(self, self.settings.checkpoint)
            self.loaded = True

    def training_features(
        self, images: torch.Tensor, names: Sequence[str], categories: Sequence[str]
    ) -> torch.Tensor:
        """``(N, 3, S, S)`` model-frame images named ``names`` (of ``categories``) ->
        ``(N, C, h, w)`` descriptors, with gradients: :meth:`features` of the whole batch."""
        return self.features(images, names, categories[0])

    def _pairs(self, batch: list[dict[str, Any]]) -> tuple[torch.Tensor, list[tuple]]:
        """Descriptors ``(2B, C, h, w)`` (sources then targets) and per pair its source and
        target points in model pixels."""
        images, names, categories, points = [], [], [], []
        for sample in batch:
            src_frame, trg_frame = self.frame(sample["src_img"]), self.frame(sample["trg_img"])
            images += [src_frame.image(sample["src_img"]), trg_frame.image(sample["trg_img"])]
            names += [str(sample.get("src_name", "source")), str(sample.get("trg_name", "target"))]
            categories += [str(sample["category"])] * 2
            points.append(
                (src_frame.to_model(sample["src_kps"]), trg_frame.to_model(sample["trg_kps"]))
            )
        order = list(range(0, len(images), 2)) + list(range(1, len(images), 2))
        stacked = torch.cat(images).to(self.device)[order]
        feats = self.training_features(
            stacked, [names[i] for i in order], [categories[i] for i in order]
        )
        return feats, points

    def _scores(self, batch: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Similarities ``(P, h*w)`` of every labelled source point with its target's cells, the
        labelled cell ``(P,)`` and the grid ``(h, w)``."""
        feats, points = self._pairs(batch)
        n, size = len(batch), self.settings.image_size
        grid = tuple(feats.shape[-2:])
        scores, labels = [], []
        for b, (src_pts, trg_pts) in enumerate(points):
            if len(src_pts) == 0:
                continue
            descriptors = sample_descriptors(feats[b], src_pts.to(feats.device), size)
            scores.append(similarity(descriptors, feats[n + b]))
            labels.append(cell_of(trg_pts.to(feats.device), grid, size))
        if not scores:
            raise ValueError("a training batch holds no labelled point")
        return torch.cat(scores), torch.cat(labels), grid

    def _loss(self, batch: list[dict[str, Any]], stage: str) -> torch.Tensor:
        """The mean cross-entropy over the batch's labelled points, logged as ``<stage>/loss``;
        in training also the share of labels whose argmax cell lies within 0.1 of the frame's
        side of the label (``train/pck@0.1``)."""
        scores, labels, grid = self._scores(batch)
        loss = F.cross_entropy(scores.float() / self.settings.temperature, labels)
        sync = stage == "val"
        self.log(f"{stage}/loss", loss, batch_size=len(labels), prog_bar=True, sync_dist=sync)
        if stage == "train":
            size = self.settings.image_size
            error = cell_centres(scores.argmax(1), grid, size) - cell_centres(labels, grid, size)
            hit = (error.norm(dim=1) <= 0.1 * size).float().mean()
            self.log("train/pck@0.1", 100 * hit, batch_size=len(labels))
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "train")

    def on_validation_epoch_start(self) -> None:
        if self.val_task is None:
            categories = self.trainer.datamodule.val_set.category_names
            self.val_task = CorrespondenceTask(self.settings.scoring(), categories)
            self.val_metric = self.val_task.metric  # a child module: on the device, synced

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        """The loss, and each pair matched and scored as the test split is."""
        self._loss(batch, "val")
        for sample in batch:
            pred = self.predict_pair(
                sample["src_img"], sample["trg_img"], sample["src_kps"], PairInfo.of(sample)
            )
            self.val_task.update(self.val_task.record(sample, pred), sample)

    def on_validation_epoch_end(self) -> None:
        computed = self.val_metric.compute()  # summed over ranks
        for alpha, value in computed["pck"].items():
            self.log(f"val/pck@{alpha}", value, prog_bar=alpha == "0.1")
        self.val_metric.reset()

    def configure_optimizers(self) -> Any:
        """AdamW on the trainable parameters; with ``lr_schedule=cosine`` a per-step schedule
        over the run's optimiser steps (its state is in the checkpoint, so resuming continues
        it)."""
        s = self.settings
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        if s.lr_schedule == "constant":
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_factor(step, s.warmup_steps, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def cosine_factor(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor of optimiser step ``step``: linear from ``1 / warmup`` to 1 over
    the ``warmup`` first steps, then a half cosine from 1 to 0 at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def load_weights(module: nn.Module, path: str) -> None:
    """Load a Lightning checkpoint's (or a plain) state dict into ``module``; a missing file or a
    state dict of another network is a :class:`ConfigError` naming ``method.checkpoint``."""
    if not Path(path).is_file():
        raise ConfigError(f"method.checkpoint={path!r} does not exist; expected a .ckpt file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(
            f"method.checkpoint={path!r} holds weights of another network ({first})"
        ) from err
