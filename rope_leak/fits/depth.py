"""Depth profile of the decomposition, its slope over depth, and bucket-bootstrap CIs.

Per layer ``l`` the residual-stream and causal-mask components are the head means
``L_resid[l] = mean_h L_resid[l, h]`` and ``L_mask[l] = mean_h L_mask[l, h]``.
"Accumulates with depth" is the least-squares slope of a component against *relative*
depth ``l / (n_layers - 1)`` (0 = first layer, 1 = last), so models with different
numbers of layers are comparable: the slope is the fitted change from the first to the
last layer.

Two intervals are used for the slope (see :func:`rope_leak.analyses.architectures.summarize_model`):

* ``t``: ``scipy.stats.linregress`` standard error over the layers (:func:`depth_slope`;
  treats layers as independent observations around a line and ignores the sampling
  noise of each layer's value);
* ``bootstrap``: the pivotal cluster bootstrap over prompt buckets of
  :func:`rope_leak.inference.bootstrap_statistic`, applied to :func:`slopes_over_depth` of
  the resampled per-layer components (prompts are the sampling unit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

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


def slopes_over_depth(per_layer: np.ndarray) -> np.ndarray:
    """Vectorised least-squares slope over relative depth: ``[..., layer] -> [...]``
    (for bootstrap replicates)."""
    y = np.asarray(per_layer, dtype=float)
    x = relative_depth(y.shape[-1])
    xc = x - x.mean()
    return ((y - y.mean(-1, keepdims=True)) * xc).sum(-1) / (xc**2).sum()


def percentile_interval(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """``[q_lo, q_hi]`` of the finite values (nan, nan if none)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [0.5 - level / 2, 0.5 + level / 2])
    return float(lo), float(hi)
