"""Attention sinks: how much each head's queries attend to key 0.

Sink score of a head = mean over prompts and over queries ``i >= 1`` of ``A[i, 0]``
(accumulated by the engine). Gu et al. (ICLR 2025) use ``eps = 0.3`` as the threshold.
"""

from __future__ import annotations

import numpy as np

from rope_leak.engine.statistics import ConditionStatistics, PositionZeroStatistics

SINK_THRESHOLD = 0.3


def sink_scores(stats: ConditionStatistics) -> np.ndarray:
    """Mean attention to key 0, ``[layer, head]``."""
    return stats.sink_sum.sum(0) / stats.n_prompts


def sink_heads(scores: np.ndarray, threshold: float = SINK_THRESHOLD) -> list[tuple[int, int]]:
    """``(layer, head)`` of every head with sink score above ``threshold``."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"sink threshold must lie in [0, 1], got {threshold}.")
    return [(int(l), int(h)) for l, h in zip(*np.nonzero(scores > threshold))]


def position_zero_profile(stats: PositionZeroStatistics) -> dict[str, list[float]]:
    """Per layer (``resid_pre`` of each block, then the final ``resid_post``): the
    cross-prompt std of the position-0 residual stream, its largest absolute deviation
    across prompts, and its norm next to the mean norm of the other positions
    (massive activations)."""
    count = max(stats.count, 1)
    return {
        "std": stats.std().tolist(),
        "max_abs_deviation": (stats.max_abs_dev if stats.max_abs_dev is not None else np.array([])).tolist(),
        "norm_position_zero": (stats.norm_sum / count).tolist() if stats.norm_sum is not None else [],
        "norm_other_positions": (stats.other_norm_sum / count).tolist() if stats.other_norm_sum is not None else [],
    }
