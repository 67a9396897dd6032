"""Helpers for the notebooks: small computations that show one step of the argument or
one head at a time (the streaming analysis itself lives in :mod:`rope_leak.analyses.analysis`).

* :func:`notebook_settings` — model and corpus size of a notebook, from environment
  variables (``ROPE_LEAK_NOTEBOOK_SMALL=1`` gives a tiny model and tiny prompt counts,
  which is how the tests execute the notebooks).
* :func:`diagonal_spread` / :func:`repeated_token_scores` — RoPE logits depend on
  ``i - j`` only.
* :func:`relative_logits_pattern` — a causal softmax of purely relative logits is not
  relative: the denominator depends on the query position.
* :func:`head_patterns`, :func:`head_cell_maps` — one head's mean pattern and its fits.
* :func:`position_zero_patch` — what replacing position 0 does to one head.
* :func:`bos_intervention_table` — the BOS-replacement table (``docs/method.md``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from rope_leak.analyses.bos_interventions import bos_interventions as run_bos_interventions
from rope_leak.backends.requirements import require_rope
from rope_leak.engine.pairs import PairDesign
from rope_leak.fits.shares import cell_means, fitted_cells
from rope_leak.heads import normalize_head, normalize_layers
from rope_leak.interventions.hooks import act_name
from rope_leak.interventions.mask import bidirectional
from rope_leak.interventions.position_zero import replace_position_zero

CONDITIONS = ("causal", "bidirectional")


def _check_condition(condition: str) -> str:
    if condition not in CONDITIONS:
        raise ValueError(f"condition={condition!r} is not one of {CONDITIONS}. Fix: pass "
                         "'causal' (the model's own mask) or 'bidirectional' (the ablation).")
    return condition


def _one_layer(model, layer) -> int:
    layers = normalize_layers(layer, model)
    if len(layers) != 1:
        raise ValueError(f"layer={layer!r} names {len(layers)} layers; pass one layer.")
    return layers[0]

SMALL_ENV_VAR = "ROPE_LEAK_NOTEBOOK_SMALL"


@dataclass(frozen=True)
class NotebookSettings:
    """What a notebook runs on. ``small`` = the quick configuration the tests use."""

    small: bool
    model: str  # "tiny" or a name for rope_leak.backends.load_model
    n_prompts: int
    n_tokens: int
    real_model: bool  # whether the notebook also runs its real-model part

    def to_dict(self) -> dict:
        return asdict(self)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def notebook_settings(
    default_prompts: int = 64,
    default_tokens: int = 256,
    default_model: str = "smollm2-135m",
) -> NotebookSettings:
    """Settings from the environment.

    ``ROPE_LEAK_NOTEBOOK_SMALL=1``: tiny random model only, 8 prompts x 32 tokens.
    Otherwise the real model with ``default_prompts`` x ``default_tokens``, overridable
    by ``ROPE_LEAK_NOTEBOOK_MODEL``, ``ROPE_LEAK_NOTEBOOK_PROMPTS`` and
    ``ROPE_LEAK_NOTEBOOK_TOKENS`` (e.g. 4 x 32 for a quick look on a laptop).
    """
    small = _env_flag(SMALL_ENV_VAR)
    model = os.environ.get("ROPE_LEAK_NOTEBOOK_MODEL", "tiny" if small else default_model)
    prompts = int(os.environ.get("ROPE_LEAK_NOTEBOOK_PROMPTS", 8 if small else default_prompts))
    tokens = int(os.environ.get("ROPE_LEAK_NOTEBOOK_TOKENS", 32 if small else default_tokens))
    if prompts < 4:
        raise ValueError(f"ROPE_LEAK_NOTEBOOK_PROMPTS={prompts}: cross-fitting needs at least 4 prompts.")
    return NotebookSettings(small=small, model=model, n_prompts=prompts, n_tokens=tokens,
                            real_model=model != "tiny")


# -- step 1: RoPE logits are relative ------------------------------------------------------
def diagonal_spread(matrix: Float[Tensor, "q k"] | np.ndarray) -> np.ndarray:
    """Largest spread (max - min) along each diagonal ``i - j = d >= 0`` of the lower
    triangle: zero for a matrix that depends on ``i - j`` only."""
    m = np.asarray(matrix, dtype=np.float64)
    return np.array([np.ptp(np.diagonal(m, offset=-d)) for d in range(m.shape[0])])


def rotated_dot_products(model: HookedTransformer, n: int = 32, layer: int = 0, seed: int = 0) -> np.ndarray:
    """``q_i . k_j`` for ONE fixed random query and key vector placed at every position and
    rotated by the model's own RoPE (``attn.apply_rotary``): ``[n, n]``."""
    require_rope(model, "rotated_dot_products")
    attn = model.blocks[_one_layer(model, layer)].attn
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(model.cfg.d_head, generator=g)
    k = torch.randn(model.cfg.d_head, generator=g)
    with torch.no_grad():
        rq = attn.apply_rotary(q.expand(1, n, 1, -1).to(model.cfg.dtype).contiguous())[0, :, 0]
        rk = attn.apply_rotary(k.expand(1, n, 1, -1).to(model.cfg.dtype).contiguous())[0, :, 0]
    return (rq.double() @ rk.double().T).numpy()


