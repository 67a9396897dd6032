"""Split each head's absolute-position share into a causal-mask and a residual-stream part.

``L_total`` = share under the model's own causal mask; ``L_resid`` = share with every
layer's mask swapped for a bidirectional one (same weights, same causal pairs scored);
``L_mask = L_total - L_resid``. Composition = ``L_mask / (L_mask + L_resid)`` aggregated
over heads as a ratio of sums (= ratio of mean components), per layer and per model.
Heads with ``L_mask < 0`` violate the additivity the split assumes; they are flagged,
never clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rope_leak.fits.shares import ShareFit


@dataclass
class Decomposition:
    """Per-head components, ``[layer, head]``."""

    total: np.ndarray
    resid: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.total - self.resid

    @classmethod
    def from_fits(cls, causal: ShareFit, bidirectional: ShareFit) -> Decomposition:
        return cls(total=causal.share, resid=bidirectional.share)

    @staticmethod
    def composition_of(mask: np.ndarray, resid: np.ndarray) -> float:
        """Ratio of sums ``sum L_mask / sum (L_mask + L_resid)``; nan when the denominator is 0."""
        denominator = float(np.nansum(mask) + np.nansum(resid))
        return float(np.nansum(mask)) / denominator if denominator != 0 else float("nan")

    def composition(self) -> float:
        return self.composition_of(self.mask, self.resid)

    def layer_composition(self) -> np.ndarray:
        return np.array([self.composition_of(m, r) for m, r in zip(self.mask, self.resid)])

    def additivity_violated(self) -> np.ndarray:
        """Heads whose bidirectional share exceeds the causal one (``L_mask < 0``)."""
        return self.mask < 0

    def layer_table(self) -> pd.DataFrame:
        return pd.DataFrame({
            "layer": np.arange(self.total.shape[0]),
            "L_total": self.total.mean(1),
            "L_resid": self.resid.mean(1),
            "L_mask": self.mask.mean(1),
            "composition": self.layer_composition(),
            "heads_additivity_violated": self.additivity_violated().sum(1),
        })

    def summary(self) -> dict:
        violated = self.additivity_violated()
        return {
            "L_total": float(self.total.mean()),
            "L_resid": float(self.resid.mean()),
            "L_mask": float(self.mask.mean()),
            "composition": self.composition(),
            "composition_aggregation": "sum over heads of L_mask / sum over heads of (L_mask + L_resid)",
            "heads_additivity_violated": int(violated.sum()),
            "additivity_violated": bool(self.mask.mean() < 0),
        }
