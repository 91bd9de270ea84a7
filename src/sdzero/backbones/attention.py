"""Cross-attention capture through diffusers attention processors, with UNet truncation.

Layers are named two ways: by diffusers module path (``up_blocks.1.attentions.0.transformer_blocks.0.attn2``)
and by their index among the UNet's cross-attention layers in execution order (16 for SD 1.x/2.x: down
64²×2, 32²×2, 16²×2, mid 8², up 16²×3, 32²×3, 64²×3 for a 512 px input). The papers use that index:
Hedlin et al.'s layers 7–10 are the three 16² up layers and the first 32² up layer.

Only the layers that are read get a capturing processor; every other layer keeps its processor (SDPA by
default). With ``truncate=True`` the forward pass stops right after the last read layer has been captured
(an exception unwinds the UNet), so nothing after it is computed; maps and gradients are bit-identical
to those of a full pass because nothing after that point feeds them.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

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


class _StopForward(Exception):
    """Raised by the last read layer's processor to end a truncated forward pass."""


@dataclass
class Captured:
    """What one forward pass captured, keyed by layer path.

    ``probs[path]``: ``(B, heads_read, H*W, tokens)`` attention probabilities (rows sum to 1 over tokens).
    ``queries[path]``: ``(B, H*W, C)`` attention queries (the ``to_q`` output, heads concatenated).
    ``hw[path]``: ``(h, w)`` of the layer's spatial grid, row-major (index = y * w + x).
    ``output``: the UNet's noise prediction when the pass was not truncated.
    """

    probs: dict[str, torch.Tensor] = field(default_factory=dict)
    queries: dict[str, torch.Tensor] = field(default_factory=dict)
    hw: dict[str, tuple[int, int]] = field(default_factory=dict)
    output: torch.Tensor | None = None


