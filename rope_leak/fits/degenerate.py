"""Degenerate heads: a pattern nearly constant on the scored pairs.

A sink head puts almost all its mass on key 0, which is not scored, so its pattern on
the scored cells is about 0 everywhere and its total sum of squares ``SST`` is about 0.
Its share ``dSS / SST`` is then a ratio of two tiny numbers: it can be -18 or -1639 and
says nothing. Such heads are flagged and left out of means, pools, colour scales and
compositions (listed, never hidden).

The floor: a head is degenerate when its per-prompt scored variance (``SST / N``) over
all prompts, or over either cross-fitting fold (each fold's own ``SST`` is the
cross-fitted share's denominator), is below :data:`DEGENERATE_FLOOR` times the median
over the heads of the same target and condition.
"""

from __future__ import annotations

import numpy as np

DEGENERATE_FLOOR = 1e-3
"""Scored variance, relative to the median head's, below which a head is degenerate."""


def degenerate_heads(per_prompt_sst: np.ndarray, floor: float = DEGENERATE_FLOOR,
                     fold_sst: np.ndarray | None = None) -> np.ndarray:
    """``[layer, head]`` bool: scored variance below ``floor`` x the median head's, over
    all prompts or (``fold_sst``, ``[fold, layer, head]``) in either fold; NaN or
    non-positive variance is degenerate too."""
    sst = np.asarray(per_prompt_sst, dtype=float)
    finite = np.isfinite(sst) & (sst > 0)
    if not finite.any():
        return np.ones(sst.shape, dtype=bool)
    lowest = sst if fold_sst is None else np.minimum(sst, np.nanmin(fold_sst, axis=0))
    median = np.median(sst[finite])
    return ~finite | ~np.isfinite(lowest) | (lowest < floor * median)


def fold_scored_variance(projection) -> np.ndarray:
    """``[fold, layer, head]`` per-prompt scored variance of each cross-fitting fold (bucket
    parity) of a :class:`~rope_leak.fits.projection.BucketProjection`."""
    parity = np.arange(projection.n_buckets) % 2
    out = []
    for fold in (0, 1):
        weights = (parity == fold).astype(float)[None] * (projection.count > 0)
        out.append(projection.per_prompt_sst(weights)[0] if weights.any() else
                   np.full(projection.head_shape, np.nan))
    return np.stack(out)
