"""Errors of the backbone loaders, shared by Stable Diffusion and the ViT extractors."""

from sdzero.errors import UserError


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Pretrained weights were asked for but are neither on disk nor obtainable (offline, not in the
    cache, unreadable file); the message says how to download them or point at a local copy."""


class WeightsFormatError(UserError, ValueError):
    """Weights were found but cannot be used: not a checkpoint of the expected format, or not of
    the architecture ``backbone.arch`` names; the message names the file and what was expected."""
