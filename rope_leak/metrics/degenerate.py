"""Degenerate heads: a pattern nearly constant on the scored pairs.

A sink head puts almost all its mass on key 0, which is not scored, so its pattern on
the scored cells is about 0 everywhere and its total sum of squares ``SST`` is about 0.
Its share ``dSS / SST`` is then a ratio of two tiny numbers: it can be -18 or -1639 and
says nothing. Such heads are flagged and left out of means, pools, colour scales and
compositions (listed, never hidden).

The floor: a head is degenerate when its per-prompt scored variance (``SST / N /
n_cells``) is below :data:`DEGENERATE_FLOOR` times the median over the heads of the
same target and condition.
"""

from __future__ import annotations

import numpy as np

DEGENERATE_FLOOR = 1e-3
"""Scored variance, relative to the median head's, below which a head is degenerate."""


def degenerate_heads(per_prompt_sst: np.ndarray, floor: float = DEGENERATE_FLOOR) -> np.ndarray:
    """``[layer, head]`` bool: scored variance below ``floor`` x the median head's (NaN
    or non-positive variance is degenerate too)."""
    sst = np.asarray(per_prompt_sst, dtype=float)
    finite = np.isfinite(sst) & (sst > 0)
    if not finite.any():
        return np.ones(sst.shape, dtype=bool)
    median = np.median(sst[finite])
    return ~finite | (sst < floor * median)
