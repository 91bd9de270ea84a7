"""A small trainable correspondence network (``method=conv_matcher``): proof of ``sdzero train``.

A few convolutions map a model-frame image to descriptors on a grid at 1/4 of its side; matching is
nearest neighbours by cosine similarity (:class:`~sdzero.correspondence.matching.FeatureMatching`).
It is trained on keypoint pairs with a cross-entropy over target positions: for each labelled
source point, the softmax over all target cells of ``similarity / temperature`` should put its mass
on the cell holding the labelled target point. That is the contrastive loss of dense
correspondence training (every other target cell is a negative), needs no hard-negative mining,
and trains exactly the quantity nearest-neighbour matching reads (the argmax of the same scores).

It has no pretrained backbone (the ``backbone`` group is not read): it learns from pixels, so it is
meant for tests and as the template of a trained method, not for results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdzero.correspondence.matching import (
    FeatureMatching,
    FeatureSettings,
    cell_centres,
    cell_of,
    sample_descriptors,
    similarity,
)
from sdzero.errors import ConfigError
from sdzero.evaluation import SmokeTest
from sdzero.settings import build_settings


@dataclass(frozen=True)
class ConvMatcherSettings(FeatureSettings):
    """The ``method.*`` keys of ``conv_matcher``."""

    image_size: int = 64  # side of the model frame (a multiple of 4)
    channels: int = 32  # width of the network and of its descriptors
    temperature: float = 0.1  # softmax temperature of the training loss
    lr: float = 1e-3  # Adam learning rate
    checkpoint: str | None = None  # weights to evaluate: a Lightning .ckpt written by sdzero train

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size < 4 or self.image_size % 4:
            raise ConfigError(f"method.image_size must be a multiple of 4, got {self.image_size}")
        for key in ("channels", "temperature", "lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"method.{key} must be > 0, got {getattr(self, key)}")


def conv_net(channels: int) -> nn.Sequential:
    """``(B, 3, S, S)`` -> ``(B, channels, S/4, S/4)``."""
    c = channels
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, c, 1),
    )


class ConvMatcher(FeatureMatching):
    """The trainable matcher; ``settings``: the keys of :class:`ConvMatcherSettings`.

    ``monitor`` names the logged value :class:`~pytorch_lightning.callbacks.ModelCheckpoint`
    keeps the best checkpoint by, and whether lower is better.
    """

    settings_class = ConvMatcherSettings
    monitor = ("val/loss", "min")
    smoke_test = SmokeTest("demo_train", ("data.num_pairs=3",))
    uses_sd = False  # learns from pixels: the backbone group is not read

    def __init__(self, backbone: Any = None, seed: int = 0, **settings: Any) -> None:
        super().__init__(seed=seed)  # the backbone group is not read
        self.settings = build_settings(ConvMatcherSettings, settings)
        torch.manual_seed(int(seed))  # the initial weights depend on the run seed only
        self.net = conv_net(self.settings.channels)
        self.loaded = False
        self.random_weights = not self.settings.checkpoint  # evaluated untrained: meaningless

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.settings.checkpoint and not self.loaded:
            load_weights(self, self.settings.checkpoint)
            self.loaded = True

    def features(
        self, images: torch.Tensor, names: Sequence[str] = (), category: str = ""
    ) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, channels, S/4, S/4)`` (names and category are not used)."""
        return self.net(images)

    # ------------------------------------------------------------------------------- training
    def _pairs(self, batch: list[dict[str, Any]]) -> tuple[torch.Tensor, list[tuple]]:
        """Model-frame images ``(2B, 3, S, S)`` (sources then targets) and per pair its source and
        target points in model pixels."""
        images, points = [], []
        for sample in batch:
            src_frame, trg_frame = self.frame(sample["src_img"]), self.frame(sample["trg_img"])
            images += [src_frame.image(sample["src_img"]), trg_frame.image(sample["trg_img"])]
            points.append(
                (src_frame.to_model(sample["src_kps"]), trg_frame.to_model(sample["trg_kps"]))
            )
        stacked = torch.cat(images).to(self.device)
        order = list(range(0, len(stacked), 2)) + list(range(1, len(stacked), 2))
        return stacked[order], points

    def _scores(self, batch: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Similarities ``(P, h*w)`` of every labelled source point with its target's cells, the
        labelled cell ``(P,)`` and the grid ``(h, w)``."""
        images, points = self._pairs(batch)
        feats = self.features(images)
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
        scores, labels, grid = self._scores(batch)
        loss = F.cross_entropy(scores / self.settings.temperature, labels)
        size = self.settings.image_size
        error = cell_centres(scores.argmax(1), grid, size) - cell_centres(labels, grid, size)
        hit = (error.norm(dim=1) <= 0.1 * size).float().mean()
        sync = stage == "val"
        self.log(f"{stage}/loss", loss, batch_size=len(labels), prog_bar=True, sync_dist=sync)
        self.log(f"{stage}/pck@0.1", 100 * hit, batch_size=len(labels), sync_dist=sync)
        return loss

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "train")

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._loss(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.settings.lr)


def load_weights(module: nn.Module, path: str) -> None:
    """Load a Lightning checkpoint's (or a plain) state dict into ``module``; a missing file or a
    state dict of another network is a :class:`ConfigError` naming ``method.checkpoint``."""
    from pathlib import Path

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
