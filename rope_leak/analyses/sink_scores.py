"""Attention sinks: how much each head's queries attend to key 0, by two named metrics.

* **Gu et al. (ICLR 2025), "When Attention Sink Emerges in Language Models"**: for key
  ``k``, ``alpha_k = (1 / (T - k)) * sum_{i >= k} A[i, k]`` over a prompt of ``T`` tokens
  (query ``i = k`` included). For key 0 under the causal mask ``A[0, 0] = 1``, so
  ``alpha_0 = (1 + sum_{i >= 1} A[i, 0]) / T``. A head is a sink head when ``alpha_0 > eps``
  with ``eps = 0.3``; the *sink ratio* is the fraction of all heads (over layers and heads)
  that are sink heads. ``alpha_0`` is linear in the pattern, so its mean over prompts is
  computed exactly from the engine's sums; the ratio thresholds that mean.
* **rope_leak's sink score** (:func:`sink_scores`): the mean over prompts and over queries
  ``i >= 1`` of ``A[i, 0]`` (query 0, which has nothing else to attend to, left out). It is
  a different metric: ``alpha_0 = (1 + (T - 1) * score) / T``, so ``alpha_0 > score`` always
  and the two give different sink heads near the threshold. rope_leak applies Gu et al.'s
  ``eps = 0.3`` to it as a convention of its own.

Both are defined for the causal mask only (``alpha_0`` needs ``A[0, 0] = 1``).
"""

from __future__ import annotations

import numpy as np

from rope_leak.engine.statistics import ConditionStatistics, PositionZeroStatistics

SINK_THRESHOLD = 0.3
GU_EPSILON = 0.3
GU_SOURCE = "Gu et al., When Attention Sink Emerges in Language Models: An Empirical View (ICLR 2025)"
GU_DEFINITION = ("alpha_0 = (1/T) * sum over queries i >= 0 of A[i, 0] (query 0 included), mean over "
                 "prompts; sink head: alpha_0 > eps = 0.3; sink ratio: fraction of all heads that are "
                 "sink heads")
SCORE_DEFINITION = ("rope_leak sink score = mean over prompts and queries i >= 1 of A[i, 0] (query 0 "
                    "left out; not Gu et al.'s alpha_0); sink head: score > 0.3, the eps of Gu et al. "
                    "applied by convention to this different score")


def sink_scores(stats: ConditionStatistics) -> np.ndarray:
    """rope_leak's sink score, ``[layer, head]``: mean over prompts of the mean over queries
    ``i >= 1`` of ``A[i, 0]`` (see the module docstring)."""
    return stats.sink_sum.sum(0) / stats.n_prompts


def gu_alpha0(stats: ConditionStatistics, n_tokens: int | None = None) -> np.ndarray:
    """Gu et al.'s ``alpha_0`` per head, ``[layer, head]``, mean over prompts of ``T`` tokens.

    Exact under the causal mask (``A[0, 0] = 1``): ``alpha_0 = (1 + (T - 1) * score) / T``
    prompt by prompt, and the map is linear, so it holds for the mean over prompts too.
    """
    if n_tokens is None:
        n_tokens = next(iter(stats.targets.values())).design.n_tokens
    if n_tokens < 2:
        raise ValueError(f"alpha_0 needs prompts of at least 2 tokens, got {n_tokens}.")
    return alpha0_from_score(sink_scores(stats), n_tokens)


def alpha0_from_score(score: np.ndarray, n_tokens: int) -> np.ndarray:
    """``alpha_0 = (1 + (T - 1) * score) / T`` (causal mask, ``A[0, 0] = 1``)."""
    return (1.0 + (n_tokens - 1) * np.asarray(score, dtype=float)) / n_tokens


def gu_alpha_from_pattern(pattern: np.ndarray, k: int = 0) -> np.ndarray:
    """``alpha_k`` straight from patterns ``[..., query, key]`` (a reference for tests and
    notebooks): ``(1 / (T - k)) * sum_{i >= k} A[i, k]``."""
    pattern = np.asarray(pattern, dtype=float)
    n = pattern.shape[-1]
    if not 0 <= k < n:
        raise ValueError(f"key k={k} is outside 0..{n - 1}.")
    return pattern[..., k:, k].sum(-1) / (n - k)


def gu_sink_ratio(alpha0: np.ndarray, epsilon: float = GU_EPSILON) -> float:
    """Gu et al.'s sink ratio: fraction of all heads with ``alpha_0 > epsilon``."""
    if not 0 <= epsilon <= 1:
        raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}.")
    return float((np.asarray(alpha0) > epsilon).mean())


def sink_metrics(stats: ConditionStatistics, threshold: float = SINK_THRESHOLD,
                 epsilon: float = GU_EPSILON) -> dict:
    """Both metrics by name, for ``sinks.json`` / ``results.json``."""
    n_tokens = next(iter(stats.targets.values())).design.n_tokens
    score = sink_scores(stats)
    alpha = gu_alpha0(stats, n_tokens)
    label = lambda mask: [f"L{l}H{h}" for l, h in zip(*np.nonzero(mask))]  # noqa: E731
    return {
        "gu_et_al_2025": {
            "source": GU_SOURCE, "definition": GU_DEFINITION, "epsilon": epsilon,
            "epsilon_source": GU_SOURCE, "n_tokens": int(n_tokens),
            "sink_ratio": gu_sink_ratio(alpha, epsilon),
            "sink_heads": label(alpha > epsilon), "n_heads": int(alpha.size),
            "alpha0": alpha.tolist(),
        },
        "rope_leak_sink_score": {
            "definition": SCORE_DEFINITION, "threshold": threshold,
            "threshold_source": f"the eps of {GU_SOURCE}, applied by convention",
            "sink_heads": label(score > threshold), "n_heads": int(score.size),
            "score": score.tolist(),
        },
    }


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
