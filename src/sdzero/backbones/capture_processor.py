"""The diffusers attention processor behind :class:`~sdzero.backbones.tap.FeatureTap`.

It replaces the processor of a read layer only (every other layer keeps its own, SDPA by default),
mirrors diffusers' ``AttnProcessor`` step by step, and hands the layer's queries, keys and, when
they are read, its attention probabilities to the tap. Probabilities are computed explicitly
(``attn.get_attention_scores``, which honours the upcast flags); without them the layer's output
goes through SDPA as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from sdzero.backbones.tap import FeatureTap, _Site


class CaptureProcessor:
    """diffusers attention processor that hands queries/keys over and, when probabilities are
    read, computes the attention explicitly (SDPA otherwise)."""

    def __init__(self, tap: FeatureTap, site: _Site) -> None:
        self.tap = tap
        self.site = site

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
        tap, site = self.tap, self.site
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        grid = None
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            grid = (h, w)
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, n_query, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)

        # Every tensor below is computed whether or not the tap is live, so that a recomputation
        # (gradient checkpointing) repeats the forward's operations; the tap drops what it
        # receives outside a live pass. The cut is decided before anything is emitted.
        cuts = tap._cuts(site)
        reads_probs = "probs" in site.kinds
        query = attn.to_q(hidden_states)
        tap._record_hw(site.name, n_query, grid)
        if "queries" in site.kinds:
            tap._emit("queries", site.name, query)
        key = attn.to_k(context)
        if "keys" in site.kinds:
            tap._emit("keys", site.name, key)
        if reads_probs and cuts and tap.heads is not None and attention_mask is None:
            # The pass ends here: only the read heads' probabilities are computed.
            q, k = (
                attn.head_to_batch_dim(t)
                .unflatten(0, (batch, attn.heads))[:, tap.heads]
                .flatten(0, 1)
                for t in (query, key)
            )
            read = attn.get_attention_scores(q, k).view(batch, len(tap.heads), n_query, -1)
            tap._emit("probs", site.name, read)
            return torch.zeros_like(residual)  # a recomputation of a cut pass: never used
        if reads_probs:
            scores = attn.get_attention_scores(
                attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attention_mask
            )  # (B*heads, N, T)
            probs = scores.view(batch, attn.heads, n_query, -1)
            tap._emit("probs", site.name, tap._read_heads(probs))
        value = attn.to_v(context)
        if reads_probs:
            out = torch.bmm(
                probs.reshape(batch * attn.heads, n_query, -1), attn.head_to_batch_dim(value)
            )
            out = attn.batch_to_head_dim(out)
        else:
            head_dim = query.shape[-1] // attn.heads
            q, k, v = (
                t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
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
