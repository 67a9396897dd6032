"""The ablation-free split: no mask swap, the model stays in distribution.

Since ``log A_ij = s_ij - log Z_i`` and the projection ``D = H_abs - H_rel`` onto what
needs absolute position is linear, the absolute-position part of ``log_pattern`` is the
sum of that of the scores (which RoPE lets carry absolute position only through the
residual stream) and that of ``-log Z_i`` (the causal softmax denominator):

    SS(log A) = SS(s) + SS(-log Z) + 2 <D s, D (-log Z)>

Each term is the per-prompt population quantity ``<D mu_a, D mu_b>`` (``mu`` = expected
cell values), estimated without the upward bias of an in-sample sum of squares by a
U-statistic over pairs of distinct prompt buckets (their noise is independent):
``sum_{g != g'} <z_g^a, z_g'^b> / (N^2 - sum_g N_g^2)``, with ``z_g`` a bucket's
absolute-position coordinates (:class:`rope_leak.stats.projection.BucketProjection`).
The form is bilinear, so the identity holds exactly (checked on every run), and bucket
weights give bootstrap intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rope_leak.engine.statistics import ConditionStatistics
from rope_leak.stats.bootstrap import bucket_weights
from rope_leak.stats.projection import BucketProjection, _quadratic

SPLIT_TARGETS = ("log_pattern", "scores", "neg_log_z")


def _pair_products(a: BucketProjection, b: BucketProjection, weights: np.ndarray) -> np.ndarray:
    """U-statistic of ``<D mu_a, D mu_b>`` per head, for bucket weights ``[B, bucket]``."""
    products = a.bucket_products(b)  # [layer, head, g, g']
    # Copies of a bucket in a bootstrap draw never pair with each other: their noise is
    # shared, and pairing them would bring back the bias the U-statistic removes.
    self_terms = np.einsum("bg,lhgg->blh", weights**2, products)
    n = weights @ a.count
    pairs = n**2 - weights**2 @ a.count**2
    if np.any(pairs <= 0):
        raise ValueError(
            "the ablation-free split needs prompts in at least two buckets. Fix: use at least "
            "4 prompts (64 recommended)."
        )
    return (_quadratic(weights, products, weights) - self_terms) / pairs[:, None, None]


@dataclass
class AblationFreeSplit:
    """Absolute-position sums of squares per head, ``[layer, head]``, per prompt, debiased,
    as fractions of the head's total ``log_pattern`` SS (the units of the share:
    ``log_pattern`` equals the debiased causal share of ``log_pattern``; ``scores`` is
    the residual-stream part, ``denominator`` the causal-mask part)."""

    log_pattern: np.ndarray
    scores: np.ndarray  # residual-stream part
    denominator: np.ndarray  # causal-mask part (-log Z_i)
    cross: np.ndarray  # 2 <D s, D (-log Z)>
    composition_ci: tuple[float, float] = (float("nan"), float("nan"))
    layer_composition_ci: np.ndarray | None = None  # [layer, 2]
    level: float = 0.95

    @property
    def identity_error(self) -> float:
        """Largest ``|SS(log A) - SS(s) - SS(-log Z) - cross|`` relative to ``max |SS(log A)|``."""
        gap = np.nan_to_num(np.abs(self.log_pattern - self.scores - self.denominator - self.cross))
        scale = np.nanmax(np.abs(self.log_pattern))
        return float(gap.max() / scale) if scale > 0 else float(gap.max())

    def fractions(self) -> dict[str, np.ndarray]:
        """Each part as a fraction of ``SS(log A)`` (they sum to 1)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return {
                "resid": self.scores / self.log_pattern,
                "mask": self.denominator / self.log_pattern,
                "cross": self.cross / self.log_pattern,
            }

    @staticmethod
    def composition_of(denominator: np.ndarray, scores: np.ndarray, axis=None) -> np.ndarray:
        """Mask share of the two pure parts, ``sum SS(-log Z) / sum (SS(-log Z) + SS(s))``
        over heads (the cross term is reported beside it, not apportioned)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.nansum(denominator, axis) / (np.nansum(denominator, axis) + np.nansum(scores, axis))

    def composition(self) -> float:
        return float(self.composition_of(self.denominator, self.scores))

    def layer_composition(self) -> np.ndarray:
        return self.composition_of(self.denominator, self.scores, axis=1)

    def summary(self) -> dict:
        return {
            "log_pattern_mean": float(np.nanmean(self.log_pattern)),
            "resid_mean": float(np.nanmean(self.scores)),
            "mask_mean": float(np.nanmean(self.denominator)),
            "cross_mean": float(np.nanmean(self.cross)),
            "composition": self.composition(),
            "composition_ci": [float(c) for c in self.composition_ci],
            "composition_aggregation": "sum over heads of SS(-log Z) / sum of (SS(-log Z) + SS(scores))",
            "identity_max_relative_error": self.identity_error,
        }


def _split_terms(projections: dict[str, BucketProjection], weights: np.ndarray) -> dict[str, np.ndarray]:
    """The four terms, each divided by the head's per-prompt total SS of ``log_pattern``:
    in the units of the share (``log_pattern`` term = its debiased ``L_total``)."""
    log_a, s, z = (projections[t] for t in SPLIT_TARGETS)
    sst = log_a.per_prompt_sst(weights)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sst > 0, 1.0 / np.where(sst > 0, sst, 1.0), np.nan)
    return {
        "log_pattern": _pair_products(log_a, log_a, weights) * scale,
        "scores": _pair_products(s, s, weights) * scale,
        "denominator": _pair_products(z, z, weights) * scale,
        "cross": (_pair_products(s, z, weights) + _pair_products(z, s, weights)) * scale,
    }


def ablation_free_split(
    stats: ConditionStatistics, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> AblationFreeSplit:
    """Split the causal run's ``log_pattern`` absolute-position SS into its two sources,
    with percentile bootstrap intervals (over prompt buckets) of the compositions."""
    missing = [t for t in SPLIT_TARGETS if t not in stats.targets]
    if missing:
        raise ValueError(
            f"the ablation-free split needs targets {SPLIT_TARGETS}; missing {missing}. "
            "Fix: accumulate all targets (the default of run_statistics)."
        )
    projections = {t: BucketProjection.from_statistics(stats.targets[t]) for t in SPLIT_TARGETS}
    count = stats.targets["scores"].count
    point = {k: v[0] for k, v in _split_terms(projections, np.ones((1, len(count)))).items()}
    split = AblationFreeSplit(**point, level=level)
    if n_boot > 0:
        weights = bucket_weights(count, n_boot, np.random.default_rng(seed))
        model, layers = [], []
        for start in range(0, n_boot, 100):
            terms = _split_terms(projections, weights[start:start + 100])
            model.append(AblationFreeSplit.composition_of(terms["denominator"], terms["scores"], (1, 2)))
            layers.append(AblationFreeSplit.composition_of(terms["denominator"], terms["scores"], 2))
        alpha = (1 - level) / 2
        model_q = np.nanquantile(np.concatenate(model), [alpha, 1 - alpha])
        split.composition_ci = (float(model_q[0]), float(model_q[1]))
        split.layer_composition_ci = np.nanquantile(np.concatenate(layers), [alpha, 1 - alpha], axis=0).T
    return split
