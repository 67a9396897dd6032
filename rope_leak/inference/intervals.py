"""Confidence intervals and significance for the decomposition of one target.

Point estimates are the *debiased* shares (:mod:`rope_leak.fits.debias`): the cross-fitted
share is biased low at realistic prompt counts, and bootstrap intervals around it miss
the true share far too often (see :mod:`rope_leak.inference.bootstrap`). The causal and
bidirectional runs see the same prompts, so ``L_mask`` and the composition are
bootstrapped under one joint resample of prompt buckets. Per-head p-values come from the
sign-flip null and are corrected across heads with Benjamini–Hochberg.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rope_leak.engine.statistics import ConditionStatistics
from rope_leak.fits.decomposition import (
    POOLED_TEXT,
    composition_estimable,
    composition_weights,
    pooled_composition,
    pooled_share,
)
from rope_leak.inference.bootstrap import bootstrap_statistic, bucket_weights
from rope_leak.inference.fdr import benjamini_hochberg
from rope_leak.inference.nulls import signflip_null
from rope_leak.quantities import NOT_ESTIMABLE


@dataclass
class Interval:
    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray

    def __getitem__(self, index) -> Interval:
        return Interval(self.estimate[index], self.low[index], self.high[index])


@dataclass
class DecompositionInference:
    """Debiased components with intervals, per head ``[layer, head]``, per layer and model."""

    total: Interval
    resid: Interval
    mask: Interval
    layer_composition: Interval  # [layer]; NaN where not estimable
    composition: Interval  # scalar arrays; NaN when not estimable
    means: Interval  # [3]: model means of L_total, L_resid, L_mask
    pvalue_total: np.ndarray
    qvalue_total: np.ndarray
    significant_total: np.ndarray
    pvalue_resid: np.ndarray
    qvalue_resid: np.ndarray
    significant_resid: np.ndarray
    sink: Interval
    level: float
    fdr_level: float
    n_boot: int
    degenerate: np.ndarray  # [layer, head] bool: scored variance below the floor
    composition_estimable: bool = True
    layer_composition_estimable: np.ndarray | None = None  # [layer] bool
    composition_point: float = float("nan")  # the ratio itself, also where not estimable
    layer_composition_point: np.ndarray | None = None

    def __repr__(self) -> str:
        composition = (f"{float(self.composition.estimate):.3f} [{float(self.composition.low):.3f}, "
                       f"{float(self.composition.high):.3f}]" if self.composition_estimable else NOT_ESTIMABLE)
        return f"DecompositionInference(composition {composition}, {int(self.degenerate.sum())} degenerate heads)"

    def summary(self) -> dict:
        return {
            "share_estimator": "debiased (U-statistic over prompt buckets)",
            "level": self.level,
            "fdr_level": self.fdr_level,
            "n_boot": self.n_boot,
            "composition": float(self.composition.estimate),
            "composition_ci": [float(self.composition.low), float(self.composition.high)],
            "composition_estimable": bool(self.composition_estimable),
            "composition_point": float(self.composition_point),
            **{
                f"{name}_mean": float(self.means.estimate[k])
                for k, name in enumerate(("L_total", "L_resid", "L_mask"))
            },
            **{
                f"{name}_mean_ci": [float(self.means.low[k]), float(self.means.high[k])]
                for k, name in enumerate(("L_total", "L_resid", "L_mask"))
            },
            "aggregation": POOLED_TEXT,
            "degenerate_heads": int(self.degenerate.sum()),
            "heads_significant_total": int(self.significant_total.sum()),
            "heads_significant_resid": int(self.significant_resid.sum()),
        }


def decomposition_inference(
    causal: ConditionStatistics,
    bidirectional: ConditionStatistics,
    target: str = "pattern",
    *,
    n_boot: int = 1000,
    n_flips: int = 2000,
    level: float = 0.95,
    fdr_level: float = 0.05,
    seed: int = 0,
) -> DecompositionInference:
    pair = {"causal": causal.targets[target], "bidirectional": bidirectional.targets[target]}
    w_c, w_b, degenerate = composition_weights(pair["causal"], pair["bidirectional"])
    keep = np.where(degenerate, np.nan, 1.0)
    heads = bootstrap_statistic(
        pair,
        lambda s: np.stack([s["causal"], s["bidirectional"], s["causal"] - s["bidirectional"]], 1),
        n_boot=n_boot, seed=seed, level=level,
    )
    compositions = bootstrap_statistic(
        pair,
        lambda s: np.concatenate([
            pooled_composition(s["causal"], s["bidirectional"], w_c, w_b, (1, 2))[:, None],
            pooled_composition(s["causal"], s["bidirectional"], w_c, w_b, 2),
            np.nanmean(s["causal"] * keep, (1, 2))[:, None],
            np.nanmean(s["bidirectional"] * keep, (1, 2))[:, None],
            np.nanmean((s["causal"] - s["bidirectional"]) * keep, (1, 2))[:, None],
            pooled_share(s["causal"], w_c, (1, 2))[:, None],  # the compositions' denominators
            pooled_share(s["causal"], w_c, 2),
        ], 1),
        n_boot=n_boot, seed=seed, level=level,
    )
    n_layers = w_c.shape[0]
    ratios, means = slice(0, 1 + n_layers), slice(1 + n_layers, 4 + n_layers)
    denominators = slice(4 + n_layers, None)
    estimable = composition_estimable(compositions.estimate[denominators], compositions.ci_low[denominators])
    masked = [np.where(estimable, a[ratios], np.nan) for a in
              (compositions.estimate, compositions.ci_low, compositions.ci_high)]
    parts = [Interval(heads.estimate[k], heads.ci_low[k], heads.ci_high[k]) for k in range(3)]
    null_total = signflip_null(pair["causal"], n_flips=n_flips, seed=seed)
    null_resid = signflip_null(pair["bidirectional"], n_flips=n_flips, seed=seed)
    fdr_total = benjamini_hochberg(null_total.pvalues, fdr_level)
    fdr_resid = benjamini_hochberg(null_resid.pvalues, fdr_level)
    return DecompositionInference(
        total=parts[0], resid=parts[1], mask=parts[2],
        layer_composition=Interval(*(a[1:] for a in masked)),
        composition=Interval(*(a[0] for a in masked)),
        means=Interval(*(a[means] for a in (compositions.estimate, compositions.ci_low, compositions.ci_high))),
        pvalue_total=null_total.pvalues, qvalue_total=fdr_total.qvalues,
        significant_total=fdr_total.significant,
        pvalue_resid=null_resid.pvalues, qvalue_resid=fdr_resid.qvalues,
        significant_resid=fdr_resid.significant,
        sink=sink_interval(causal, n_boot=n_boot, level=level, seed=seed),
        level=level, fdr_level=fdr_level, n_boot=n_boot, degenerate=degenerate,
        composition_estimable=bool(estimable[0]), layer_composition_estimable=estimable[1:],
        composition_point=float(compositions.estimate[0]), layer_composition_point=compositions.estimate[1:n_layers + 1],
    )


def sink_interval(stats: ConditionStatistics, *, n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0) -> Interval:
    """Percentile bootstrap over prompt buckets of each head's sink score."""
    count = next(iter(stats.targets.values())).count
    weights = bucket_weights(count, n_boot, np.random.default_rng(seed))  # [B, G]
    samples = np.einsum("bg,glh->blh", weights, stats.sink_sum) / (weights @ count)[:, None, None]
    alpha = (1 - level) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha], axis=0)
    return Interval(stats.sink_sum.sum(0) / count.sum(), low, high)