class _CaptureProcessor:
    """Attention processor that computes the attention explicitly and hands probabilities/queries over."""

    def __init__(self, owner: AttentionCapture, name: str, last: bool) -> None:
        self.owner = owner
        self.name = name
        self.last = last

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        owner = self.owner
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, n_query, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)

        query = attn.to_q(hidden_states)
        # Outside a capture call (gradient checkpointing recomputing this block in backward) the
        # layer computes as usual: nothing is emitted and the pass is not cut.
        live = owner._inside or owner.callback is not None
        if live:
            owner._record_hw(self.name, n_query)
        if owner.queries and live:
            owner._emit(self.name, "queries", query)
        stop = self.last and owner.truncate  # the path must not depend on `live` (recomputation)
        if owner.probs and stop and owner.heads is not None and attention_mask is None:
            # The pass ends here: only the read heads' probabilities are computed.
            q, k = (
                attn.head_to_batch_dim(t)
                .unflatten(0, (batch, attn.heads))[:, owner.heads]
                .flatten(0, 1)
                for t in (query, attn.to_k(context))
            )
            read = attn.get_attention_scores(q, k).view(batch, len(owner.heads), n_query, -1)
            if live:
                owner._emit(self.name, "probs", read)
            if owner._inside:
                raise _StopForward
            return torch.zeros_like(residual)  # a recomputation of a cut pass: never used
        if owner.probs:
            q = attn.head_to_batch_dim(query)
            k = attn.head_to_batch_dim(attn.to_k(context))
            probs = attn.get_attention_scores(q, k, attention_mask)  # (B*heads, N, T)
            probs = probs.view(batch, attn.heads, n_query, -1)
            read = probs if owner.heads is None else probs[:, owner.heads]
            if live:
                owner._emit(self.name, "probs", read)
        if stop and owner._inside:
            raise _StopForward
        value = attn.to_v(context)
        if owner.probs:
            out = torch.bmm(
                probs.reshape(batch * attn.heads, n_query, -1), attn.head_to_batch_dim(value)
            )
            out = attn.batch_to_head_dim(out)
        else:
            head_dim = query.shape[-1] // attn.heads
            q, k, v = (
                t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                for t in (query, attn.to_k(context), value)
            )
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, scale=attn.scale
            )
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class AttentionCapture:
    """Capture cross-attention probabilities and/or queries of chosen layers during UNet forwards.

    Use as a context manager (processors are swapped in on enter and restored on exit), then call it
    like the UNet::

        with AttentionCapture(unet, layers=[7, 8, 9, 10], heads=[4, 5, 6, 7]) as cap:
            got = cap(latents, t, cond)         # got.probs[path]: (B, 4, h*w, 77)

    :param layers: indices among the cross-attention layers (execution order) or module paths.
    :param probs: capture attention probabilities ``(B, heads_read, H*W, T)``.
    :param queries: capture attention queries ``(B, H*W, C)``.
    :param heads: head indices to keep (``None`` = all); Hedlin et al.'s official code reads heads 4–7.
    :param truncate: stop the UNet after the last read layer (its output is then not returned).
    :param callback: called as ``callback(path, kind, tensor)`` for every capture (e.g. to accumulate
        maps over sampling steps) instead of storing them. Without a callback, only UNet passes run
        through the capture's ``__call__`` are recorded; with one, direct UNet calls (a pipeline's) too.

    Gradient checkpointing (``unet.enable_gradient_checkpointing()``) works with truncation as long
    as the capture stays entered until ``backward`` has run: a recomputed block neither records nor
    stops.
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
        self.probs = probs
        self.queries = queries
        self.heads = None if heads is None else [int(h) for h in heads]
        self.truncate = truncate
        self.callback = callback
        self._saved: dict[str, object] | None = None
        self._current = Captured()
        self._latent_hw: tuple[int, int] | None = None
        self._inside = False  # within __call__ (not a checkpoint recomputation during backward)
        if self.heads is not None:
            n_heads = {self.unet.get_submodule(p).heads for p in self.layers}
            bad = [h for h in self.heads if not all(-n <= h < n for n in n_heads)]
            if bad:
                raise ValueError(
                    f"heads {bad} out of range for layers with {sorted(n_heads)} heads"
                )

    def __enter__(self) -> AttentionCapture:
        self._saved = dict(self.unet.attn_processors)
        procs = dict(self._saved)
        for path in self.layers:
            procs[f"{path}.processor"] = _CaptureProcessor(self, path, last=path == self.layers[-1])
        self.unet.set_attn_processor(procs)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None

    def _emit(self, path: str, kind: str, tensor: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(path, kind, tensor)
        else:
            getattr(self._current, kind)[path] = tensor

    def _record_hw(self, path: str, n_query: int) -> None:
        if self._latent_hw is None:  # the UNet was called directly (e.g. by a pipeline): square
            side = math.isqrt(n_query)
            self._current.hw[path] = (side, side)
            return
        lh, lw = self._latent_hw
        factor = round((lh * lw / n_query) ** 0.5)
        hw = (-(-lh // factor), -(-lw // factor))  # strided convs round up odd sizes
        if hw[0] * hw[1] != n_query:
            raise RuntimeError(
                f"{path}: cannot infer the grid of {n_query} positions from {lh}x{lw}"
            )
        self._current.hw[path] = hw

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: int | torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        **unet_kwargs: object,
    ) -> Captured:
        """Run the UNet on ``sample`` ``(B, 4, h, w)`` latents and return what was captured."""
        if self._saved is None:
            raise RuntimeError(
                "AttentionCapture must be entered (`with AttentionCapture(...) as cap:`)"
            )
        self._current = Captured()
        self._latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        self._inside = True
        try:
            with contextlib.suppress(_StopForward):
                out = self.unet(
                    sample, timestep, encoder_hidden_states=encoder_hidden_states, **unet_kwargs
                )
                self._current.output = out.sample
        finally:
            self._latent_hw = None
            self._inside = False
        captured, self._current = self._current, Captured()
        return captured


def probs_to_maps(probs: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Reshape ``(B, heads, h*w, T)`` probabilities to ``(B, heads, T, h, w)`` spatial maps."""
    b, heads, n, t = probs.shape
    if n != hw[0] * hw[1]:
        raise ValueError(f"probabilities over {n} positions do not fit a {hw[0]}x{hw[1]} grid")
    return probs.permute(0, 1, 3, 2).reshape(b, heads, t, hw[0], hw[1])
