"""Errors of the backbone loaders, shared by Stable Diffusion and the ViT extractors."""


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for but are neither on disk nor obtainable (offline, not in the
    cache, unreadable file); the message says how to download them or point at a local copy."""
