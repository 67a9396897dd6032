"""Cluster bootstrap over prompt buckets, with one resample shared by all conditions.

Prompts are the independent units; the engine keeps them summed into buckets (prompt
``k`` -> bucket ``k % G``, fold = bucket parity), so the bootstrap resamples *buckets*
with replacement, separately within each fold (even buckets from even buckets, odd from
odd) so that both cross-fitting folds stay populated and keep their size. Only
non-empty buckets are drawn (with fewer prompts than buckets the empty ones are not
units). A resample is a vector of multiplicities ``w[bucket]``, exactly what
``fit_shares(stats, weights=w)`` takes; here thousands of them are evaluated at once by
:class:`~rope_leak.fits.projection.BucketProjection` (matrix products over buckets).

Intervals (numpy quantiles of the replicates; ``scipy.stats.bootstrap`` resamples
observations itself and can neither resample summed statistics by cluster within folds
nor share one resample across conditions):

* ``method="basic"`` (default): the pivotal interval
  ``[T + θ(F̂) - q_hi, T + θ(F̂) - q_lo]``, where ``θ(F̂)`` is the statistic's value in
  the bootstrap world, i.e. ``fn`` of the plug-in (in-sample) shares. Reflecting around
  ``θ(F̂)`` rather than around the estimate ``T`` is what makes it valid for the
  debiased share, whose bootstrap replicates are centred on the (upward-biased) plug-in.
* ``method="percentile"``: ``[q_lo, q_hi]``.

Which share ``fn`` receives: ``"debiased"`` (default;
:func:`rope_leak.fits.debias.debiased_share`) or ``"crossfit"`` (the cross-fitted share
of ``fit_shares``). Coverage of the *population* share, simulated (n = 16, 32 buckets,
40 seeds, shares 0 to 0.13, 95% level; tests/inference/test_stats.py checks the default):

=====================  ===========  ===========
share / method          P = 32        P = 64
=====================  ===========  ===========
debiased / basic        0.93 - 1.0    0.95 - 1.0
debiased / percentile   0.20 - 0.98   0.33 - 0.93
crossfit / percentile   0.00 - 0.55   0.00 - 0.78
crossfit / basic        0.23 - 0.80   0.30 - 0.78
=====================  ===========  ===========

The cross-fitted share's intervals describe the spread of that (biased) estimator, not
the population share: do not read them as confidence intervals for ``dR2``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from rope_leak.engine.statistics import TargetStatistics
from rope_leak.fits.projection import BucketProjection

SHARES = ("crossfit", "debiased")


@dataclass
class BootstrapResult:
    """Point estimate, interval and (optionally) the bootstrap replicates of a statistic.

    ``estimate``, ``ci_low`` and ``ci_high`` have the statistic's shape (``[layer, head]``
    for shares); ``samples`` has a leading ``n_boot`` axis (None unless kept).
    """

    estimate: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    level: float
    method: str
    samples: np.ndarray | None = None


def bucket_weights(count: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, bucket]`` multiplicities: non-empty buckets of each fold resampled with
    replacement within that fold (empty buckets keep weight 0)."""
    count = np.asarray(count)
    weights = np.zeros((n_boot, len(count)))
    for fold in (0, 1):
        idx = np.flatnonzero(count[fold::2] > 0) * 2 + fold
        if len(idx) == 0:
            raise ValueError(
                f"fold {fold} has no prompts: cross-fitting needs both even and odd prompts."
            )
        draws = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        rows = np.repeat(np.arange(n_boot), len(idx))
        np.add.at(weights, (rows, idx[draws.ravel()]), 1.0)
    return weights


def _share_fn(kind: str) -> Callable[[BucketProjection, np.ndarray | None], np.ndarray]:
    if kind == "crossfit":
        return BucketProjection.crossfit_share
    if kind == "debiased":
        return BucketProjection.debiased_share
    raise ValueError(f"share must be one of {SHARES}, got {kind!r}.")


def bootstrap_statistic(
    stats_by_condition: Mapping[str, TargetStatistics],
    fn: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    share: str = "debiased",
    method: str = "basic",
    keep_samples: bool = False,
    batch_size: int = 64,
) -> BootstrapResult:
    """Bootstrap any function of the shares of several conditions under ONE bucket resample.

    The conditions must come from the same prompts (same bucket counts): bucket ``g`` of
    every condition is drawn together, so differences such as ``L_mask = share_causal -
    share_bidir`` and ratios such as the composition keep their pairing.

    Args:
        stats_by_condition: ``{name: TargetStatistics}``, all with the same buckets.
        fn: maps ``{name: shares[B, layer, head]}`` to an array with leading axis ``B``
            (any trailing shape). None: the shares of the single condition.
        share: ``"debiased"`` or ``"crossfit"`` (which share ``fn`` receives).
        method: ``"basic"`` (pivotal) or ``"percentile"``.
        batch_size: weight vectors evaluated per matrix product (memory ~
            ``batch_size * layers * heads * 2n`` floats).
    """
    if method not in ("percentile", "basic"):
        raise ValueError(f"method must be 'percentile' or 'basic', got {method!r}.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    names = list(stats_by_condition)
    if not names:
        raise ValueError("no conditions given.")
    first = stats_by_condition[names[0]]
    for name in names[1:]:
        other = stats_by_condition[name]
        if other.n_buckets != first.n_buckets or not np.array_equal(other.count, first.count):
            raise ValueError(
                f"conditions {names[0]!r} and {name!r} have different prompt buckets; a joint "
                "resample needs the same prompts in every condition."
            )
    if fn is None:
        if len(names) != 1:
            raise ValueError("give fn when bootstrapping several conditions.")
        fn = lambda s: s[names[0]]  # noqa: E731
    share_of = _share_fn(share)
    projections = {name: BucketProjection.from_statistics(st) for name, st in stats_by_condition.items()}

    estimate = np.asarray(fn({k: share_of(p, None) for k, p in projections.items()}))[0]
    rng = np.random.default_rng(seed)
    weights = bucket_weights(first.count, n_boot, rng)
    samples = np.empty((n_boot,) + estimate.shape)
    for start in range(0, n_boot, batch_size):
        w = weights[start : start + batch_size]
        shares = {k: share_of(p, w) for k, p in projections.items()}
        samples[start : start + len(w)] = fn(shares)
    alpha = (1 - level) / 2
    with np.errstate(invalid="ignore"):
        lo, hi = np.nanquantile(samples, [alpha, 1 - alpha], axis=0)
    if method == "basic":
        # pivot: (T* - θ(F̂)) mimics (T - θ); θ(F̂) = fn of the plug-in (in-sample) shares,
        # the true value of the bootstrap world. Reflecting around the estimate instead
        # would double a biased estimator's bias.
        truth = np.asarray(fn({k: p.in_sample_share() for k, p in projections.items()}))[0]
        lo, hi = estimate + truth - hi, estimate + truth - lo
    return BootstrapResult(estimate, lo, hi, level, method, samples if keep_samples else None)


def bootstrap_shares(
    stats: TargetStatistics,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    share: str = "debiased",
    method: str = "basic",
    keep_samples: bool = False,
) -> BootstrapResult:
    """Per-head bootstrap interval of the share (``[layer, head]``) of one target/condition."""
    return bootstrap_statistic(
        {"share": stats}, None, n_boot=n_boot, seed=seed, level=level, share=share,
        method=method, keep_samples=keep_samples,
    )
