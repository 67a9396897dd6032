"""The ablation-free split: no mask swap, the model stays in distribution.

Since ``log A_ij = s_ij - log Z_i``, and the projection ``P = H_abs - H_rel`` onto what
needs absolute position is linear, the absolute-position part of ``log_pattern`` is
the sum of that of the scores (which RoPE lets carry absolute position only through
the residual stream) and that of ``-log Z_i`` (the causal softmax denominator):

    SS(log A) = SS(s) + SS(-log Z) + 2 <P s, P (-log Z)>

Each sum of squares is cross-fitted: ``SS(y) = <P ybar_even, P ybar_odd>`` (cell means
of the two prompt halves), whose noise terms are independent, so it estimates the
population ``||P mu||^2`` without the upward bias of an in-sample sum of squares. The
bilinear form keeps the identity exact; it is checked numerically on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rope_leak.engine.statistics import CellStatistics, ConditionStatistics
from rope_leak.metrics.shares import absolute_projection

SPLIT_TARGETS = ("log_pattern", "scores", "neg_log_z")


def _fold_projections(stats: CellStatistics) -> tuple[np.ndarray, np.ndarray]:
    counts = stats.fold_count
    if counts.min() < 1:
        raise ValueError("the ablation-free split needs prompts in both folds (>= 2 prompts).")
    means = [stats.cell_sum[f] / counts[f] for f in (0, 1)]
    return tuple(absolute_projection(stats.design, m) for m in means)


def _cross(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Symmetrised cross-fold inner product ``(<a_0, b_1> + <a_1, b_0>) / 2``."""
    return 0.5 * ((a[0] * b[1]).sum(-1) + (a[1] * b[0]).sum(-1))


@dataclass
class AblationFreeSplit:
    """Absolute-position sums of squares per head, ``[layer, head]`` (cross-fitted)."""

    log_pattern: np.ndarray
    scores: np.ndarray  # residual-stream part
    denominator: np.ndarray  # causal-mask part (-log Z_i)
    cross: np.ndarray  # 2 <P s, P (-log Z)>
    n_cells: int

    @property
    def identity_error(self) -> float:
        """Largest ``|SS(log A) - SS(s) - SS(-log Z) - cross|`` relative to ``SS(log A)``."""
        gap = np.abs(self.log_pattern - self.scores - self.denominator - self.cross)
        scale = np.abs(self.log_pattern).max()
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
    def composition_of(denominator: np.ndarray, scores: np.ndarray) -> float:
        """Mask share of the two pure parts, ``sum SS(-log Z) / sum (SS(-log Z) + SS(s))``
        over heads (the cross term is reported beside it, not apportioned)."""
        total = float(np.nansum(denominator) + np.nansum(scores))
        return float(np.nansum(denominator)) / total if total != 0 else float("nan")

    def composition(self) -> float:
        return self.composition_of(self.denominator, self.scores)

    def layer_composition(self) -> np.ndarray:
        return np.array([self.composition_of(d, s) for d, s in zip(self.denominator, self.scores)])

    def summary(self) -> dict:
        return {
            "ss_log_pattern": float(self.log_pattern.sum()),
            "ss_scores": float(self.scores.sum()),
            "ss_denominator": float(self.denominator.sum()),
            "ss_cross": float(self.cross.sum()),
            "composition": self.composition(),
            "composition_aggregation": "sum over heads of SS(-log Z) / sum of (SS(-log Z) + SS(scores))",
            "identity_max_relative_error": self.identity_error,
        }


def ablation_free_split(stats: ConditionStatistics) -> AblationFreeSplit:
    """Split the causal run's ``log_pattern`` absolute-position SS into its two sources."""
    missing = [t for t in SPLIT_TARGETS if t not in stats.targets]
    if missing:
        raise ValueError(
            f"the ablation-free split needs targets {SPLIT_TARGETS}; missing {missing}. "
            "Fix: accumulate all targets (the default of run_statistics)."
        )
    log_a, s, z = (_fold_projections(stats.targets[t]) for t in SPLIT_TARGETS)
    return AblationFreeSplit(
        log_pattern=_cross(log_a, log_a),
        scores=_cross(s, s),
        denominator=_cross(z, z),
        cross=_cross(s, z) + _cross(z, s),
        n_cells=stats.targets["scores"].design.n_cells,
    )
