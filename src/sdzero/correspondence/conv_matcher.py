"""A small trainable correspondence network (``method=conv_matcher``): proof of ``sdzero train``.

A few convolutions map a model-frame image to descriptors on a grid at 1/4 of its side; matching is
nearest neighbours by cosine similarity (:class:`~sdzero.correspondence.matching.FeatureMatching`).
It is trained with the cross-entropy over target positions of
:class:`~sdzero.correspondence.trained.TrainedMatcher` (which says why that loss).

It has no pretrained backbone (the ``backbone`` group is not read): it learns from pixels, so it is
meant for tests and as the template of a trained method, not for results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sdzero.correspondence.trained import TrainedMatcher, TrainingSettings
from sdzero.errors import ConfigError
from sdzero.evaluation import SmokeTest
from sdzero.settings import build_settings


@dataclass(frozen=True)
class ConvMatcherSettings(TrainingSettings):
    """The ``method.*`` keys of ``conv_matcher``."""

    image_size: int = 64  # side of the model frame (a multiple of 4)
    channels: int = 32  # width of the network and of its descriptors

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size < 4 or self.image_size % 4:
            raise ConfigError(f"method.image_size must be a multiple of 4, got {self.image_size}")
        if not self.channels > 0:
            raise ConfigError(f"method.channels must be > 0, got {self.channels}")


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


class ConvMatcher(TrainedMatcher):
    """The trainable matcher; ``settings``: the keys of :class:`ConvMatcherSettings`."""

    settings_class = ConvMatcherSettings
    smoke_test = SmokeTest("demo_train", ("data.num_pairs=3",))
    uses_sd = False  # learns from pixels: the backbone group is not read

    def __init__(self, backbone: Any = None, seed: int = 0, **settings: Any) -> None:
        super().__init__(seed=seed)  # the backbone group is not read
        self.settings = build_settings(ConvMatcherSettings, settings)
        torch.manual_seed(int(seed))  # the initial weights depend on the run seed only
        self.net = conv_net(self.settings.channels)

    def features(
        self, images: torch.Tensor, names: Sequence[str] = (), category: str = ""
    ) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, channels, S/4, S/4)`` (names and category are not used)."""
        return self.net(images)
