"""Cross-attention layers of a UNet named the papers' way, and their capture with truncation.

Layers are named two ways: by diffusers module path (``up_blocks.1.attentions.0.transformer_blocks.0.attn2``)
and by their index among the UNet's cross-attention layers in execution order (16 for SD 1.x/2.x: down
64²×2, 32²×2, 16²×2, mid 8², up 16²×3, 32²×3, 64²×3 for a 512 px input). The papers use that index:
Hedlin et al.'s layers 7–10 are the three 16² up layers and the first 32² up layer.

Capture goes through the one feature tap (:mod:`sdzero.backbones.tap`): only the layers that are read
get a capturing processor, every other layer keeps its processor (SDPA by default), and with
``truncate=True`` the forward pass stops right after the last read layer has been captured; maps and
gradients are bit-identical to those of a full pass because nothing after that point feeds them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from sdzero.backbones.tap import Captured, FeatureTap

__all__ = [
    "AttentionCapture",
    "Captured",
    "cross_attention_layers",
    "probs_to_maps",
    "resolve_layers",
]

_STAGE_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
_PATH = re.compile(
    r"^(down_blocks|up_blocks|mid_block)(?:\.(\d+))?\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$"
)


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Module paths of the UNet's cross-attention (``attn2``) layers, in execution order.

    Execution order is down blocks, mid block, up blocks; within a block its attentions and their
    transformer blocks by index. Derived from the module tree, not hard-coded.
    """
    found = []
    for name, _ in unet.named_modules():
        m = _PATH.match(name)
        if m:
            stage, block, attn, tb = m.groups()
            found.append(((_STAGE_ORDER[stage], int(block or 0), int(attn), int(tb)), name))
    if not found:
        raise ValueError(
            f"{type(unet).__name__} has no cross-attention layers named like "
            "'<down_blocks|mid_block|up_blocks>...attentions.J.transformer_blocks.K.attn2'"
        )
    return [name for _, name in sorted(found)]


def resolve_layers(unet: nn.Module, layers: Iterable[int | str]) -> list[str]:
    """Map layer indices (among the cross-attention layers, execution order) or module paths to paths.

    The result is in execution order, without duplicates. Unknown names/indices raise ``ValueError``
    listing what exists.
    """
    all_layers = cross_attention_layers(unet)
    chosen = set()
    for layer in layers:
        if isinstance(layer, bool):
            raise ValueError(f"layer {layer!r}: expected an int index or a module path")
        if isinstance(layer, int) or (isinstance(layer, str) and layer.lstrip("-").isdigit()):
            i = int(layer)
            if not -len(all_layers) <= i < len(all_layers):
                raise ValueError(
                    f"cross-attention layer index {i} out of range: this UNet has {len(all_layers)} "
                    f"(0..{len(all_layers) - 1})"
                )
            chosen.add(all_layers[i])
        else:
            path = str(layer).removesuffix(".processor")
            if path not in all_layers:
                raise ValueError(
                    f"unknown cross-attention layer {layer!r}; valid paths: {', '.join(all_layers)}"
                )
            chosen.add(path)
    if not chosen:
        raise ValueError("no cross-attention layers chosen")
    return [name for name in all_layers if name in chosen]


class AttentionCapture:
    """Capture cross-attention probabilities and/or queries of chosen UNet layers: a front over
    :class:`~sdzero.backbones.tap.FeatureTap` that names layers the papers' way.

    Use as a context manager (capture processors are swapped in on enter and restored on exit),
    then call it like the UNet::

        with AttentionCapture(unet, layers=[7, 8, 9, 10], heads=[4, 5, 6, 7]) as cap:
            got = cap(latents, t, cond)         # got.probs[path]: (B, 4, h*w, 77)

    :param layers: indices among the cross-attention layers (execution order) or module paths.
    :param probs: capture attention probabilities ``(B, heads_read, H*W, T)``.
    :param queries: capture attention queries ``(B, H*W, C)``.
    :param heads: head indices to keep (``None`` = all); Hedlin et al.'s official code reads heads 4-7.
    :param truncate: stop the UNet after the last read layer (its output is then not returned).
    :param callback: called as ``callback(path, kind, tensor)`` for every capture (e.g. to accumulate
        maps over sampling steps) instead of storing them. Without a callback, only UNet passes run
        through the capture's ``__call__`` are recorded; with one, direct UNet calls (a pipeline's) too.

    Gradient checkpointing (``unet.enable_gradient_checkpointing()``) works with truncation as long
    as the capture stays entered until ``backward`` has run.
    """

    def __init__(
        self,
        unet: nn.Module,
        layers: Iterable[int | str],
        *,
        probs: bool = True,
        queries: bool = False,
        heads: Sequence[int] | None = None,
        truncate: bool = True,
        callback: Callable[[str, str, torch.Tensor], None] | None = None,
    ) -> None:
        if not (probs or queries):
            raise ValueError("AttentionCapture needs probs=True or queries=True")
        self.unet = unet
        self.layers = resolve_layers(unet, layers)
        self.tap = FeatureTap(
            unet,
            probs=self.layers if probs else (),
            queries=self.layers if queries else (),
            heads=heads,
            truncate=truncate,
            callback=callback,
        )

    def __enter__(self) -> AttentionCapture:
        self.tap.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.tap.__exit__(*exc)

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: int | torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        **unet_kwargs: object,
    ) -> Captured:
        """Run the UNet on ``sample`` ``(B, 4, h, w)`` latents and return what was captured
        (``output``: the noise prediction ``(B, 4, h, w)`` when the pass was not truncated)."""
        return self.tap.run(
            lambda: (
                self.unet(
                    sample, timestep, encoder_hidden_states=encoder_hidden_states, **unet_kwargs
                ).sample
            ),
            grid=tuple(sample.shape[-2:]),
        )


def probs_to_maps(probs: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Reshape ``(B, heads, h*w, T)`` probabilities to ``(B, heads, T, h, w)`` spatial maps."""
    b, heads, n, t = probs.shape
    if n != hw[0] * hw[1]:
        raise ValueError(f"probabilities over {n} positions do not fit a {hw[0]}x{hw[1]} grid")
    return probs.permute(0, 1, 3, 2).reshape(b, heads, t, hw[0], hw[1])
