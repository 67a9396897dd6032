"""Swap the causal mask for a bidirectional one, in all layers, some layers or some heads.

TransformerLens 3.9 applies the causal (and local-window) mask inside each attention
module, before ``hook_attn_scores``, unless ``attn._attention_dir_override`` says
``"bidirectional"``. These context managers flip that switch and restore it on exit,
also when the body raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rope_leak.backends.bridge import is_bridge, layer_kinds, window_size
from rope_leak.heads import HeadSpec, LayerSpec, heads_by_layer, normalize_heads, normalize_layers
from rope_leak.interventions.hooks import act_name, intervention_hooks

WINDOW_MODES = ("symmetric", "none")


def _mask_keys(
    scores: Float[Tensor, "batch head q k"],
    window: int | None,
    causal_heads: list[int],
) -> Float[Tensor, "batch head q k"]:
    """Re-impose masks on a layer that runs bidirectionally.

    ``window`` (a symmetric local window, ``|i - j| < w``) applies to every head; heads
    in ``causal_heads`` keep the ordinary causal mask (per-head swaps).
    """
    n_q, n_k = scores.shape[-2:]
    positions_q = torch.arange(n_q, device=scores.device)
    positions_k = torch.arange(n_k, device=scores.device)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    if window is not None:
        allowed = (positions_k[None, :] - positions_q[:, None]).abs() < window
        scores = torch.where(allowed, scores, neg_inf)
    if causal_heads:
        causal = positions_k[None, :] <= positions_q[:, None]
        scores = scores.clone()
        scores[:, causal_heads] = torch.where(causal, scores[:, causal_heads], neg_inf)
    return scores


def layer_heads(model: HookedTransformer, layers: LayerSpec = None,
                heads: HeadSpec = None) -> dict[int, list[int]]:
    """``{layer: [head, ...]}`` that a mask swap covers (see :func:`bidirectional`)."""
    if layers is not None and heads is not None:
        raise ValueError(
            "pass layers= or heads=, not both. Fix: name whole layers with layers=[...], or "
            "single heads with heads=[(layer, head), ...] (an int layer in heads= means all its heads)."
        )
    if heads is not None:
        return heads_by_layer(normalize_heads(heads, model))
    n_heads = model.cfg.n_heads
    return {layer: list(range(n_heads)) for layer in normalize_layers(layers, model)}


@contextlib.contextmanager
def bidirectional(
    model: HookedTransformer,
    layers: LayerSpec = None,
    heads: HeadSpec = None,
    window: str = "symmetric",
) -> Iterator[HookedTransformer]:
    """Run attention bidirectionally (every key visible to every query).

    Args:
        layers: layers to swap: an int, ``"L3"``, a list of them, or None (all layers).
        heads: swap single heads only, in any head spec of :mod:`rope_leak.heads`
            (``[(0, 1)]``, ``{0: [1]}``, ``"L0H1"``, ...); the other heads of those layers
            keep the causal mask. Give ``layers`` or ``heads``, not both.
        window: for sliding-window (local) layers, ``"symmetric"`` keeps the window,
            made symmetric (``|i - j| < w``); ``"none"`` drops it.

    The swap sets each chosen attention module's ``_attention_dir_override`` and, where
    some keys must stay masked (per-head swaps, local windows), adds a permanent
    TransformerLens hook on ``hook_attn_scores``, first in line so every other hook sees
    the masked scores. So ``model.reset_hooks()`` inside the context leaves the swap in
    place, and ``model.list_hooks()`` shows the mask hooks (see
    :mod:`rope_leak.interventions.hooks`). The model is restored exactly on exit (override
    flags and hooks), also on error.
    """
    if window not in WINDOW_MODES:
        raise ValueError(f"window={window!r} is not one of {WINDOW_MODES}.")
    chosen_heads = layer_heads(model, layers, heads)
    if is_bridge(model):  # TransformerBridge: swap the HF mask instead (same semantics)
        with bridge_bidirectional(model, heads=chosen_heads, window=window):
            yield model
        return

    chosen = sorted(chosen_heads)
    attns = [model.blocks[layer].attn for layer in chosen]
    saved = [attn._attention_dir_override for attn in attns]
    mask_hooks = []
    for layer, attn in zip(chosen, attns):
        local = getattr(attn, "attn_type", "global") == "local"
        kept_window = int(model.cfg.window_size) if local and window == "symmetric" else None
        causal_heads = [h for h in range(model.cfg.n_heads) if h not in chosen_heads[layer]]
        if kept_window is not None or causal_heads:
            mask_fn = partial(_mask_keys, window=kept_window, causal_heads=causal_heads)
            mask_hooks.append((act_name("attn_scores", layer),
                               lambda scores, hook, fn=mask_fn: fn(scores)))
    try:
        for attn in attns:
            attn._attention_dir_override = "bidirectional"
        with intervention_hooks(model, mask_hooks, prepend=True):
            yield model
    finally:
        for attn, old in zip(attns, saved):
            attn._attention_dir_override = old


@contextlib.contextmanager
def causal(model: HookedTransformer) -> Iterator[HookedTransformer]:
    """The model's own mask: a no-op context, so conditions can be written uniformly."""
    yield model


