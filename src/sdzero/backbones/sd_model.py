"""The frozen Stable Diffusion module: images -> VAE latents, forward noising, prompt embeddings.

The scheduler is always a ``DDIMScheduler`` with ``set_alpha_to_one=False, clip_sample=False`` and
the SD betas (the official correspondence code's scheduler; :func:`ddim_scheduler`). Its
``steps_offset`` comes from the scheduler config stored with the weights (1 in the SD hub repos);
single files and random weights have none and get 0, which is what the official correspondence
code ran with (diffusers 0.8). It only shifts ``set_timesteps``; :meth:`StableDiffusion.add_noise`
takes the timestep itself. Loading: :mod:`sdzero.backbones.sd`.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

NoiseKind = Literal["uniform", "gaussian"]
# Slack for float rounding only; anything further out is a different image convention.
_RANGE_TOLERANCE = 1e-3


def ddim_scheduler(config: Mapping[str, Any]) -> DDIMScheduler:
    """The DDIM scheduler of ``config`` with the official correspondence code's settings."""
    return DDIMScheduler.from_config(dict(config), set_alpha_to_one=False, clip_sample=False)


def sample_noise(
    shape: Sequence[int],
    kind: NoiseKind,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Noise of ``shape``: U[0, 1) for ``"uniform"`` (Hedlin et al.'s ``torch.rand_like`` quirk) or
    N(0, 1) for ``"gaussian"``.

    With a generator the draw happens on the generator's device and is then moved to ``device``, so
    a CPU generator gives the same noise whatever device the caller computes on.
    """
    draw = {"uniform": torch.rand, "gaussian": torch.randn}.get(kind)
    if draw is None:
        raise ValueError(f"noise kind {kind!r} is not supported; expected 'uniform' or 'gaussian'")
    at = generator.device if generator is not None else device
    return draw(tuple(shape), generator=generator, device=at, dtype=dtype).to(device)


def validate_images(images: Any) -> None:
    """Raise ``ValueError`` unless ``images`` is a ``(B, 3, H, W)`` float tensor with values in
    [0, 1] and H, W multiples of 8 (the VAE downsamples by 8)."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor (B, 3, H, W); got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must have shape (B, 3, H, W) (RGB, channels first); got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor with values in [0, 1]; got dtype {images.dtype} "
            "(convert uint8 with images.float() / 255)"
        )
    if images.numel() == 0:
        raise ValueError(f"images is empty: shape {tuple(images.shape)}")
    lo, hi = images.min().item(), images.max().item()
    if not (lo >= -_RANGE_TOLERANCE and hi <= 1 + _RANGE_TOLERANCE):
        raise ValueError(
            f"image values must lie in [0, 1]; got min {lo:.4g}, max {hi:.4g} "
            "(divide 0..255 values by 255; map [-1, 1] with (x + 1) / 2; clamp after resizing)"
        )
    h, w = images.shape[-2:]
    if h % 8 or w % 8:
        raise ValueError(f"image height and width must be multiples of 8; got H={h}, W={w}")


class StableDiffusion(nn.Module):
    """Frozen Stable Diffusion parts.

    ``unet``, ``vae``, ``scheduler`` (DDIM), optional ``text_encoder`` and ``tokenizer``; ``arch``
    (architecture name; ``"custom"`` for weights matching none), ``source`` (where the weights came
    from) and ``random_weights``. Every parameter has ``requires_grad=False`` and the module stays
    in eval mode even when a parent module calls ``.train()``.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: DDIMScheduler,
        *,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        arch: str,
        source: str,
        random_weights: bool,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.arch = arch
        self.source = source
        self.random_weights = random_weights
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> StableDiffusion:
        # A frozen backbone: Lightning's module.train() must not switch on dropout in here.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def encode_images(
        self,
        images: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        copies: int = 1,
    ) -> torch.Tensor:
        """VAE latents ``(B * copies, 4, H/8, W/8)`` of ``images`` ``(B, 3, H, W)`` in [0, 1].

        The VAE encodes ``2x - 1``; the result is the posterior mean (Hedlin et al.) or, with
        ``sample=True``, a posterior sample (OVDiff), times ``vae.config.scaling_factor``.
        ``copies``: rows ``b * copies + k`` are copy ``k`` of image ``b``; each image is encoded
        once and its posterior repeated, which equals encoding ``copies`` repeats of it (the
        encoder is deterministic) without the repeated encodes; ``generator`` (a list: one per
        row) draws each copy's sample.
        """
        validate_images(images)
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        x = images.to(device=self.vae.device, dtype=self.vae.dtype) * 2 - 1
        posterior = self.vae.encode(x).latent_dist
        if copies > 1:
            posterior = type(posterior)(posterior.parameters.repeat_interleave(copies, dim=0))
        latents = posterior.sample(generator=generator) if sample else posterior.mean
        return latents * self.vae.config.scaling_factor

    def add_noise(
        self,
        latents: torch.Tensor,
        t: int,
        noise: NoiseKind | torch.Tensor = "uniform",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Forward-diffuse ``latents`` ``(B, C, h, w)`` to timestep ``t``:
        ``sqrt(abar_t) * latents + sqrt(1 - abar_t) * eps``.

        ``eps`` is drawn by :func:`sample_noise` (``"uniform"``, the official correspondence
        quirk, or ``"gaussian"``) or given as a tensor of the latents' shape.
        """
        steps = self.scheduler.config.num_train_timesteps
        try:
            t = operator.index(t)
        except TypeError:
            raise ValueError(f"timestep t must be an integer; got {t!r}") from None
        if not 0 <= t < steps:
            raise ValueError(f"timestep t must lie in [0, {steps}); got {t}")
        if isinstance(noise, torch.Tensor):
            if noise.shape != latents.shape:
                raise ValueError(
                    f"noise shape {tuple(noise.shape)} must equal latents shape "
                    f"{tuple(latents.shape)}"
                )
            eps = noise.to(latents)
        else:
            eps = sample_noise(latents.shape, noise, generator, latents.device, latents.dtype)
        return self.scheduler.add_noise(latents, eps, torch.tensor([t], device=latents.device))

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder last hidden state ``(B, 77, D)`` for B prompts (padded/truncated to 77)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError(
                f"this Stable Diffusion ({self.source}) was loaded without a text encoder; "
                "load it with load_stable_diffusion(..., text_encoder=True) to encode prompts"
            )
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a list of strings; got {prompts!r}")
        length = self.text_encoder.config.max_position_embeddings
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device)).last_hidden_state
