"""Does the model use it? Effects of a head's absolute position on the next-token loss.

The completed split gives each head two counterfactuals a forward pass can run:

* **start cut removed** (the mask's part, :func:`~rope_leak.interventions.start_cut_removal.remove_start_cut`):
  the head attends as if the sequence had a past, whose mass ``rho_i T_i`` goes to a
  virtual key holding the head's mean value;
* **key positions removed** (the scores' part,
  :func:`~rope_leak.interventions.key_position_removal.remove_key_positions`): the head's
  identified absolute key effect is subtracted from its scores.

Both take their fitted quantities from an :class:`~rope_leak.analyses.analysis.Analysis`
(``T`` from its start-cut profile, the key effect from its ``scores`` fits; the mean
values from its prompts) and are run on *held-out* prompts. The effect is the change in
mean next-token loss (nats), over all predictions and at early queries (``i < 32``),
with t intervals over prompt buckets.

>>> effects = loss_effects(model, analysis, fit_tokens, heldout_tokens)   # doctest: +SKIP
>>> effects.layer_table("start_cut_removed")                               # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats as scipy_stats
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from rope_leak.display import Displayable
from rope_leak.fits.profiles import gauged_coefficients, per_prompt_xty
from rope_leak.fits.start_cut import imputed_past, mean_profile
from rope_leak.heads import head_label, normalize_heads
from rope_leak.interventions.key_position_removal import identified_key_effect, remove_key_positions
from rope_leak.interventions.start_cut_removal import mean_values, remove_start_cut

INTERVENTIONS = ("start_cut_removed", "key_positions_removed")
EARLY_QUERIES = 32
MAX_BUCKETS = 16
TOP_HEADS = 10


@dataclass
class FittedRemovals:
    """What the two interventions need, per head ``[layer, head, ...]``."""

    window: int
    past: np.ndarray  # [layer, head, n]: T_i, the imputed past relative to the window
    value_mean: Tensor  # [layer, head, d_head]
    key_effect: np.ndarray  # [layer, head, n]: identified absolute key effect (0 at key 0)

    def start_cut(self, heads) -> dict:
        return {(l, h): (self.past[l, h], self.value_mean[l, h]) for l, h in heads}

    def key_positions(self, heads) -> dict:
        return {(l, h): self.key_effect[l, h] for l, h in heads}


def fitted_removals(model: HookedTransformer, analysis, value_tokens: Tensor, batch_size: int = 8) -> FittedRemovals:
    """The interventions' quantities from ``analysis`` (fitted on ``value_tokens``' run)."""
    causal = analysis.statistics.conditions["causal"]
    if causal.start_cut is None:
        raise ValueError("the analysis kept no start-cut statistics (prompts shorter than the window). "
                         "Fix: analyse prompts of at least w + 2 tokens.")
    if "scores" not in causal.targets:
        raise ValueError("the analysis has no scores statistics. Fix: run analyze (it keeps them).")
    cut = causal.start_cut
    past = imputed_past(mean_profile(cut), cut.window)
    scores = causal.targets["scores"]
    design = scores.design
    _, _, c = gauged_coefficients(design, per_prompt_xty(scores))
    effect = np.zeros(past.shape)
    effect[..., design.keys] = identified_key_effect(c, design.keys)
    effect[..., 0] = 0.0
    return FittedRemovals(cut.window, past, mean_values(model, value_tokens, batch_size), effect)


def per_token_loss(model: HookedTransformer, tokens: Tensor, batch_size: int) -> Tensor:
    """``[prompt, pos - 1]`` next-token losses (float64)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size].to(model.cfg.device)
            out.append(model(batch, return_type="loss", loss_per_token=True).double().cpu())
    return torch.cat(out)


def _interval(per_prompt: np.ndarray, level: float) -> tuple[float, float, float]:
    """Mean over prompt buckets with a t interval (NaN bounds: fewer than two buckets)."""
    buckets = min(MAX_BUCKETS, len(per_prompt))
    means = np.array([per_prompt[g::buckets].mean() for g in range(buckets)])
    estimate = float(per_prompt.mean())
    if buckets < 2:
        return estimate, float("nan"), float("nan")
    half = float(scipy_stats.t.ppf((1 + level) / 2, buckets - 1) * means.std(ddof=1) / np.sqrt(buckets))
    return estimate, estimate - half, estimate + half


