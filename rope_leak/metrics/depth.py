"""Depth profile of the decomposition, its slope over depth, and bucket-bootstrap CIs.

Per layer ``l`` the residual-stream and causal-mask components are the head means
``L_resid[l] = mean_h L_resid[l, h]`` and ``L_mask[l] = mean_h L_mask[l, h]``.
"Accumulates with depth" is the least-squares slope of a component against *relative*
depth ``l / (n_layers - 1)`` (0 = first layer, 1 = last), so models with different
numbers of layers are comparable: the slope is the fitted change from the first to the
last layer.

Two intervals are provided for the slope:

* ``t``: ``scipy.stats.linregress`` standard error over the layers (treats layers as
  independent observations around a line; ignores sampling noise in each layer's value);
* ``bootstrap``: percentile interval over a cluster bootstrap of prompt buckets (the
  prompts are the sampling unit): :func:`bootstrap_decompositions` refits every head's
  shares with resampled bucket multiplicities (``fit_shares(..., weights=...)``), within
  each cross-fitting fold, so both folds stay populated.

The bootstrap here is local to this module until ``rope_leak.stats`` (bootstrap, nulls,
FDR; another branch) is merged; :func:`bootstrap_decompositions` is the only function to
swap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from rope_leak.engine.statistics import CellStatistics
from rope_leak.metrics.decomposition import Decomposition
from rope_leak.metrics.shares import fit_shares

CI_LEVEL = 0.95


@dataclass
class SlopeFit:
    """Slope of a per-layer component over relative depth, with its intervals."""

    slope: float
    intercept: float
    stderr: float
    ci_low: float  # t interval (linregress stderr, n_layers - 2 dof)
    ci_high: float
    p_value: float
    boot_low: float = float("nan")  # bootstrap percentile interval over prompt buckets
    boot_high: float = float("nan")

    def to_dict(self) -> dict:
        return {k: float(v) for k, v in asdict(self).items()}


def relative_depth(n_layers: int) -> np.ndarray:
    return np.arange(n_layers) / max(n_layers - 1, 1)


def depth_slope(per_layer: np.ndarray, level: float = CI_LEVEL) -> SlopeFit:
    """Least-squares slope of ``per_layer`` (one value per layer) over relative depth."""
    y = np.asarray(per_layer, dtype=float)
    x = relative_depth(len(y))
    ok = np.isfinite(y)
    if ok.sum() < 3:
        nan = float("nan")
        return SlopeFit(nan, nan, nan, nan, nan, nan)
    fit = sps.linregress(x[ok], y[ok])
    t = sps.t.ppf(0.5 + level / 2, ok.sum() - 2)
    return SlopeFit(float(fit.slope), float(fit.intercept), float(fit.stderr),
                    float(fit.slope - t * fit.stderr), float(fit.slope + t * fit.stderr),
                    float(fit.pvalue))


def layer_profile(dec: Decomposition) -> pd.DataFrame:
    """One row per layer: relative depth and the head-mean components."""
    n_layers = dec.total.shape[0]
    return pd.DataFrame({
        "layer": np.arange(n_layers),
        "relative_depth": relative_depth(n_layers),
        "L_total": np.nanmean(dec.total, 1),
        "L_resid": np.nanmean(dec.resid, 1),
        "L_mask": np.nanmean(dec.mask, 1),
    })


# ------------------------------------------------------------------ bucket bootstrap


def bucket_weights(count: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, bucket]`` multiplicities: within each fold (bucket parity), the
    non-empty buckets are resampled with replacement (empty ones keep weight 0)."""
    count = np.asarray(count)
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_boot, len(count)))
    for fold in (0, 1):
        buckets = np.flatnonzero((np.arange(len(count)) % 2 == fold) & (count > 0))
        if len(buckets) == 0:
            raise ValueError("a cross-fitting fold has no prompts; use at least 4 prompts.")
        draws = rng.integers(0, len(buckets), size=(n_boot, len(buckets)))
        for b in range(n_boot):
            weights[b, buckets] = np.bincount(draws[b], minlength=len(buckets))
    return weights


def bootstrap_decompositions(
    causal: CellStatistics, bidirectional: CellStatistics, n_boot: int = 200, seed: int = 0
) -> tuple[list[Decomposition], np.ndarray]:
    """Decompositions refitted on ``n_boot`` bucket resamples (the same resample for
    both conditions, as they ran on the same prompts). Returns them and the weights."""
    weights = bucket_weights(causal.count, n_boot, seed)
    out = []
    for w in weights:
        out.append(Decomposition(total=fit_shares(causal, w).share,
                                 resid=fit_shares(bidirectional, w).share))
    return out, weights


def percentile_interval(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [0.5 - level / 2, 0.5 + level / 2])
    return float(lo), float(hi)


def bootstrap_interval(
    replicates: list, statistic: Callable[[object], float], level: float = CI_LEVEL
) -> tuple[float, float]:
    return percentile_interval(np.array([statistic(r) for r in replicates]), level)


def depth_slopes(
    dec: Decomposition, replicates: list[Decomposition] | None = None, level: float = CI_LEVEL
) -> dict[str, SlopeFit]:
    """Slopes over depth of the per-layer ``L_resid``, ``L_mask`` and ``L_total``, with
    t intervals and (given bootstrap ``replicates``) percentile intervals."""
    out = {}
    for name in ("L_resid", "L_mask", "L_total"):
        per_layer = layer_profile(dec)[name].to_numpy()
        fit = depth_slope(per_layer, level)
        if replicates:
            fit.boot_low, fit.boot_high = bootstrap_interval(
                replicates, lambda d, n=name: depth_slope(layer_profile(d)[n].to_numpy()).slope, level)
        out[name] = fit
    return out
