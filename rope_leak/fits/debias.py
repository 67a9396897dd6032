"""A share whose estimator is unbiased under noise.

The cross-fitted share of :func:`rope_leak.fits.shares.fit_shares` is
``N_b (2 <Dc_a, Dc_b> - ||Dc_a||²) / SST_b`` per direction (``D = H_abs - H_rel``,
``c_f`` the cell means of fold ``f``). With prompt-level noise of covariance ``Σ`` its
numerator has expectation ``||Dμ||² - tr(DΣ) / N_a`` per prompt: it is biased low by the
noise that ``M_abs``'s ~2n extra parameters absorb, which is what made small samples
come out negative at small prompt counts.

The debiased share removes that term exactly, with a U-statistic over prompt buckets.
Buckets are independent (prompts are), so for bucket sums ``S_g`` of ``m_g`` prompts
``E <D S_g, D S_h> = m_g m_h ||Dμ||²`` for ``g != h``; hence

    ``θ = (||Σ_g D S_g||² - Σ_g ||D S_g||²) / (N² - Σ_g m_g²)``

is unbiased for ``||Dμ||²`` whatever the within-prompt correlation of the noise (only
the within-bucket products, which carry ``tr(DΣ)``, are left out). The debiased share is
``θ / (SST / N)``: the absolute-position sum of squares of the population cell means
over the per-prompt total sum of squares, i.e. the population ``dR2`` as ``P -> ∞`` of
the cross-fitted share. Its numerator has mean exactly 0 for a purely relative head;
the ratio is consistent and, in the simulations of tests/inference/test_stats.py, mean-zero
within error at P = 16, 32, 64 under the null. It can be negative (noise); do not clip.
"""

from __future__ import annotations

import numpy as np

from rope_leak.engine.statistics import TargetStatistics
from rope_leak.fits.projection import BucketProjection


def debiased_share(stats: TargetStatistics) -> np.ndarray:
    """Unbiased-numerator absolute-position share of every head, ``[layer, head]``."""
    return BucketProjection.from_statistics(stats).debiased_share()[0]


def crossfit_bias(stats: TargetStatistics) -> np.ndarray:
    """Estimated bias of the cross-fitted share, ``[layer, head]``: the average over both
    directions of ``-N_b tr(DΣ) / (N_a SST_b)`` per prompt, with ``tr(DΣ)`` estimated from
    the spread of bucket sums around the pooled mean (unbiased for it)."""
    bp = BucketProjection.from_statistics(stats)
    m = bp.count
    nonempty = m > 0
    z, n = bp.z[nonempty], m[nonempty]
    if len(n) < 2:
        raise ValueError("the bias estimate needs prompts in at least two buckets.")
    mean = z.sum(0) / n.sum()  # pooled per-prompt mean of D y
    # E ||z_g - m_g mean||² = m_g (1 - m_g / N) tr(DΣ)
    resid = ((z - n[:, None, None, None] * mean) ** 2).sum(-1).sum(0)
    trace = resid / (n * (1 - n / n.sum())).sum()
    out = 0.0
    for a, b in ((0, 1), (1, 0)):
        na, nb = m[a::2].sum(), m[b::2].sum()
        sst_b = bp.sumsq[b::2].sum(0) - bp.total[b::2].sum(0) ** 2 / (nb * bp.n_cells)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = out + np.where(sst_b > 0, -nb * trace / (na * sst_b), np.nan)
    return out / 2

