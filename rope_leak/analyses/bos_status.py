"""Whether position 0 holds a BOS token, and what follows for the position-0 stream.

Under the causal mask position 0 attends only to itself, so its residual stream at every
layer is a function of the token at position 0 alone. With a BOS at position 0 of every
prompt that stream is *identical across prompts* (cross-prompt spread exactly 0); a model
that prepends no BOS puts each prompt's first ordinary token there, and the stream is
*token-dependent*: it varies across prompts with their first token.

:func:`bos_status` states which case a run is in and measures the position-0 stream against
the position-0 token, on the prompts themselves:

* ``cross_prompt_std``: spread over all prompts, per depth;
* ``within_token_std``: pooled spread among prompts that share their position-0 token
  (groups of one prompt carry no information about it); None ("not estimable") when no
  token is held by two prompts;
* ``between_token_std``: spread of the per-token means across tokens; None when all
  prompts share one token.

Spreads are the root-mean over the model dimension of per-coordinate standard deviations
(``ddof=1``), the convention of the analysis' position-0 profile. Position 0 cannot see
later tokens under the causal mask, so a short prefix of each prompt (``prefix`` tokens, 2)
gives exactly the stream of the full-length run; the cost is ``prefix / n`` of one pass.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from rope_leak.backends import bos_token_id
from rope_leak.interventions.position_zero_patch import record_position_zero
from rope_leak.output.bos_text import NOT_ESTIMABLE, bos_label, spread_text  # noqa: F401 (re-exported)


def special_token_ids(model: HookedTransformer) -> dict[str, int]:
    """Ids the model or its tokenizer uses as BOS / EOS: ``{"bos": id, "eos": id, ...}``
    (``bos`` is rope_leak's BOS id, see :func:`rope_leak.backends.bos_token_id`;
    ``tokenizer_bos`` / ``tokenizer_eos`` the tokenizer's own)."""
    out: dict[str, int] = {}
    bos_id = bos_token_id(model)
    if bos_id is not None:
        out["bos"] = int(bos_id)
    tokenizer = getattr(model, "tokenizer", None)
    for name in ("bos", "eos"):
        value = getattr(tokenizer, f"{name}_token_id", None) if tokenizer is not None else None
        if isinstance(value, int):
            out[f"tokenizer_{name}"] = int(value)
    return out


def _spreads(resid: np.ndarray, first: np.ndarray) -> dict:
    """``resid`` ``[prompt, depth, d_model]`` float64, ``first`` ``[prompt]`` tokens."""
    tokens, inverse, counts = np.unique(first, return_inverse=True, return_counts=True)
    n_depths = resid.shape[1]
    cross = np.sqrt(resid.var(0, ddof=1).mean(-1)) if len(resid) > 1 else np.full(n_depths, np.nan)
    within = between = None
    repeated = counts >= 2
    if repeated.any():
        sumsq, dof = np.zeros(resid.shape[1:]), 0
        for g in np.nonzero(repeated)[0]:
            group = resid[inverse == g]
            sumsq += ((group - group.mean(0)) ** 2).sum(0)
            dof += len(group) - 1
        within = np.sqrt((sumsq / dof).mean(-1))
    if len(tokens) >= 2:
        means = np.stack([resid[inverse == g].mean(0) for g in range(len(tokens))])
        between = np.sqrt(means.var(0, ddof=1).mean(-1))
    as_list = lambda a: None if a is None else [float(v) for v in a]  # noqa: E731
    return {
        "cross_prompt_std": as_list(cross),
        "within_token_std": as_list(within),
        "between_token_std": as_list(between),
        "n_tokens_at_position_zero": int(len(tokens)),
        "n_tokens_repeated": int(repeated.sum()),
        "prompts_in_repeated_tokens": int(counts[repeated].sum()),
        "max_cross_prompt_std": None if len(resid) < 2 else float(np.max(cross)),
        "max_within_token_std": None if within is None else float(np.max(within)),
        "max_between_token_std": None if between is None else float(np.max(between)),
    }


def bos_status(model: HookedTransformer, tokens: Tensor, *, prefix: int = 2,
               batch_size: int = 64, measure: bool = True) -> dict:
    """BOS facts of a run on ``tokens`` (``[prompt, pos]``) and, with ``measure``, the
    position-0 spread against the position-0 token (see the module docstring).

    Returns a JSON-ready dict: ``model_prepends_bos`` (``cfg.default_prepend_bos``),
    ``bos_token_id``, ``prompts_with_bos_at_position_zero``, ``position_zero`` (``"bos"``,
    ``"ordinary tokens"`` or ``"mixed"``), ``implication`` (one sentence), and the spreads.
    """
    specials = special_token_ids(model)
    prepends = bool(getattr(model.cfg, "default_prepend_bos", False))
    bos_id = specials.get("bos") if prepends else None
    first = tokens[:, 0].cpu().numpy()
    n_prompts = int(len(first))
    with_bos = int((first == bos_id).sum()) if bos_id is not None else 0
    kind = "bos" if with_bos == n_prompts and n_prompts else ("ordinary tokens" if with_bos == 0 else "mixed")
    distinct = int(len(np.unique(first)))
    if kind == "bos":
        implication = (f"BOS (id {bos_id}) at position 0 of every prompt: under the causal mask the "
                       "position-0 stream is the same for every prompt (cross-prompt spread 0), so sinks "
                       "anchored there are constant across inputs.")
    elif kind == "ordinary tokens":
        why = "the model prepends no BOS" if not prepends else "the prompts lack the model's BOS"
        implication = (f"No BOS at position 0 ({why}): position 0 holds each prompt's first token "
                       f"({distinct} distinct over {n_prompts} prompts), so the position-0 stream and the "
                       "sinks anchored there vary with that token across prompts.")
    else:
        implication = (f"BOS at position 0 of {with_bos} of {n_prompts} prompts only: the position-0 "
                       "stream is shared by the prompts with BOS and token-dependent for the others.")
    out = {
        "model_prepends_bos": prepends,
        "bos_token_id": bos_id,
        "special_token_ids": specials,
        "position_zero": kind,
        "prompts_with_bos_at_position_zero": with_bos,
        "n_prompts": n_prompts,
        "implication": implication,
        "measured": False,
    }
    if measure and n_prompts:
        k = int(min(max(prefix, 1), tokens.shape[1]))
        rows = [record_position_zero(model, tokens[s:s + batch_size, :k])
                for s in range(0, n_prompts, batch_size)]
        resid = torch.cat(rows, 1).permute(1, 0, 2).double().numpy()  # [prompt, depth, d]
        out.update(_spreads(resid, first), measured=True, prefix_tokens=k, condition="causal")
    return out
