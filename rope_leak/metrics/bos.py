"""BOS interventions on the decomposition (DESIGN.md §2, "BOS interventions").

For each replacement of what enters at position 0 the share of every head is refitted
under the causal mask (``L_total``) and under the bidirectional ablation (``L_resid``),
on the same prompts and early-query pairs (default ``PairSpec(max_query=32)``):

* ``token``   — embedding of another token (``token_id``; default: the most common token
  of the prompts' positions ``>= 1``, see :func:`default_replacement_token`);
* ``mean``    — the mean token embedding;
* ``zeros``   — a zero vector;
* ``noise``   — Gaussian noise rescaled to the norm of the embedding it replaces;
* ``replace_all`` — position 0's residual stream at the input of *every* layer pinned to
  the replacement token's causal trajectory
  (:func:`rope_leak.interventions.position_zero_patch.replace_all_position_zero`): every
  position-0-derived input (key 0, value 0 and position 0's own stream, in every layer)
  is changed at once. Under the causal mask it coincides with ``token`` (position 0 is a
  closed system); under the bidirectional ablation it also cuts what position 0 would
  otherwise absorb from later positions.

Reported, per replacement, aggregated over all heads by ``aggregate`` (default the mean,
so the fractions are ratios of means, as in :class:`~rope_leak.metrics.decomposition.Decomposition`;
``"median"`` resists heads whose cross-fitted R² explodes because a replacement leaves
their pattern nearly constant):

* ``resid_removed_fraction = 1 - L_resid(replacement) / L_resid(baseline)``
* ``leakage_relative = L_total(replacement) / L_total(baseline)``

with bootstrap CIs from a paired bootstrap over prompt buckets (the same resampled prompts
for every condition; buckets resampled within each cross-fitting fold; pivotal "basic"
intervals by default, see :mod:`rope_leak.stats.bootstrap`).

Shares: ``estimator="debiased"`` (default; :func:`rope_leak.stats.debias.debiased_share`,
unbiased numerator) or ``"crossfit"`` (:func:`rope_leak.metrics.shares.fit_shares`).
Small samples: cross-fitted shares are biased low (DESIGN.md §2) — with 8 SmolLM2 prompts
the cross-fitted baseline ``L_resid`` came out negative — and with few prompts per fold
the ratios above are unstable either way. Use P >= 64 for numbers to report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
from torch import Tensor
from transformer_lens import HookedTransformer

from rope_leak.engine.pairs import PairSpec
from rope_leak.engine.run import run_statistics
from rope_leak.engine.statistics import RunStatistics
from rope_leak.interventions.mask import bidirectional
from rope_leak.interventions.position_zero import replace_position_zero
from rope_leak.interventions.position_zero_patch import replace_all_position_zero
from rope_leak.metrics.split import SPLIT_INPUTS, renormalisation_split
from rope_leak.stats.bootstrap import bootstrap_statistic
from rope_leak.stats.projection import BucketProjection

ESTIMATORS = ("debiased", "crossfit")

REPLACEMENTS = ("token", "mean", "zeros", "noise", "replace_all")
EARLY_QUERIES = PairSpec(max_query=32)


def default_replacement_token(tokens: Tensor) -> int:
    """The most common token at positions ``>= 1`` (smallest id on ties)."""
    ids = tokens[:, 1:].reshape(-1).cpu().numpy()
    values, counts = np.unique(ids, return_counts=True)
    return int(values[np.argmax(counts)])


def _replacement_condition(replacement: str, token_id: int, seed: int):
    if replacement == "replace_all":
        return partial(replace_all_position_zero, token_id=token_id)
    if replacement == "token":
        return partial(replace_position_zero, replacement="token", token_id=token_id)
    return partial(replace_position_zero, replacement=replacement, seed=seed)


def _with_mask(replacement_condition, mask: bool):
    @contextlib.contextmanager
    def condition(model):
        with contextlib.ExitStack() as stack:
            if replacement_condition is not None:
                stack.enter_context(replacement_condition(model))
            if mask:
                stack.enter_context(bidirectional(model))
            yield model

    return condition


@dataclass
class BosInterventions:
    """Statistics of every (replacement, mask) condition and the table derived from them."""

    statistics: RunStatistics
    replacements: list[str]
    token_id: int
    target: str = "pattern"
    n_boot: int = 200
    seed: int = 0
    aggregate: str = "mean"
    estimator: str = "debiased"
    shares: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> [layer, head]

    def __post_init__(self) -> None:
        if self.aggregate not in ("mean", "median"):
            raise ValueError(f"aggregate must be 'mean' or 'median', got {self.aggregate!r}.")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}.")
        self._projections = {name: BucketProjection.from_statistics(cond.targets[self.target])
                             for name, cond in self.statistics.conditions.items()}
        for name, projection in self._projections.items():
            self.shares[name] = self._share(projection, None)[0]

    def _share(self, projection: BucketProjection, weights: np.ndarray | None) -> np.ndarray:
        """``[n_weights, layer, head]`` shares under bucket weights (None: all prompts once)."""
        if self.estimator == "debiased":
            return projection.debiased_share(weights)
        return projection.crossfit_share(weights)

    METRICS = ("L_total", "L_resid", "L_mask", "leakage_relative", "resid_removed_fraction")

    def _summary_array(self, shares: dict[str, np.ndarray]) -> np.ndarray:
        """``{condition: [B, layer, head]}`` -> ``[B, row, metric]`` (rows: baseline, then
        the replacements; metrics: :attr:`METRICS`)."""
        agg = np.nanmean if self.aggregate == "mean" else np.nanmedian
        with np.errstate(divide="ignore", invalid="ignore"):
            base_total = agg(shares["baseline/causal"], axis=(-2, -1))
            base_resid = agg(shares["baseline/bidirectional"], axis=(-2, -1))
            rows = []
            for name in ["baseline", *self.replacements]:
                total = agg(shares[f"{name}/causal"], axis=(-2, -1))
                resid = agg(shares[f"{name}/bidirectional"], axis=(-2, -1))
                rows.append(np.stack([total, resid, total - resid, total / base_total,
                                      1 - resid / base_resid], -1))
        return np.stack(rows, 1)

    def table(self, confidence: float = 0.95, method: str = "basic") -> pd.DataFrame:
        """One row per replacement (and the baseline): point estimates and bootstrap CIs.

        CIs: :func:`rope_leak.stats.bootstrap.bootstrap_statistic` — one bucket resample
        shared by every condition (paired), ``method="basic"`` (pivotal; the one valid for
        the debiased share) or ``"percentile"``.
        """
        rows = ["baseline", *self.replacements]
        if self.n_boot > 0:
            stats = {name: cond.targets[self.target] for name, cond in self.statistics.conditions.items()}
            result = bootstrap_statistic(stats, self._summary_array, n_boot=self.n_boot, seed=self.seed,
                                         level=confidence, share=self.estimator, method=method)
            point, low, high = result.estimate, result.ci_low, result.ci_high
        else:
            point = self._summary_array({k: v[None] for k, v in self.shares.items()})[0]
            low = high = None
        records = []
        for r, name in enumerate(rows):
            record = {"replacement": name}
            for m, metric in enumerate(self.METRICS):
                record[metric] = float(point[r, m])
                if low is not None:
                    record[f"{metric}_low"], record[f"{metric}_high"] = float(low[r, m]), float(high[r, m])
            records.append(record)
        table = pd.DataFrame(records)
        split = self.split_table()
        if split is not None:
            table = table.merge(split, on="replacement", how="left")
        table["n_prompts"] = self.statistics.conditions["baseline/causal"].n_prompts
        table["token_id"] = self.token_id
        table["aggregate"] = self.aggregate
        table["estimator"] = self.estimator
        table["ci_method"] = method if low is not None else None
        return table

    def split_table(self) -> pd.DataFrame | None:
        """The same replacements read by the renormalisation split of ``log_pattern`` (causal
        runs only, so in distribution): mean unmasked-scores part ``split_resid``, mean
        mask part ``split_mask`` and the split's pooled composition, with its bootstrap CI."""
        conditions = self.statistics.conditions
        if not all(t in conditions["baseline/causal"].targets for t in SPLIT_INPUTS):
            return None
        records = []
        for name in ["baseline", *self.replacements]:
            split = renormalisation_split(conditions[f"{name}/causal"], n_boot=self.n_boot, seed=self.seed)
            frac = split.fractions()
            ci = split.ci.get("composition", (np.nan, np.nan))
            records.append({
                "replacement": name, "split_resid": float(np.nanmean(frac["resid"])),
                "split_mask": float(np.nanmean(frac["mask"])),
                "split_composition": split.composition(),
                "split_composition_low": ci[0],
                "split_composition_high": ci[1],
            })
        table = pd.DataFrame(records)
        base = table.loc[table["replacement"] == "baseline", "split_resid"].iloc[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            table["split_resid_relative"] = table["split_resid"] / base
        return table

    def head_table(self) -> pd.DataFrame:
        """Long format: every head's share under every condition."""
        rows = []
        for name, share in self.shares.items():
            replacement, mask = name.split("/")
            for (layer, head), value in np.ndenumerate(share):
                rows.append({"replacement": replacement, "mask": mask, "layer": layer,
                             "head": head, "share": float(value)})
        return pd.DataFrame(rows)


def bos_interventions(
    model: HookedTransformer,
    tokens: Tensor,
    *,
    replacements: Iterable[str] = REPLACEMENTS,
    token_id: int | None = None,
    spec: PairSpec = EARLY_QUERIES,
    target: str = "pattern",
    n_boot: int = 200,
    batch_size: int = 8,
    n_buckets: int | None = None,
    seed: int = 0,
    aggregate: str = "mean",
    estimator: str = "debiased",
    progress: bool = False,
) -> BosInterventions:
    """Run baseline and every replacement under the causal and bidirectional masks
    (``2 * (1 + len(replacements))`` forward passes per prompt); see the module docstring.

    Returns a :class:`BosInterventions`; ``.table()`` is the DataFrame of the design's
    "fraction of L_resid removed" and "leakage relative to baseline".
    """
    replacements = list(replacements)
    unknown = set(replacements) - set(REPLACEMENTS)
    if unknown:
        raise ValueError(f"unknown replacements {sorted(unknown)}; choose from {REPLACEMENTS}.")
    if len(tokens) < 4:
        raise ValueError(f"{len(tokens)} prompts are too few to cross-fit; use at least 4 (64 recommended).")
    token_id = default_replacement_token(tokens) if token_id is None else int(token_id)
    conditions = {}
    for name in ["baseline", *replacements]:
        replacement = None if name == "baseline" else _replacement_condition(name, token_id, seed)
        conditions[f"{name}/causal"] = _with_mask(replacement, mask=False)
        conditions[f"{name}/bidirectional"] = _with_mask(replacement, mask=True)
    # The split's targets too, so the BOS-swap effect is also read by the renormalisation split.
    targets = tuple(dict.fromkeys((target, *SPLIT_INPUTS)))
    stats = run_statistics(model, tokens, conditions=conditions, targets=targets, spec=spec,
                           unmasked_conditions=[c for c in conditions if c.endswith("/causal")],
                           batch_size=batch_size, n_buckets=n_buckets, progress=progress,
                           metadata={"replacements": replacements, "token_id": token_id})
    return BosInterventions(stats, replacements, token_id, target=target, n_boot=n_boot, seed=seed,
                            aggregate=aggregate, estimator=estimator)
