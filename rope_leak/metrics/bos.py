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

with percentile-bootstrap CIs from a paired bootstrap over prompt buckets (the same
resampled prompts for every condition; buckets resampled within each cross-fitting fold).

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
from rope_leak.engine.run import DEFAULT_BUCKETS, run_statistics
from rope_leak.engine.statistics import RunStatistics
from rope_leak.interventions.mask import bidirectional
from rope_leak.interventions.position_zero import replace_position_zero
from rope_leak.interventions.position_zero_patch import replace_all_position_zero
from rope_leak.stats.bootstrap import bucket_weights
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

    def _summaries(self, shares: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        agg = np.nanmean if self.aggregate == "mean" else np.nanmedian
        base_total = agg(shares["baseline/causal"])
        base_resid = agg(shares["baseline/bidirectional"])
        rows = {}
        for name in ["baseline", *self.replacements]:
            total = agg(shares[f"{name}/causal"])
            resid = agg(shares[f"{name}/bidirectional"])
            rows[name] = {
                "L_total": total, "L_resid": resid, "L_mask": total - resid,
                "leakage_relative": total / base_total if base_total != 0 else np.nan,
                "resid_removed_fraction": 1 - resid / base_resid if base_resid != 0 else np.nan,
            }
        return rows

    def table(self, confidence: float = 0.95) -> pd.DataFrame:
        """One row per replacement (and the baseline): point estimates and bootstrap CIs."""
        point = self._summaries(self.shares)
        boots = []
        if self.n_boot > 0:
            count = next(iter(self.statistics.conditions.values())).targets[self.target].count
            weights = bucket_weights(count, self.n_boot, np.random.default_rng(self.seed))
            samples = {name: self._share(p, weights) for name, p in self._projections.items()}
            boots = [self._summaries({name: v[b] for name, v in samples.items()})
                     for b in range(self.n_boot)]
        alpha = (1 - confidence) / 2
        rows = []
        for name, values in point.items():
            row = {"replacement": name}
            for metric, value in values.items():
                row[metric] = float(value)
                if boots:
                    samples = np.array([b[name][metric] for b in boots], dtype=float)
                    low, high = np.nanquantile(samples, [alpha, 1 - alpha])
                    row[f"{metric}_low"], row[f"{metric}_high"] = float(low), float(high)
            rows.append(row)
        table = pd.DataFrame(rows)
        table["n_prompts"] = self.statistics.conditions["baseline/causal"].n_prompts
        table["token_id"] = self.token_id
        table["aggregate"] = self.aggregate
        table["estimator"] = self.estimator
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
    n_buckets: int = DEFAULT_BUCKETS,
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
    stats = run_statistics(model, tokens, conditions=conditions, targets=(target,), spec=spec,
                           batch_size=batch_size, n_buckets=n_buckets, progress=progress,
                           metadata={"replacements": replacements, "token_id": token_id})
    return BosInterventions(stats, replacements, token_id, target=target, n_boot=n_boot, seed=seed,
                            aggregate=aggregate, estimator=estimator)
