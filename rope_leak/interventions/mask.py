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

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

WINDOW_MODES = ("symmetric", "none")


def _check_layers(model: HookedTransformer, layers: Iterable[int] | None) -> list[int]:
    n_layers = model.cfg.n_layers
    if layers is None:
        return list(range(n_layers))
    chosen = sorted({int(layer) for layer in layers})
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(
            f"layers {bad} do not exist: the model has layers 0..{n_layers - 1}. "
            "Fix: pass layer indices in that range (or None for all layers)."
        )
    return chosen


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


@contextlib.contextmanager
def bidirectional(
    model: HookedTransformer,
    layers: Iterable[int] | None = None,
    heads: Mapping[int, Iterable[int]] | None = None,
    window: str = "symmetric",
) -> Iterator[HookedTransformer]:
    """Run attention bidirectionally (every key visible to every query).

    Args:
        layers: layers to swap (default: all). Ignored when ``heads`` is given.
        heads: ``{layer: [head, ...]}`` to swap single heads only; the other heads of
            those layers keep the causal mask.
        window: for sliding-window (local) layers, ``"symmetric"`` keeps the window,
            made symmetric (``|i - j| < w``); ``"none"`` drops it.

    The model is restored exactly on exit (override flags and hooks), also on error.
    """
    if window not in WINDOW_MODES:
        raise ValueError(f"window={window!r} is not one of {WINDOW_MODES}.")
    from rope_leak.models.bridge import bridge_bidirectional, is_bridge

    if is_bridge(model):  # TransformerBridge: swap the HF mask instead (same semantics)
        with bridge_bidirectional(model, layers=layers, heads=heads, window=window):
            yield model
        return
    if heads is not None:
        layer_heads = {layer: sorted({int(h) for h in hs}) for layer, hs in heads.items()}
        chosen = _check_layers(model, layer_heads)
        for layer, hs in layer_heads.items():
            bad = [h for h in hs if not 0 <= h < model.cfg.n_heads]
            if bad:
                raise ValueError(
                    f"heads {bad} of layer {layer} do not exist: the model has heads "
                    f"0..{model.cfg.n_heads - 1}."
                )
    else:
        chosen = _check_layers(model, layers)
        layer_heads = {layer: list(range(model.cfg.n_heads)) for layer in chosen}

    attns = [model.blocks[layer].attn for layer in chosen]
    saved = [attn._attention_dir_override for attn in attns]
    handles = []
    try:
        for layer, attn in zip(chosen, attns):
            attn._attention_dir_override = "bidirectional"
            local = getattr(attn, "attn_type", "global") == "local"
            kept_window = int(model.cfg.window_size) if local and window == "symmetric" else None
            causal_heads = [h for h in range(model.cfg.n_heads) if h not in layer_heads[layer]]
            if kept_window is not None or causal_heads:
                mask_fn = partial(_mask_keys, window=kept_window, causal_heads=causal_heads)
                # A plain torch hook (not HookPoint.add_hook) so model.reset_hooks() inside
                # the context cannot strip the mask half-way; prepended so that every
                # user hook on hook_attn_scores sees the masked scores.
                handles.append(attn.hook_attn_scores.register_forward_hook(
                    lambda _module, _inputs, output, fn=mask_fn: fn(output), prepend=True
                ))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for attn, old in zip(attns, saved):
            attn._attention_dir_override = old


@contextlib.contextmanager
def causal(model: HookedTransformer) -> Iterator[HookedTransformer]:
    """The model's own mask: a no-op context, so conditions can be written uniformly."""
    yield model
