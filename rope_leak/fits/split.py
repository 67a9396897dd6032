"""The renormalisation split of ``log A``: gauge-invariant, in distribution, one pass.

Softmax is unchanged by a per-query shift of the scores (``s_ij -> s_ij + c_i``), so a
split of ``log A_ij = s_ij - log Z_i`` into "the scores' part" and "``-log Z``'s part"
is not identified: it moves with an arbitrary offset. This split is invariant. From the
same causal forward pass, take every pair's unmasked score (the hook sees the scores
before the mask is imposed) and let ``A^full`` be their softmax over *all* keys. For
``j <= i``:

    log A_ij = log A^full_ij + m_i,      m_i = -log sum_{j' <= i} A^full_ij' >= 0

* ``log A^full`` (target ``unmasked_log_pattern``): the scores normalised without a mask:
  what the residual stream (through queries and keys) and RoPE give.
* ``m_i`` (target ``renormalisation``): the mask's renormalisation, minus the log of the
  share that the unmasked attention puts on the visible keys.

A shift ``c_i`` cancels in both. ``m`` is constant along each query row, so it has no
offset or key effect: in ``log A``, offset and key effects come from the scores alone,
and the mask acts only through the query effect ``b[i]``.

With ``D = H_abs - H_rel`` (what needs absolute position) and ``mu`` the expected cell
values, ``SS(log A) = SS(log A^full) + SS(m) + 2 <D mu_full, D mu_m>`` per prompt. Each
term is estimated without the upward bias of an in-sample sum of squares by a
U-statistic over pairs of distinct prompt buckets (independent noise):
``sum_{g != g'} <z_g^a, z_g'^b> / (N^2 - sum_g N_g^2)``. Intervals come from the
delete-one-bucket jackknife.

Aggregation over heads pools sums of squares (``sum_h SS_mask / sum_h (SS_mask +
SS_resid)``), so a head's weight is what it actually varies, and heads whose scored
variance is below the floor of :mod:`rope_leak.fits.degenerate` are left out (and
listed). Two compositions are reported: the mask's share of the two pure parts (cross
term beside it), and its projection share ``(SS_mask + cross / 2) / SS(log A)`` (the
two projection shares sum to 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm

from rope_leak.engine.statistics import ConditionStatistics
from rope_leak.fits.degenerate import degenerate_heads, fold_scored_variance
from rope_leak.fits.projection import BucketProjection, pair_products

SPLIT_INPUTS = ("log_pattern", "unmasked_log_pattern", "renormalisation")


@dataclass
class RenormalisationSplit:
    """Debiased absolute-position sums of squares per head, per prompt, ``[layer, head]``.

    Attributes:
        total: ``SS(log A)``.
        resid: ``SS(log A^full)``, the unmasked scores' part.
        mask: ``SS(m)``, the mask's renormalisation.
        cross: ``2 <D log A^full, D m>``.
        sst: per-prompt total sum of squares of ``log A`` over the scored cells (the
            denominator of the share: ``total / sst`` is the debiased share).
        degenerate: heads whose scored variance is below the floor (left out of pools).
    """

    total: np.ndarray
    resid: np.ndarray
    mask: np.ndarray
    cross: np.ndarray
    sst: np.ndarray
    degenerate: np.ndarray
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    layer_ci: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [layer, 2]
    level: float = 0.95

    def __repr__(self) -> str:
        return (f"RenormalisationSplit({self.total.shape[0]}x{self.total.shape[1]} heads, "
                f"pooled mask share {self.composition():.3f}, "
                f"{int(self.degenerate.sum())} degenerate heads)")

    @staticmethod
    def pooled(terms: dict[str, np.ndarray], keep: np.ndarray, axis=None) -> dict[str, np.ndarray]:
        """Pooled compositions over the kept heads (``axis``: heads' axes to pool)."""
        def total(name):
            return np.nansum(np.where(keep, terms[name], 0.0), axis=axis)

        mask, resid, cross, all_ = total("mask"), total("resid"), total("cross"), total("total")
        with np.errstate(divide="ignore", invalid="ignore"):
            return {
                "composition": mask / (mask + resid),
                "projection_composition": (mask + cross / 2) / all_,
                "cross_fraction": cross / all_,
            }

    def _terms(self) -> dict[str, np.ndarray]:
        return {"total": self.total, "resid": self.resid, "mask": self.mask, "cross": self.cross}

    def composition(self) -> float:
        """Mask share of the pure parts, pooled over non-degenerate heads."""
        return float(self.pooled(self._terms(), ~self.degenerate)["composition"])

    def model_table(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.pooled(self._terms(), ~self.degenerate).items()}

    def layer_table(self) -> dict[str, np.ndarray]:
        return self.pooled(self._terms(), ~self.degenerate, axis=1)

    def fractions(self) -> dict[str, np.ndarray]:
        """Per head, each part as a fraction of the head's per-prompt total SS (the units
        of the share), NaN for degenerate heads."""
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(self.degenerate | (self.sst <= 0), np.nan, 1.0 / self.sst)
        return {name: values * scale for name, values in self._terms().items()}

    def head_composition(self) -> np.ndarray:
        """Per-head mask share of the pure parts (NaN for degenerate heads)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            out = self.mask / (self.mask + self.resid)
        return np.where(self.degenerate, np.nan, out)

    def summary(self) -> dict:
        out = self.model_table()
        out.update({f"{k}_ci": [float(c) for c in v] for k, v in self.ci.items()})
        frac = self.fractions()
        out.update({
            "mean_head_composition": float(np.nanmean(self.head_composition())),
            "mean_resid_fraction": float(np.nanmean(frac["resid"])),
            "mean_mask_fraction": float(np.nanmean(frac["mask"])),
            "mean_cross_fraction": float(np.nanmean(frac["cross"])),
            "n_degenerate_heads": int(self.degenerate.sum()),
            "aggregation": "sums of squares pooled over non-degenerate heads: "
                           "sum SS(m) / sum (SS(m) + SS(log A^full)); projection share "
                           "(SS(m) + cross/2) / SS(log A)",
            "note": "key and offset effects come from the scores alone; the mask acts only "
                    "through the query effect",
        })
        return out


def _terms(projections: dict[str, BucketProjection], weights: np.ndarray) -> dict[str, np.ndarray]:
    log_a, full, renorm = (projections[t] for t in SPLIT_INPUTS)
    cross = pair_products(full, renorm, weights)
    return {
        "total": pair_products(log_a, log_a, weights),
        "resid": pair_products(full, full, weights),
        "mask": pair_products(renorm, renorm, weights),
        "cross": cross + cross,
        "sst": log_a.per_prompt_sst(weights),
    }


def renormalisation_split(
    stats: ConditionStatistics, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> RenormalisationSplit:
    """The split of a causal run's ``log_pattern``, with delete-one-bucket jackknife
    intervals (normal, ``level``) of the pooled compositions, model-wide and per layer
    (``n_boot=0``: no intervals; the name is kept for a uniform signature)."""
    missing = [t for t in SPLIT_INPUTS if t not in stats.targets]
    if missing:
        raise ValueError(
            f"the renormalisation split needs targets {SPLIT_INPUTS}; missing {missing}. "
            "Fix: accumulate them under the model's own mask (run_statistics does by default "
            "for the 'causal' condition of a HookedTransformer)."
        )
    projections = {t: BucketProjection.from_statistics(stats.targets[t]) for t in SPLIT_INPUTS}
    count = stats.targets["log_pattern"].count
    point_terms = {k: v[0] for k, v in _terms(projections, np.ones((1, len(count)))).items()}
    degenerate = degenerate_heads(point_terms["sst"],
                                  fold_sst=fold_scored_variance(projections["log_pattern"]))
    split = RenormalisationSplit(**point_terms, degenerate=degenerate, level=level)
    if n_boot > 0:
        # Delete-one-bucket jackknife: the terms are U-statistics over buckets and the
        # compositions smooth ratios of them, for which the jackknife is centred on the
        # estimate; bootstrap draws are not (a bucket drawn twice either pairs with its
        # copy, bringing its noise back, or is left unpaired, dropping pairs), and their
        # percentile intervals missed the estimate on SmolLM2.
        buckets = np.flatnonzero(count > 0)
        if len(buckets) < 3:
            raise ValueError("the split's intervals need prompts in at least three buckets. "
                             "Fix: use at least 6 prompts (64 recommended), or n_boot=0.")
        weights = np.ones((len(buckets), len(count)))
        weights[np.arange(len(buckets)), buckets] = 0.0
        keep = ~degenerate
        terms = _terms(projections, weights)
        z = norm.ppf((1 + level) / 2)
        for point_axis, axis, target in (((0, 1), (1, 2), split.ci), (1, 2, split.layer_ci)):
            point = RenormalisationSplit.pooled(point_terms, keep, axis=point_axis)
            left_out = RenormalisationSplit.pooled(terms, keep[None], axis=axis)
            g = len(buckets)
            for name, values in left_out.items():
                with np.errstate(invalid="ignore"):
                    se = np.sqrt((g - 1) / g * np.nansum((values - np.nanmean(values, 0)) ** 2, 0))
                low, high = point[name] - z * se, point[name] + z * se
                target[name] = ((float(low), float(high)) if np.ndim(low) == 0
                                else np.stack([low, high], -1))
    return split
