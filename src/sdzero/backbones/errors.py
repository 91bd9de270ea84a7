"""Errors of the backbone loaders, shared by Stable Diffusion and the ViT extractors."""

from sdzero.errors import UserError


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Pretrained weights were asked for but are neither on disk nor obtainable (offline, not in the
    cache, unreadable file); the message says how to download them or point at a local copy."""


class WeightsFormatError(UserError, ValueError):
    """Weights were found but cannot be used: not a checkpoint of the expected format, or not of
    the architecture ``backbone.arch`` names; the message names the file and what was expected."""


class UnsupportedArchitectureError(UserError, NotImplementedError):
    """The architecture asked for is known but not built yet (e.g. SDXL: two text encoders and
    ``added_cond_kwargs``); the message names it and what is supported."""
