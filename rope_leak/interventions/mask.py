"""Swap the causal mask for a bidirectional one, in all layers, some layers or some heads.

TransformerLens 3.9 applies the causal (and local-window) mask inside each attention
module, before ``hook_attn_scores``, unless ``attn._attention_dir_override`` says
``"bidirectional"``. These context managers flip that switch and restore it on exit,
also when the body raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

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
    from rope_leak.models.bridge import bridge_bidirectional, is_bridge

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
