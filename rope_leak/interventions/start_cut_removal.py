"""Remove the start cut from chosen heads: attend as if the sequence had a past.

The causal mask makes absolute position because the sequence starts: query ``i`` sees
only ``i + 1`` keys. The completed split measures, per head, the mass ``rho_i T_i`` that
the keys before position 0 would take (``T_i``: the imputed past relative to the
window's visible mass ``rho_i``). This intervention gives that mass back to a *virtual
past* whose value vector is the head's mean value ``v̄``:

    A^c_ij = A_ij / (1 + rho_i T_i)   (visible keys j <= i)
    z_i    = sum_j A^c_ij v_j + r_i v̄,   r_i = rho_i T_i / (1 + rho_i T_i)

With ``T = 0`` it is the identity. ``rho_i`` is read from the head's own pattern on the
window ``R_i = {max(1, i - w + 1), ..., i}`` at every forward pass.

>>> with remove_start_cut(model, {(3, 1): (T, v_mean)}, window=32):   # doctest: +SKIP
...     loss = model(tokens, return_type="loss")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rope_leak.heads import heads_by_layer, normalize_heads
from rope_leak.interventions.hooks import act_name, intervention_hooks


def window_mass(pattern: Float[Tensor, "batch head q k"], window: int) -> Float[Tensor, "batch head q"]:
    """``rho_i = sum_{j in R_i} A_ij`` with ``R_i = {max(1, i - w + 1), ..., i}`` (0 for row 0)."""
    n = pattern.shape[-1]
    cumulative = torch.nn.functional.pad(pattern.cumsum(-1), (1, 0))  # [..., q, k + 1]: sums over j < k
    i = torch.arange(n, device=pattern.device)
    start = torch.clamp(i - window + 1, min=1)
    upper = cumulative.gather(-1, (i + 1).expand(*pattern.shape[:-2], n)[..., None])[..., 0]
    lower = cumulative.gather(-1, start.expand(*pattern.shape[:-2], n)[..., None])[..., 0]
    return torch.where(i >= 1, upper - lower, torch.zeros((), dtype=pattern.dtype, device=pattern.device))


@contextlib.contextmanager
def remove_start_cut(
    model: HookedTransformer,
    heads: Mapping,
    *,
    window: int,
) -> Iterator[HookedTransformer]:
    """Remove the start cut from ``heads``: ``{head spec: (T, v_mean)}`` with ``T`` the
    imputed past ``[n]`` (at least as long as the prompts) and ``v_mean`` the head's mean
    value vector ``[d_head]``. Head specs go through :func:`rope_leak.heads.normalize_heads`.

    Permanent TransformerLens hooks on ``hook_pattern`` and ``hook_z`` of the layers
    concerned, removed on exit, also on error (:mod:`rope_leak.interventions.hooks`)."""
    table: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
    for spec, (past, v_mean) in heads.items():
        for head in normalize_heads(spec, model):
            table[head] = (torch.as_tensor(past), torch.as_tensor(v_mean))
    hooks = []
    for layer, chosen in heads_by_layer(table).items():
        index = torch.tensor(chosen, device=model.cfg.device)
        past = torch.stack([table[layer, h][0] for h in chosen]).to(model.cfg.device)  # [head, n]
        v_mean = torch.stack([table[layer, h][1] for h in chosen]).to(model.cfg.device)  # [head, d_head]
        missing: dict[str, Tensor] = {}

        def pattern_hook(pattern: Tensor, hook, index=index, past=past, missing=missing) -> Tensor:
            n = pattern.shape[-1]
            if past.shape[-1] < n:
                raise ValueError(f"the imputed past covers {past.shape[-1]} positions, the prompts have "
                                 f"{n}. Fix: fit the analysis on prompts at least as long.")
            chosen_pattern = pattern[:, index]
            moved = window_mass(chosen_pattern, window) * past[:, :n].to(pattern.dtype)  # rho_i T_i
            out = pattern.clone()
            out[:, index] = chosen_pattern / (1 + moved)[..., None]
            missing["r"] = moved / (1 + moved)  # [batch, head, q]
            return out

        def z_hook(z: Tensor, hook, index=index, v_mean=v_mean, missing=missing) -> Tensor:
            r = missing.pop("r")
            out = z.clone()
            out[:, :, index] = z[:, :, index] + r.transpose(1, 2)[..., None] * v_mean.to(z.dtype)
            return out

        hooks += [(act_name("pattern", layer), pattern_hook), (act_name("z", layer), z_hook)]
    with intervention_hooks(model, hooks):
        yield model


def mean_values(model: HookedTransformer, tokens: Tensor, batch_size: int = 8) -> Float[Tensor, "layer head d_head"]:
    """Each head's mean value vector over keys ``j >= 1`` of ``tokens`` (grouped-query
    models: the key-value head each query head reads)."""
    cfg = model.cfg
    repeats = cfg.n_heads // (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    total = torch.zeros((cfg.n_layers, cfg.n_heads, cfg.d_head), dtype=torch.float64, device=cfg.device)
    count = 0
    names = {act_name("v", layer): layer for layer in range(cfg.n_layers)}

    def hook(v: Tensor, hook) -> None:
        total[names[hook.name]] += torch.repeat_interleave(v[:, 1:].double().sum((0, 1)), repeats, dim=0)

    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size].to(cfg.device)
            model.run_with_hooks(batch, return_type=None, fwd_hooks=[(name, hook) for name in names])
            count += batch.shape[0] * (batch.shape[1] - 1)
    return (total / count).to(cfg.dtype)