def repeated_token_scores(
    model: HookedTransformer, token_id: int, n: int = 32, layer: int = 0, head: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Layer-``layer`` scores and pattern of one head on a prompt repeating one token.

    With the same token everywhere the layer-0 residual stream is the same at every
    position, so the scores depend on ``i - j`` only; the pattern does not (causal
    denominator). Returns ``(scores, pattern)``, ``[n, n]``, masked entries as nan/0.
    """
    require_rope(model, "repeated_token_scores")
    layer, head = normalize_head((_one_layer(model, layer), head), model)
    if not 0 <= int(token_id) < model.cfg.d_vocab:
        raise ValueError(f"token_id={token_id} is outside the vocabulary 0..{model.cfg.d_vocab - 1}.")
    tokens = torch.full((1, n), int(token_id), dtype=torch.long)
    names = [act_name("attn_scores", layer), act_name("pattern", layer)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    scores = cache[names[0]][0, head].double().numpy().copy()
    scores[~np.tril(np.ones((n, n), dtype=bool))] = np.nan
    return scores, cache[names[1]][0, head].double().numpy()


# -- step 2: the causal denominator makes patterns absolute --------------------------------
def relative_logits_pattern(logits_by_offset: np.ndarray, n: int, mask: str = "causal") -> np.ndarray:
    """Softmax pattern of the purely relative logits ``s_ij = f(i - j)``.

    ``logits_by_offset[d + n - 1] = f(d)`` for ``d = -(n-1) .. n-1``. Under the causal mask
    query ``i`` normalises over ``j <= i``, so ``A_ij`` depends on ``i`` as well as ``i - j``.
    """
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    s = logits_by_offset[i - j + n - 1].astype(np.float64)
    if mask == "causal":
        s = np.where(j <= i, s, -np.inf)
    s = s - s.max(1, keepdims=True)
    a = np.exp(s)
    return a / a.sum(1, keepdims=True)


def softmax_denominator(logits_by_offset: np.ndarray, n: int) -> np.ndarray:
    """``log Z_i = log sum_{j <= i} exp f(i - j)`` per query ``i`` (causal)."""
    return np.array([np.logaddexp.reduce(logits_by_offset[n - 1: n + i][::-1]) for i in range(n)])


# -- one head --------------------------------------------------------------------------------
def head_patterns(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    condition: str = "causal",
) -> Float[Tensor, "head q k"]:
    """Mean attention pattern over prompts of every head of ``layer`` (an int or ``"L3"``)
    under ``condition`` (``"causal"`` or ``"bidirectional"``): ``[head, q, k]``."""
    require_rope(model, "head_patterns")
    layer = _one_layer(model, layer)
    _check_condition(condition)
    name = act_name("pattern", layer)
    ctx = bidirectional(model) if condition == "bidirectional" else _nullcontext()
    with torch.no_grad(), ctx:
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    return cache[name].mean(0)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def cells_to_grid(design: PairDesign, values: np.ndarray) -> np.ndarray:
    """Scored-cell values ``[..., cell]`` to a query x key grid ``[..., n, n]`` (nan elsewhere)."""
    grid = np.full(values.shape[:-1] + (design.n_tokens, design.n_tokens), np.nan)
    queries, keys = design.cells
    grid[..., queries, keys] = values
    return grid


def head_cell_maps(analysis, layer, head: int | None = None, condition: str = "causal",
                   target: str | None = None) -> dict:
    """Observed cell means and the in-sample fits of ``M_rel`` and ``M_abs`` of one head,
    as ``[n, n]`` query x key grids, plus the residuals the heat maps show.
    ``layer, head`` as in :meth:`rope_leak.Analysis.head` (``head_cell_maps(a, "L3H1")`` works too)."""
    if head is None:
        layer, head = normalize_head(layer, (analysis.n_layers, analysis.n_heads))
    else:
        layer, head = normalize_head((layer, head), (analysis.n_layers, analysis.n_heads))
    _check_condition(condition)
    target = target or analysis.target
    if target not in analysis.targets:
        raise ValueError(f"target={target!r} is not one of {analysis.targets}.")
    stats = analysis.statistics.conditions[condition].targets[target]
    observed = cell_means(stats)[layer, head]
    rel = fitted_cells(stats, "rel")[layer, head]
    abs_ = fitted_cells(stats, "abs")[layer, head]
    grid = lambda v: cells_to_grid(stats.design, v)  # noqa: E731
    return {
        "observed": grid(observed),
        "fit_rel": grid(rel),
        "fit_abs": grid(abs_),
        "resid_rel": grid(observed - rel),
        "resid_abs": grid(observed - abs_),
        "absolute_part": grid(abs_ - rel),
        "target": target,
        "condition": condition,
    }


def position_zero_patch(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    layer,
    head: int | None = None,
    replacement: str = "token",
    token_id: int | None = None,
) -> dict:
    """What replacing the embedding at position 0 does to one head.

    Changing the position-0 embedding changes only position 0's residual stream
    directly (it attends to itself alone), so this is the same as patching the position-0
    residual stream from a run with another token there. Returns the mean patterns
    before/after (``[n, n]``), the sink scores, and the relative change of the head's
    output ``z`` at positions ``>= 1`` (``||z' - z|| / ||z||``, averaged over prompts and
    positions). ``layer, head`` may also be given as one spec: ``position_zero_patch(m, t, "L3H1")``.
    """
    require_rope(model, "position_zero_patch")
    layer, head = normalize_head(layer if head is None else (layer, head), model)
    names = [act_name("pattern", layer), act_name("z", layer)]
    keep = lambda n: n in names  # noqa: E731
    with torch.no_grad():
        _, base = model.run_with_cache(tokens, names_filter=keep)
        with replace_position_zero(model, replacement, token_id=token_id):
            _, patched = model.run_with_cache(tokens, names_filter=keep)
    pat0, pat1 = base[names[0]][:, head], patched[names[0]][:, head]
    z0, z1 = base[names[1]][:, 1:, head], patched[names[1]][:, 1:, head]
    change = ((z1 - z0).norm(dim=-1) / z0.norm(dim=-1).clamp_min(1e-12)).mean().item()
    return {
        "pattern_before": pat0.mean(0).double().numpy(),
        "pattern_after": pat1.mean(0).double().numpy(),
        "sink_score_before": pat0[:, 1:, 0].mean().item(),
        "sink_score_after": pat1[:, 1:, 0].mean().item(),
        "output_change": change,
    }


# -- BOS interventions --------------------------------------------------------------------------
def bos_intervention_table(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    *,
    early_queries: int = 32,
    target: str = "pattern",
    batch_size: int = 8,
    progress: bool = True,
    **kwargs,
) -> pd.DataFrame:
    """The position-0 (BOS) interventions of :func:`rope_leak.analyses.bos_interventions.bos_interventions`
    as a table: per replacement, the scores' absolute-position sum of squares and
    ``L_total`` at queries ``i < early_queries`` with bootstrap CIs, and their ratios to
    the baseline, "not estimable" (NaN) where the baseline's CI includes 0. Other keyword
    arguments go to that function."""
    require_rope(model, "bos_intervention_table")
    bos_result = run_bos_interventions(model, tokens, early_queries=early_queries, target=target,
                                       batch_size=batch_size, progress=progress, **kwargs)
    return bos_result.table()


