"""CLIP image/text embeddings for OVDiff's class pre-filter (the filter logic lives elsewhere)."""

from __future__ import annotations

from collections.abc import Callable

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import Tensor, nn

from sdzero.backbones.vit import NORMALIZATIONS, check_images, get_vit_spec, load_backbone_model


class CLIPClassifier(nn.Module):
    """A frozen open_clip model giving L2-normalised float32 embeddings in its joint space.

    ``encode_text(prompts)`` -> (P, D); ``encode_image(images)`` with (B, 3, H, W) float in [0, 1]
    -> (B, D): stretched to the model's input size (224 px for ViT-B/16) by bilinear interpolation
    without antialias (the official filter's torchvision-0.13 tensor ``Resize``) and normalised
    with CLIP's own mean/std. Text goes through ``tokenizer`` (open_clip's own: prompts -> (P, 77)
    token ids). The towers run in the model's dtype (:attr:`dtype`; float16 as OpenAI's
    ``clip.load`` on CUDA); the image is resized and normalised in float32 and cast for the
    tower, and the normalisations happen where the official filter does them: text embeddings in
    the model's dtype, image embeddings after the cast to float32.
    """

    def __init__(self, model: CLIP, tokenizer: Callable[[list[str]], Tensor]) -> None:
        super().__init__()
        if not isinstance(model, CLIP):
            raise TypeError(f"expected an open_clip CLIP model, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = tuple(model.visual.image_size)
        mean, std = NORMALIZATIONS["clip"]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the towers compute in (that of the patch embedding's weights)."""
        return self.model.visual.conv1.weight.dtype

    def encode_text(self, prompts: list[str]) -> Tensor:
        """Prompts -> (P, D) unit-norm text embeddings (float32)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"expected a non-empty list of prompt strings, got {prompts!r}")
        tokens = self.tokenizer(list(prompts)).to(self.mean.device)
        return self.model.encode_text(tokens, normalize=True).float()

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) unit-norm image embeddings (float32)."""
        check_images(images)
        images = images.float()
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(
                images, size=self.image_size, mode="bilinear", align_corners=False
            )
        pixels = ((images - self.mean) / self.std).to(self.dtype)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)


def build_clip_classifier(
    name: str = "clip_vitb16", weights: str = "pretrained", dtype: torch.dtype = torch.float32
) -> CLIPClassifier:
    """The named open_clip backbone of ``VIT_MODELS`` (``clip_vitb16`` or ``tiny_clip16``) as a
    classifier; ``weights`` and ``dtype`` as in ``load_backbone_model``."""
    spec = get_vit_spec(name)
    if spec.library != "open_clip":
        raise ValueError(f"backbone {name!r} is not a CLIP model; expected an open_clip backbone")
    model = load_backbone_model(name, weights, dtype)
    return CLIPClassifier(model, open_clip.get_tokenizer(spec.arch))
