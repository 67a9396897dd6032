"""Split each head's absolute-position share into a causal-mask and a residual-stream part.

``L_total`` = share under the model's own causal mask; ``L_resid`` = share with every
layer's mask swapped for a bidirectional one (same weights, same causal pairs scored);
``L_mask = L_total - L_resid``. This is the bidirectional ablation, the paper's method.

One aggregation for every estimator (:data:`rope_leak.quantities.POOLED`): a degenerate
head (scored variance below the floor under either mask) is left out; layer and model
components are means over the heads kept, and the composition pools sums of squares,
``1 - sum_h dSS_resid / sum_h dSS_total`` with ``dSS = share x scored variance``
(:func:`pooled_composition`). Heads with ``L_mask < 0`` violate the additivity the split
assumes; they are flagged, never clipped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rope_leak.engine.statistics import TargetStatistics
from rope_leak.fits.degenerate import degenerate_heads, fold_scored_variance
from rope_leak.fits.projection import BucketProjection


def composition_weights(causal: TargetStatistics,
                        bidirectional: TargetStatistics) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(w_total, w_resid, degenerate)``, each ``[layer, head]``: every head's per-prompt
    scored variance under each mask (0 for a degenerate head), and which heads are
    degenerate under either mask (in all prompts or in one cross-fitting fold)."""
    sst, degenerate = [], None
    for stats in (causal, bidirectional):
        projection = BucketProjection.from_statistics(stats)
        sst.append(projection.per_prompt_sst()[0])
        flagged = degenerate_heads(sst[-1], fold_sst=fold_scored_variance(projection))
        degenerate = flagged if degenerate is None else degenerate | flagged
    w_total, w_resid = (np.where(degenerate, 0.0, s) for s in sst)
    return w_total, w_resid, degenerate


def pooled_share(share: np.ndarray, weight: np.ndarray, axis=None) -> np.ndarray:
    """``sum_h w_h L_h / sum_h w_h`` = ``sum dSS / sum SST`` over ``axis`` (the heads)."""
    weight = np.broadcast_to(weight, np.shape(share))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nansum(share * weight, axis) / weight.sum(axis)


SHARE_ROUNDING = 1e-12
"""A share (a fraction of a sum of squares) this small is rounding, not a baseline."""


def composition_estimable(denominator: np.ndarray, denominator_low: np.ndarray) -> np.ndarray:
    """Whether a composition ``1 - pooled L_resid / pooled L_total`` can be read: its
    denominator, the pooled ``L_total``, must be above 0 (above :data:`SHARE_ROUNDING`) and
    so must its interval's low end where there is one (NaN: no resamples, the point alone
    decides). Otherwise the ratio is over a baseline that may be 0, and it is reported as
    not estimable, not as a number."""
    denominator, low = np.asarray(denominator, float), np.asarray(denominator_low, float)
    return (denominator > SHARE_ROUNDING) & (np.isnan(low) | (low > SHARE_ROUNDING))


def pooled_composition(total: np.ndarray, resid: np.ndarray, w_total: np.ndarray, w_resid: np.ndarray,
                       axis=None) -> np.ndarray:
    """The composition: ``1 - pooled(L_resid) / pooled(L_total)`` (:func:`pooled_share`)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - pooled_share(resid, w_resid, axis) / pooled_share(total, w_total, axis)


COMPONENTS = ("L_total", "L_mask", "L_resid")


def layer_component_means(total: np.ndarray, resid: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``[..., layer, head]`` shares -> ``[..., 3, layer]``: per layer the means of
    :data:`COMPONENTS` over the heads kept (``keep``: 1, or NaN for a degenerate head); a
    layer of degenerate heads only is NaN."""
    total, resid = total * keep, resid * keep
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.stack([np.nanmean(total, -1), np.nanmean(total - resid, -1), np.nanmean(resid, -1)], axis=-2)


@dataclass
class Decomposition:
    """Per-head components, ``[layer, head]``, under one estimator, with the weights and
    the degenerate heads of :func:`composition_weights`.

    >>> dec = Decomposition.of(total, resid, causal_stats, bidirectional_stats)  # doctest: +SKIP
    >>> dec.composition()                                                       # doctest: +SKIP
    """

    total: np.ndarray
    resid: np.ndarray
    w_total: np.ndarray
    w_resid: np.ndarray
    degenerate: np.ndarray

    @classmethod
    def of(cls, total: np.ndarray, resid: np.ndarray, causal: TargetStatistics,
           bidirectional: TargetStatistics) -> Decomposition:
        """The shares ``total`` and ``resid`` with the weights of the statistics they came from."""
        return cls(np.asarray(total, float), np.asarray(resid, float), *composition_weights(causal, bidirectional))

    @property
    def mask(self) -> np.ndarray:
        return self.total - self.resid

    def kept(self, values: np.ndarray) -> np.ndarray:
        """``values`` with the degenerate heads set to NaN (what the means skip)."""
        return np.where(self.degenerate, np.nan, values)

    def composition(self) -> float:
        """The pooled composition; NaN (not estimable) when the pooled ``L_total`` is not above 0."""
        return float(self._composition(axis=None))

    def layer_composition(self) -> np.ndarray:
        return self._composition(axis=1)

    def _composition(self, axis) -> np.ndarray:
        ratio = pooled_composition(self.total, self.resid, self.w_total, self.w_resid, axis)
        denominator = pooled_share(self.total, self.w_total, axis)
        return np.where(composition_estimable(denominator, np.nan), ratio, np.nan)

    def additivity_violated(self) -> np.ndarray:
        """Heads whose bidirectional share exceeds the causal one (``L_mask < 0``)."""
        return self.mask < 0

    def layer_means(self) -> dict[str, np.ndarray]:
        """``{"L_total", "L_mask", "L_resid"}``: ``[layer]`` means over the heads kept."""
        means = layer_component_means(self.total, self.resid, np.where(self.degenerate, np.nan, 1.0))
        return dict(zip(COMPONENTS, means))

    def layer_table(self) -> pd.DataFrame:
        return pd.DataFrame({
            "layer": np.arange(self.total.shape[0]), **self.layer_means(),
            "composition": self.layer_composition(),
            "heads_additivity_violated": self.additivity_violated().sum(1),
        })

    def summary(self) -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means = {name: float(np.nanmean(self.kept(values))) for name, values in
                     (("L_total", self.total), ("L_resid", self.resid), ("L_mask", self.mask))}
        return {
            **means,
            "composition": self.composition(),
            "composition_aggregation": POOLED_TEXT,
            "heads_degenerate": int(self.degenerate.sum()),
            "heads_additivity_violated": int(self.additivity_violated().sum()),
            "additivity_violated": bool(means["L_mask"] < 0),
        }


POOLED_TEXT = ("components: means over non-degenerate heads; composition: 1 - sum dSS_resid / "
               "sum dSS_total over them (pooled sums of squares)")

