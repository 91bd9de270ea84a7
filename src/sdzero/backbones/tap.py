"""One feature tap: attention probabilities, queries, keys or outputs of named submodules of any
model (SD UNet, VAE, DINO/DINOv2/CLIP ViT), and a forward pass that stops after the last one needed.

Names are module paths of the tapped model (``model.get_submodule(name)``). ``outputs`` may name
any module (``up_blocks.1`` of a UNet, ``blocks.3`` of a ViT). ``probs``, ``queries`` and ``keys``
name an attention module, or a module holding exactly one (a ViT block ``blocks.3``). Three kinds
of attention are understood, each captured where it computes:

- diffusers ``Attention`` (SD UNet and VAE): a capturing attention processor is swapped in for the
  read layers only; every other layer keeps its processor (SDPA by default);
- fused-``qkv`` attention (timm, DINOv2's own code): a forward hook on the ``qkv`` projection;
- ``nn.MultiheadAttention`` (open_clip): a forward pre-hook applying its query/key rows to its
  inputs, exactly as its forward does.

Module outputs are taken by forward hooks.

The truncation rule: with ``truncate=True`` the capture that completes the requested set in a
pass raises an exception that :meth:`FeatureTap.run` catches, so nothing after it is computed;
an attention layer that completes the set does not even compute its values. What is captured is
bit-identical to a full pass because nothing after that point feeds it.

Gradient checkpointing works with truncation as long as the tap stays entered until ``backward``
has run: a recomputed block neither records nor stops, and the layer that cut the pass
recomputes the same operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdzero.backbones.capture_processor import CaptureProcessor

ATTENTION_KINDS = ("probs", "queries", "keys")
KINDS = (*ATTENTION_KINDS, "outputs")
Callback = Callable[[str, str, Any], None]


@dataclass
class Captured:
    """What one pass captured, keyed by the names asked for.

    ``probs[name]``: ``(B, heads_read, N_q, N_k)`` attention probabilities (rows sum to 1).
    ``queries[name]`` / ``keys[name]``: ``(B, N, C)`` projections, heads concatenated.
    ``outputs[name]``: the module's return value, as it returned it (``(B, C, h, w)`` for a UNet
    block, ``(B, tokens, C)`` for a ViT block).
    ``hw[name]``: ``(h, w)`` of a diffusers attention layer's grid, row-major (index = y * w + x).
    ``output``: what the forward callable returned, when the pass was not cut.
    """

    probs: dict[str, torch.Tensor] = field(default_factory=dict)
    queries: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    hw: dict[str, tuple[int, int]] = field(default_factory=dict)
    output: Any = None


class _StopForward(Exception):
    """Raised by the capture that completes a tap's set; only that tap's ``run`` catches it."""

    def __init__(self, tap: FeatureTap) -> None:
        super().__init__()
        self.tap = tap


@dataclass
class _Site:
    """One attention module read by the tap: the name asked for, its path, what to capture."""

    name: str
    path: str
    module: nn.Module
    style: str  # "processor" | "qkv" | "mha"
    kinds: set[str] = field(default_factory=set)


def _attention_style(module: nn.Module) -> str | None:
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if hasattr(module, "set_processor") and hasattr(module, "to_q"):
        return "processor"
    if isinstance(getattr(module, "qkv", None), nn.Linear) and hasattr(module, "num_heads"):
        return "qkv"
    return None


def attention_modules(model: nn.Module) -> list[str]:
    """Paths of the attention modules of ``model`` the tap can read, in module-tree order."""
    return [name for name, m in model.named_modules() if name and _attention_style(m)]


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        parts = name.split(".")
        parent = ""
        for depth in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:depth])
            try:
                model.get_submodule(prefix)
            except AttributeError:
                continue
            parent = prefix
            break
        children = [
            f"{parent}.{n}" if parent else n
            for n, _ in model.get_submodule(parent).named_children()
        ]
        where = f"under {parent!r}" if parent else "at the top level"
        raise ValueError(
            f"{type(model).__name__} has no submodule {name!r}; {where} there are: "
            f"{', '.join(children) or '(nothing)'}"
        ) from None


def _attention_site(model: nn.Module, name: str) -> tuple[str, nn.Module, str]:
    """(path, module, style) of the attention module ``name`` is or holds (exactly one)."""
    path, module = name, _submodule(model, name)
    if _attention_style(module) is None:
        inside = attention_modules(module)
        if len(inside) != 1:
            listed = [f"{name}.{p}" for p in inside] or attention_modules(model)
            what = f"holds {len(inside)}" if inside else "holds none; the model's are"
            more = f" (and {len(listed) - 48} more)" if len(listed) > 48 else ""
            raise ValueError(
                f"{name!r} is not an attention module and {what}: {', '.join(listed[:48])}{more}"
            )
        path, module = f"{name}.{inside[0]}", module.get_submodule(inside[0])
    style = _attention_style(module)
    if style == "mha" and not (module.batch_first and module.in_proj_weight is not None):
        raise ValueError(
            f"{path}: expected a batch_first nn.MultiheadAttention with packed in_proj"
        )
    return path, module, style


def _names(kind: str, names: Iterable[str]) -> list[str]:
    if isinstance(names, str):
        names = [names]
    out = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"{kind}: {name!r} is not a module path; name modules by path (cross-attention "
                "indices of a UNet: sdzero.backbones.attention.resolve_layers)"
            )
        out.append(name.removesuffix(".processor"))
    return list(dict.fromkeys(out))


class FeatureTap:
    """Capture named attention probabilities / queries / keys and module outputs of ``model``.

    Enter it (captures are installed on enter and removed on exit), then run any callable that
    runs ``model`` (or a part of it)::

        with FeatureTap(unet, outputs=["up_blocks.1"]) as tap:
            got = tap.run(lambda: unet(latents, t, encoder_hidden_states=cond))
        got.outputs["up_blocks.1"]                        # (B, C, h, w); the rest never ran

    :param probs, queries, keys: attention modules (or modules holding exactly one) to read.
    :param outputs: modules whose outputs to take.
    :param heads: head indices kept in ``probs`` (``None`` = all); Hedlin et al. read heads 4-7.
    :param truncate: stop the pass once everything asked for has been captured.
    :param callback: called as ``callback(name, kind, value)`` for every capture instead of
        storing it (e.g. to accumulate maps over sampling steps). Without it only passes run by
        :meth:`run` record; with it, direct calls of the model (a pipeline's) report too.

    While entered, run the model through :meth:`run`; direct calls are for ``truncate=False``
    (with a callback): a truncating tap's cut layer cannot tell them from a recomputation.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        probs: Iterable[str] = (),
        queries: Iterable[str] = (),
        keys: Iterable[str] = (),
        outputs: Iterable[str] = (),
        heads: Sequence[int] | None = None,
        truncate: bool = True,
        callback: Callback | None = None,
    ) -> None:
        asked = {
            "probs": _names("probs", probs),
            "queries": _names("queries", queries),
            "keys": _names("keys", keys),
            "outputs": _names("outputs", outputs),
        }
        if not any(asked.values()):
            raise ValueError(
                "FeatureTap needs at least one name in probs, queries, keys or outputs"
            )
        self.model = model
        self.heads = None if heads is None else [int(h) for h in heads]
        self.truncate = truncate
        self.callback = callback
        self._sites: dict[str, _Site] = {}
        for kind in ATTENTION_KINDS:
            for name in asked[kind]:
                path, module, style = _attention_site(model, name)
                site = self._sites.setdefault(path, _Site(name, path, module, style))
                if site.name != name:
                    raise ValueError(
                        f"{site.name!r} and {name!r} are the same attention module {path!r}"
                    )
                site.kinds.add(kind)
        self._outputs = {name: _submodule(model, name) for name in asked["outputs"]}
        self._wanted = {(kind, name) for kind, names in asked.items() for name in names}
        self._check_heads()
        self._installed: list[Callable[[], None]] | None = None
        self._current = Captured()
        self._seen: set[tuple[str, str]] = set()
        self._grid: tuple[int, int] | None = None
        self._inside = False  # within run() (not a checkpoint recomputation during backward)
        self._cut_at: str | None = None  # the site that cut the last pass

    def _check_heads(self) -> None:
        if self.heads is None:
            return
        counts = {_num_heads(s) for s in self._sites.values() if "probs" in s.kinds}
        bad = [h for h in self.heads if not all(-n <= h < n for n in counts)]
        if bad:
            raise ValueError(f"heads {bad} out of range for layers with {sorted(counts)} heads")

    def __enter__(self) -> FeatureTap:
        if self._installed is not None:
            raise RuntimeError("this FeatureTap is already entered")
        undo: list[Callable[[], None]] = []
        for site in self._sites.values():
            if site.style == "processor":
                saved = site.module.processor
                site.module.set_processor(CaptureProcessor(self, site))
                undo.append(lambda m=site.module, p=saved: m.set_processor(p))
            elif site.style == "qkv":
                undo.append(site.module.qkv.register_forward_hook(self._qkv_hook(site)).remove)
            else:
                undo.append(site.module.register_forward_pre_hook(self._mha_hook(site)).remove)
        for name, module in self._outputs.items():
            undo.append(module.register_forward_hook(self._output_hook(name)).remove)
        self._installed = undo
        return self

    def __exit__(self, *exc: object) -> None:
        for restore in reversed(self._installed or []):
            restore()
        self._installed = None

    def run(self, forward: Callable[[], Any], grid: tuple[int, int] | None = None) -> Captured:
        """Run ``forward()`` and return what it captured (``output``: its result, if not cut).

        ``grid``: the ``(h, w)`` input grid of a UNet (the latent size), from which the grids
        ``hw`` of its token-sequence attention layers are inferred (square without it).
        """
        if self._installed is None:
            raise RuntimeError(f"{type(self).__name__} must be entered (`with ... as tap:`)")
        self._current, self._seen = Captured(), set()
        self._grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self._inside = True
        try:
            try:
                self._current.output = forward()
            except _StopForward as stop:
                if stop.tap is not self:
                    raise
            else:
                missing = sorted(self._wanted - self._seen)
                if missing:
                    raise RuntimeError(f"these never ran during the forward pass: {missing}")
        finally:
            self._inside = False
            self._grid = None
        captured, self._current = self._current, Captured()
        return captured

    # ---------------------------------------------------------------- used by the captures
    @property
    def _live(self) -> bool:
        return self._inside or self.callback is not None

    def _emit(self, kind: str, name: str, value: Any) -> None:
        """Hand one capture over (dropped outside a live pass); the one that completes the set
        ends the pass (in ``run``)."""
        if not self._live:
            return
        if self.callback is not None:
            self.callback(name, kind, value)
        else:
            getattr(self._current, kind)[name] = value
        if self._inside:
            self._seen.add((kind, name))
            if self.truncate and self._seen >= self._wanted:
                raise _StopForward(self)

    def _cuts(self, site: _Site) -> bool:
        """Whether ``site`` is where this pass ends (in a recomputation: where the last one did)."""
        if not self._inside:
            return self.truncate and self._cut_at == site.path
        cuts = self.truncate and self._wanted - self._seen <= {(k, site.name) for k in site.kinds}
        if cuts:
            self._cut_at = site.path
        return cuts

    def _record_hw(self, name: str, n_query: int, hw: tuple[int, int] | None) -> None:
        if not self._live:
            return
        if hw is None and self._grid is None:  # a direct call (a pipeline's): assume square
            side = math.isqrt(n_query)
            hw = (side, side)
        elif hw is None:
            hw = _downsampled_grid(self._grid, n_query)
            if hw is None:
                raise RuntimeError(
                    f"{name}: cannot infer the grid of {n_query} positions from "
                    f"{self._grid[0]}x{self._grid[1]}"
                )
        self._current.hw[name] = hw

    def _read_heads(self, probs: torch.Tensor) -> torch.Tensor:
        return probs if self.heads is None else probs[:, self.heads]

    def _emit_attention(
        self, site: _Site, query: torch.Tensor, key: torch.Tensor, heads: int, scale: float
    ) -> None:
        """Queries, keys, then probabilities ``softmax(scale * q k^T)`` of ``(B, N, C)`` token
        sequences. Computed whether or not the pass is live, so that a recomputation (gradient
        checkpointing) repeats the forward's operations."""
        if "queries" in site.kinds:
            self._emit("queries", site.name, query)
        if "keys" in site.kinds:
            self._emit("keys", site.name, key)
        if "probs" in site.kinds:
            q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (query, key))
            q = getattr(site.module, "q_norm", nn.Identity())(q) * scale
            k = getattr(site.module, "k_norm", nn.Identity())(k)
            self._emit("probs", site.name, self._read_heads((q @ k.transpose(-2, -1)).softmax(-1)))

    def _qkv_hook(self, site: _Site) -> Callable[..., None]:
        attn = site.module

        def hook(linear: nn.Linear, args: tuple[Any, ...], qkv: torch.Tensor) -> None:
            dim = linear.out_features // 3  # [q | k | v], heads concatenated inside each
            query, key = qkv[..., :dim], qkv[..., dim : 2 * dim]
            self._emit_attention(site, query, key, attn.num_heads, attn.scale)

        return hook

    def _mha_hook(self, site: _Site) -> Callable[..., None]:
        mha = site.module
        dim, heads = mha.embed_dim, mha.num_heads

        def rows(x: torch.Tensor, i: int) -> torch.Tensor | None:
            # nn.MultiheadAttention never exposes its projections: apply its i-th block of
            # in_proj to its i-th input, as its forward does.
            bias = None if mha.in_proj_bias is None else mha.in_proj_bias[i * dim : (i + 1) * dim]
            return F.linear(x, mha.in_proj_weight[i * dim : (i + 1) * dim], bias)

        def hook(module: nn.MultiheadAttention, args: tuple[Any, ...]) -> None:
            query = rows(args[0], 0) if site.kinds - {"keys"} else None
            key = rows(args[1], 1) if site.kinds - {"queries"} else None
            self._emit_attention(site, query, key, heads, (dim // heads) ** -0.5)

        return hook

    def _output_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._emit("outputs", name, output)

        return hook


def _downsampled_grid(grid: tuple[int, int], positions: int) -> tuple[int, int] | None:
    """The grid of ``positions`` cells that halving ``grid`` k times gives (stride-2 convolutions
    round odd sizes up: 8x6 -> 4x3 -> 2x2 -> 1x1), or None."""
    height, width = grid
    factor = 1
    while factor < 2 * max(height, width):
        hw = (-(-height // factor), -(-width // factor))
        if hw[0] * hw[1] == positions:
            return hw
        factor *= 2
    return None


def _num_heads(site: _Site) -> int:
    return int(site.module.heads if site.style == "processor" else site.module.num_heads)