# TransformerBridge: the mask is a keyword argument of each HF attention module.

def _open_mask(like: Tensor | None, hidden: Tensor, window: int | None) -> Tensor:
    """Additive 4D mask ``[batch, 1, q, k]``: 0 where visible, ``finfo.min`` elsewhere."""
    dtype = like.dtype if isinstance(like, Tensor) and like.is_floating_point() else hidden.dtype
    batch, n = hidden.shape[0], hidden.shape[1]
    mask = torch.zeros(batch, 1, n, n, dtype=dtype, device=hidden.device)
    if window is not None:
        pos = torch.arange(n, device=hidden.device)
        outside = (pos[:, None] - pos[None, :]).abs() >= window
        mask = mask.masked_fill(outside, torch.finfo(dtype).min)
    return mask


def _replace_mask_hook(module, args, kwargs, window: int | None):
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if hidden is None:
        raise RuntimeError("cannot find hidden_states to size the bidirectional mask.")
    if kwargs.get("past_key_values") is not None and getattr(kwargs["past_key_values"], "get_seq_length", lambda: 0)():
        raise RuntimeError("bidirectional swap on a bridge does not support a KV cache.")
    kwargs = dict(kwargs)
    kwargs["attention_mask"] = _open_mask(kwargs.get("attention_mask"), hidden, window)
    return args, kwargs


@contextlib.contextmanager
def bridge_bidirectional(
    bridge: Any,
    layers: Iterable[int] | None = None,
    heads: Mapping[int, Iterable[int]] | None = None,
    window: str = "symmetric",
) -> Iterator[Any]:
    """The bridge counterpart of :func:`rope_leak.interventions.mask.bidirectional`
    (same arguments and semantics; restores the bridge on exit, also on error)."""
    if window not in WINDOW_MODES:
        raise ValueError(f"window={window!r} is not one of {WINDOW_MODES}.")
    n_heads = int(bridge.cfg.n_heads)
    if heads is not None:
        layer_heads = heads_by_layer(normalize_heads(heads, bridge))
    else:
        layer_heads = {l: list(range(n_heads)) for l in normalize_layers(layers, bridge)}
    kinds = layer_kinds(bridge)
    w = window_size(bridge)
    handles = []
    mask_hooks = []
    for layer, hs in layer_heads.items():
        causal_heads = [h for h in range(n_heads) if h not in hs]
        if causal_heads:
            fn = partial(_mask_keys, window=None, causal_heads=causal_heads)
            mask_hooks.append((act_name("attn_scores", layer), lambda scores, hook, fn=fn: fn(scores)))
    try:
        for layer in layer_heads:
            attn = bridge.blocks[layer].attn
            kept = w if kinds[layer] == "local" and window == "symmetric" else None
            # The mask is a keyword argument of the HF attention module, not an activation:
            # it can only be replaced by a plain torch pre-hook (not listed by list_hooks()).
            handles.append(attn.register_forward_pre_hook(
                partial(_replace_mask_hook, window=kept), with_kwargs=True, prepend=True))
        with intervention_hooks(bridge, mask_hooks, prepend=True):
            yield bridge
    finally:
        for handle in handles:
            handle.remove()
