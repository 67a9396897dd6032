"""The records output renders: plain tables and dicts, named as in :mod:`rope_leak.quantities`.

An analysis hands output one record (:meth:`rope_leak.Analysis.record`,
:meth:`rope_leak.SinkAnalysis.record`); figures, the report and the saved files are drawn
from it alone, so output never needs to know how an analysis computes its numbers. Every
output function also takes the analysis itself and asks it for its record:

>>> from rope_leak.output import plots
>>> fig = plots.share_heatmaps(analysis)           # doctest: +SKIP
>>> fig = plots.share_heatmaps(analysis.record())  # the same figure  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rope_leak.engine.statistics import RunStatistics
from rope_leak.quantities import column


@dataclass(frozen=True)
class HeadProfiles:
    """Every head's fitted ``M_abs`` profiles (causal mask, headline target):
    ``y ≈ a[i - j] + b[i] + c[j]``, with ``b`` and ``c`` centred."""

    offsets: np.ndarray  # [offset] the offsets d = i - j of a
    queries: np.ndarray  # [query] the query positions of b
    keys: np.ndarray  # [key] the key positions of c
    a: np.ndarray  # [layer, head, offset]
    b: np.ndarray  # [layer, head, query]
    c: np.ndarray  # [layer, head, key]
    n_tokens: int


@dataclass(frozen=True)
class CellMeans:
    """Every head's mean response per scored cell (causal mask, headline target); only
    for an analysis that kept per-cell sums (``cell_maps=True``)."""

    queries: np.ndarray  # [cell] query position i
    keys: np.ndarray  # [cell] key position j
    values: np.ndarray  # [layer, head, cell]
    n_tokens: int


@dataclass(frozen=True, repr=False)
class AnalysisRecord:
    """Everything output shows of one :class:`rope_leak.Analysis`.

    ``heads``: one row per head (``Analysis.heads()``); ``layers``: one row per layer and
    target (``Analysis.layers(t)`` for every target, with a ``target`` column);
    ``target_means``: one row per target, the debiased components' means over the
    non-degenerate heads with CIs; ``summary``: ``Analysis.summary()``.
    """

    target: str
    targets: tuple[str, ...]
    n_layers: int
    n_heads: int
    n_prompts: int
    ci_level: float
    sink_threshold: float
    summary: dict
    settings: dict
    metadata: dict
    heads: pd.DataFrame
    layers: pd.DataFrame
    target_means: pd.DataFrame
    diagnostics: pd.DataFrame
    position_zero: dict
    profiles: HeadProfiles
    cell_means: CellMeans | None = None
    #: the model fingerprint the analysis recorded (fills what a caller's provenance lacks)
    model: dict = field(default_factory=dict)
    #: the mergeable statistics, written as ``statistics.npz``; None: not saved
    statistics: RunStatistics | None = None

    def __repr__(self) -> str:
        return (f"AnalysisRecord(target={self.target!r}, {self.n_layers} layers x {self.n_heads} heads, "
                f"{self.n_prompts} prompts)")

    def layer_table(self, target: str | None = None) -> pd.DataFrame:
        """The rows of :attr:`layers` for one target (default: the headline target)."""
        target = target or self.target
        if target not in self.targets:
            raise ValueError(f"target must be one of {self.targets}, got {target!r}.")
        return self.layers[self.layers["target"] == target].reset_index(drop=True)

    def head_grid(self, column: str) -> np.ndarray:
        """A column of :attr:`heads` as a ``[layer, head]`` array."""
        return head_grid(self.heads, column, (self.n_layers, self.n_heads))

    def top_heads(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` heads with the largest debiased ``L_total``."""
        return top_heads_table(self.heads, self.target, k)


@dataclass(frozen=True, repr=False)
class SinkRecord:
    """Everything output shows of one :class:`rope_leak.SinkAnalysis`.

    ``heads``: one row per head (sink-reading relative change, key-0 fraction, flags,
    sink scores); ``trajectory_within``: per condition, position-0 token and depth, the
    cross-prompt spread among prompts sharing the token; ``trajectory_between``: per
    depth, the distance between different tokens' trajectories (causal mask).
    """

    summary: dict
    heads: pd.DataFrame
    trajectory_within: pd.DataFrame
    trajectory_between: pd.DataFrame
    reading_threshold: float
    source_token_id: int
    reading_prompts: int
    probe: pd.DataFrame | None = None
    probe_status: dict = field(default_factory=dict)
    bos_table: pd.DataFrame | None = None
    bos_status: dict = field(default_factory=dict)
    sink_metrics: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"SinkRecord({len(self.heads)} heads, {int(self.heads['sink_reading'].sum())} sink-reading)"

    def trajectory_table(self) -> pd.DataFrame:
        """``trajectory.csv``: the causal within-token spread beside the between-token distance."""
        causal = self.trajectory_within[self.trajectory_within["condition"] == "causal"]
        return causal.drop(columns="condition").merge(self.trajectory_between, on="depth")


def head_grid(table: pd.DataFrame, column: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """``table[column]`` (one row per head, with ``layer`` and ``head`` columns) as a
    ``[layer, head]`` array; heads without a row are NaN (False for a boolean column)."""
    layers, heads = table["layer"].to_numpy(), table["head"].to_numpy()
    shape = shape or (int(layers.max()) + 1, int(heads.max()) + 1)
    values = table[column].to_numpy()
    grid = np.zeros(shape, dtype=bool) if values.dtype == bool else np.full(shape, np.nan)
    grid[layers, heads] = values
    return grid


def top_heads_table(heads: pd.DataFrame, target: str, k: int = 10) -> pd.DataFrame:
    """The ``k`` rows of a heads table with the largest debiased ``L_total`` (its CI,
    q-value, components, the cross-fitted ``L_total`` of ``target`` and the sink score)."""
    total = column("L_total", "debiased")
    cols = ["label", total, "L_total_ci_low", "L_total_ci_high", "L_total_qvalue",
            column("L_resid", "debiased"), column("L_mask", "debiased"),
            f"{target}_{column('L_total', 'crossfit')}", "sink_score"]
    return heads.nlargest(k, total)[cols].reset_index(drop=True)


def as_analysis_record(analysis) -> AnalysisRecord:
    """``analysis`` itself when it is an :class:`AnalysisRecord`, else its ``record()``."""
    return _as_record(analysis, AnalysisRecord)


def as_sink_record(sinks) -> SinkRecord | None:
    """``sinks`` itself when it is a :class:`SinkRecord` (or None), else its ``record()``."""
    return None if sinks is None else _as_record(sinks, SinkRecord)


def _as_record(value, kind: type):
    if isinstance(value, kind):
        return value
    record = getattr(value, "record", None)
    if callable(record):
        value = record()
        if isinstance(value, kind):
            return value
    raise TypeError(f"expected a {kind.__name__} or an object whose record() returns one, got "
                    f"{type(value).__name__}. Fix: pass the analysis (or analysis.record()).")
