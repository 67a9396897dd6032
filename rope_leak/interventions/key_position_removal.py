"""Remove the absolute key effect from chosen heads' scores: the scores' part of the
completed split, as a forward pass can run it.

A head's scores are fitted by ``s_ij ~ a[i - j] + b[i] + c[j]``; ``c[j]`` is its absolute
key effect. Only part of it is identified: a constant in ``c`` is a per-query shift
(softmax ignores it) and a linear trend ``t j = t i - t (i - j)`` is a per-query shift
plus an offset effect. So :func:`identified_key_effect` removes both, and the
intervention subtracts what is left from the scores of keys ``j >= 1``; the causal
softmax is then taken again (TransformerLens applies it after ``hook_attn_scores``). A
zero key effect, or a purely linear one, leaves the model unchanged.

>>> with remove_key_positions(model, {(3, 1): c_hat}):   # doctest: +SKIP
...     loss = model(tokens, return_type="loss")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rope_leak.heads import heads_by_layer, normalize_heads
from rope_leak.interventions.hooks import act_name, intervention_hooks


def identified_key_effect(effect: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``effect[..., k]`` at key positions ``keys[k]`` minus its least-squares constant and
    linear trend in ``j`` (the part softmax and the offsets cannot absorb)."""
    keys = np.asarray(keys, dtype=float)
    design = np.stack([np.ones_like(keys), keys], 1)
    coef, *_ = np.linalg.lstsq(design, np.moveaxis(np.asarray(effect, dtype=float), -1, 0).reshape(len(keys), -1),
                               rcond=None)
    fitted = (design @ coef).reshape((len(keys),) + np.shape(effect)[:-1])
    return np.asarray(effect, dtype=float) - np.moveaxis(fitted, 0, -1)


@contextlib.contextmanager
def remove_key_positions(
    model: HookedTransformer,
    heads: Mapping,
) -> Iterator[HookedTransformer]:
    """Subtract ``{head spec: c}`` from the heads' scores, ``c`` ``[n]`` indexed by key
    position (entry 0, the sink, is never changed), for the duration of the context.

    Permanent TransformerLens hooks on ``hook_attn_scores`` (after the mask, before the
    softmax), removed on exit, also on error (:mod:`rope_leak.interventions.hooks`)."""
    table: dict[tuple[int, int], Tensor] = {}
    for spec, effect in heads.items():
        for head in normalize_heads(spec, model):
            table[head] = torch.as_tensor(np.asarray(effect, dtype=float))
    hooks = []
    for layer, chosen in heads_by_layer(table).items():
        index = torch.tensor(chosen, device=model.cfg.device)
        effect = torch.stack([table[layer, h] for h in chosen]).to(model.cfg.device)  # [head, n]
        effect[:, 0] = 0.0  # the sink column keeps its score

        def scores_hook(scores: Float[Tensor, "batch head q k"], hook, index=index, effect=effect) -> Tensor:
            n = scores.shape[-1]
            if effect.shape[-1] < n:
                raise ValueError(f"the key effect covers {effect.shape[-1]} keys, the prompts have {n}. "
                                 "Fix: fit the analysis on prompts at least as long.")
            out = scores.clone()
            out[:, index] = scores[:, index] - effect[:, None, :n].to(scores.dtype)
            return out

        hooks.append((act_name("attn_scores", layer), scores_hook))
    with intervention_hooks(model, hooks):
        yield model
