"""Benjamini–Hochberg false discovery rate control across heads.

Uses ``scipy.stats.false_discovery_control`` (scipy >= 1.11) for the BH-adjusted p-values
(q-values). A head is significant when its q-value is <= ``level``: that controls the
expected share of false discoveries among the heads declared significant at ``level``
(under independence or positive dependence of the per-head p-values). Heads with NaN
p-values (e.g. a constant response) are left out of the family and get q = NaN, not
significant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import false_discovery_control


@dataclass
class FDRResult:
    """``qvalues`` and ``significant`` have the p-values' shape (e.g. ``[layer, head]``)."""

    qvalues: np.ndarray
    significant: np.ndarray
    level: float
    method: str

    @property
    def n_significant(self) -> int:
        return int(self.significant.sum())


def benjamini_hochberg(pvalues: np.ndarray, level: float = 0.05, method: str = "bh") -> FDRResult:
    """BH (``method="bh"``) or Benjamini–Yekutieli (``"by"``, any dependence) across all
    entries of ``pvalues``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    p = np.asarray(pvalues, dtype=float)
    finite = np.isfinite(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise ValueError("p-values must lie in [0, 1].")
    q = np.full(p.shape, np.nan)
    if finite.any():
        q[finite] = false_discovery_control(p[finite], method=method)
    with np.errstate(invalid="ignore"):
        significant = np.where(finite, q <= level, False)
    return FDRResult(q, significant, level, method)