@dataclass(repr=False)
class LossEffects(Displayable):
    """Effects on the held-out next-token loss; :attr:`table` has one row per unit
    (a layer's heads together, or one head), intervention and query range."""

    table: pd.DataFrame
    baseline_loss: float
    baseline_loss_early: float
    n_prompts: int
    level: float = 0.95

    def _display_items(self):
        return [("held-out prompts", self.n_prompts), ("baseline loss", round(self.baseline_loss, 4)),
                ("layers", int((self.table["scope"] == "layer").sum() // (2 * len(INTERVENTIONS)))),
                ("heads", int((self.table["scope"] == "head").sum() // (2 * len(INTERVENTIONS))))]

    def layer_table(self, intervention: str = "start_cut_removed", queries: str = "all") -> pd.DataFrame:
        """Per layer (its heads together): effect with CI, one row per layer."""
        rows = self._rows("layer", intervention, queries)
        return rows[["layer", "effect_nats", "ci_low", "ci_high"]].set_index("layer")

    def head_table(self, intervention: str = "start_cut_removed", queries: str = "all") -> pd.DataFrame:
        """``[layer, head]`` effects of the heads run alone (NaN: not run), as in
        ``transformer_lens.patching``."""
        rows = self._rows("head", intervention, queries)
        return rows.pivot(index="layer", columns="head", values="effect_nats")

    def _rows(self, scope: str, intervention: str, queries: str) -> pd.DataFrame:
        if intervention not in INTERVENTIONS:
            raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {intervention!r}.")
        if queries not in ("all", "early"):
            raise ValueError(f"queries must be 'all' or 'early', got {queries!r}.")
        t = self.table
        return t[(t["scope"] == scope) & (t["intervention"] == intervention) & (t["queries"] == queries)]


def default_heads(analysis, k: int = TOP_HEADS) -> list[tuple[int, int]]:
    """The top ``k`` heads by debiased ``L_total`` and by each part of the completed split
    (its absolute-position sum of squares credited to the start cut, and to the scores)."""
    heads = analysis.heads()
    chosen = set(map(tuple, heads.nlargest(k, "L_total_debiased")[["layer", "head"]].to_numpy()))
    split = analysis.completed_split()
    if split is not None:
        keep = split.keep
        for values in (split.mask_inner, split.total - split.mask_inner):
            ranked = np.argsort(-np.where(keep, values, -np.inf), axis=None)[:k]
            chosen |= {tuple(np.unravel_index(i, values.shape)) for i in ranked if keep.flat[i]}
    return sorted((int(l), int(h)) for l, h in chosen)


def loss_effects(
    model: HookedTransformer,
    analysis,
    value_tokens: Tensor,
    heldout_tokens: Tensor,
    *,
    heads=None,
    layers: bool = True,
    batch_size: int = 8,
    level: float = 0.95,
    progress: bool = True,
) -> LossEffects:
    """Effects of both interventions on the loss of ``heldout_tokens``: for every layer
    (its heads together, ``layers=True``) and for each of ``heads`` alone (default:
    :func:`default_heads`; ``[]``: none). ``value_tokens``: prompts the analysis was fitted
    on (the heads' mean values come from them, never from the held-out prompts)."""
    if len(heldout_tokens) < 2:
        raise ValueError("effects need at least 2 held-out prompts for an interval. Fix: hold out "
                         "16 prompts (--heldout 16).")
    n_fit = analysis.statistics.conditions["causal"].targets["scores"].design.n_tokens
    if heldout_tokens.shape[1] > n_fit:
        raise ValueError(f"held-out prompts of {heldout_tokens.shape[1]} tokens are longer than the "
                         f"analysis' {n_fit}. Fix: hold out prompts of at most {n_fit} tokens.")
    fitted = fitted_removals(model, analysis, value_tokens, batch_size)
    chosen = default_heads(analysis) if heads is None else (normalize_heads(heads, model) if heads else [])
    units = ([(f"L{l}", "layer", l, -1, [(l, h) for h in range(model.cfg.n_heads)])
              for l in range(model.cfg.n_layers)] if layers else [])
    units += [(head_label(l, h), "head", l, h, [(l, h)]) for l, h in chosen]
    baseline = per_token_loss(model, heldout_tokens, batch_size)
    early = min(EARLY_QUERIES, baseline.shape[1])
    rows = []
    bar = tqdm(total=len(units) * len(INTERVENTIONS), desc="loss effects", unit="pass", disable=not progress)
    with bar:
        for label, scope, layer, head, unit_heads in units:
            for intervention in INTERVENTIONS:
                context = (remove_start_cut(model, fitted.start_cut(unit_heads), window=fitted.window)
                           if intervention == "start_cut_removed"
                           else remove_key_positions(model, fitted.key_positions(unit_heads)))
                with context:
                    changed = per_token_loss(model, heldout_tokens, batch_size)
                diff = (changed - baseline).numpy()
                for queries, values in (("all", diff.mean(1)), ("early", diff[:, :early].mean(1))):
                    estimate, low, high = _interval(values, level)
                    rows.append({"scope": scope, "label": label, "layer": layer, "head": head,
                                 "intervention": intervention, "queries": queries, "effect_nats": estimate,
                                 "ci_low": low, "ci_high": high, "n_prompts": len(heldout_tokens)})
                bar.update()
    table = pd.DataFrame(rows, columns=["scope", "label", "layer", "head", "intervention", "queries",
                                        "effect_nats", "ci_low", "ci_high", "n_prompts"])
    return LossEffects(table, float(baseline.mean()), float(baseline[:, :early].mean()), len(heldout_tokens), level)
