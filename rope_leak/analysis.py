"""The main analysis: stream a corpus under the causal and bidirectional masks, fit every
head's absolute-position share for each target, and decompose it.

``analyze(model, corpus)`` returns an :class:`Analysis` whose tables are pandas
DataFrames and whose ``save(out_dir)`` writes ``results.json``, ``heads.csv``,
``layers.csv``, the merged-able ``statistics.npz`` and ``report.html``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
from torch import Tensor
from transformer_lens import HookedTransformer

from rope_leak.engine.pairs import PairSpec
from rope_leak.engine.run import DEFAULT_BUCKETS, run_statistics
from rope_leak.engine.statistics import TARGETS, RunStatistics
from rope_leak.metrics.decomposition import Decomposition
from rope_leak.metrics.shares import ShareFit, fit_shares
from rope_leak.metrics.sinks import SINK_THRESHOLD, position_zero_profile, sink_heads, sink_scores
from rope_leak.metrics.split import AblationFreeSplit, ablation_free_split

REPORTED_TARGETS = ("pattern", "log_pattern", "scores")
CONDITIONS = ("causal", "bidirectional")


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


@dataclass
class Analysis:
    """Fitted shares, decomposition and sinks of one model on one corpus."""

    statistics: RunStatistics
    target: str = "pattern"
    sink_threshold: float = SINK_THRESHOLD
    fits: dict[tuple[str, str], ShareFit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target not in REPORTED_TARGETS:
            raise ValueError(f"target must be one of {REPORTED_TARGETS}, got {self.target!r}.")
        missing = set(CONDITIONS) - set(self.statistics.conditions)
        if missing:
            raise ValueError(f"statistics lack the conditions {sorted(missing)}.")
        for condition in CONDITIONS:
            for target, stats in self.statistics.conditions[condition].targets.items():
                if (condition, target) not in self.fits:
                    self.fits[condition, target] = fit_shares(stats)

    # -- building blocks -----------------------------------------------------------
    @property
    def targets(self) -> list[str]:
        available = self.statistics.conditions["causal"].targets
        return [t for t in REPORTED_TARGETS if t in available]

    @property
    def n_layers(self) -> int:
        return self.fits["causal", self.target].share.shape[0]

    @property
    def n_heads(self) -> int:
        return self.fits["causal", self.target].share.shape[1]

    @property
    def n_prompts(self) -> int:
        return self.statistics.conditions["causal"].n_prompts

    def decomposition(self, target: str | None = None) -> Decomposition:
        target = target or self.target
        return Decomposition.from_fits(self.fits["causal", target], self.fits["bidirectional", target])

    @cached_property
    def _split(self) -> AblationFreeSplit:
        return ablation_free_split(self.statistics.conditions["causal"])

    def split(self) -> AblationFreeSplit:
        """The ablation-free split of the causal run (see :mod:`rope_leak.metrics.split`)."""
        return self._split

    def sink_scores(self, condition: str = "causal") -> np.ndarray:
        return sink_scores(self.statistics.conditions[condition])

    def sink_heads(self) -> list[tuple[int, int]]:
        return sink_heads(self.sink_scores(), self.sink_threshold)

    def position_zero(self) -> dict[str, dict[str, list[float]]]:
        return {c: position_zero_profile(s.position_zero) for c, s in self.statistics.conditions.items()}

    # -- tables --------------------------------------------------------------------
    def heads(self) -> pd.DataFrame:
        """One row per head: components for every target, R² of every model, sinks."""
        layers, heads = np.meshgrid(np.arange(self.n_layers), np.arange(self.n_heads), indexing="ij")
        table = pd.DataFrame({
            "layer": layers.ravel(),
            "head": heads.ravel(),
            "label": [head_label(l, h) for l, h in zip(layers.ravel(), heads.ravel())],
        })
        for target in self.targets:
            dec = self.decomposition(target)
            table[f"{target}_L_total"] = dec.total.ravel()
            table[f"{target}_L_resid"] = dec.resid.ravel()
            table[f"{target}_L_mask"] = dec.mask.ravel()
            for condition in CONDITIONS:
                fit = self.fits[condition, target]
                prefix = f"{target}_{condition}"
                table[f"{prefix}_r2_rel"] = fit.r2_rel.ravel()
                table[f"{prefix}_r2_abs"] = fit.r2_abs.ravel()
                if fit.r2_cell is not None:
                    table[f"{prefix}_r2_cell"] = fit.r2_cell.ravel()
        split = self.split()
        table["split_ss_log_pattern"] = split.log_pattern.ravel()
        table["split_ss_scores"] = split.scores.ravel()
        table["split_ss_denominator"] = split.denominator.ravel()
        table["split_ss_cross"] = split.cross.ravel()
        table["sink_score"] = self.sink_scores("causal").ravel()
        table["sink_score_bidirectional"] = self.sink_scores("bidirectional").ravel()
        table["sink_head"] = table["sink_score"] > self.sink_threshold
        table["additivity_violated"] = self.decomposition().additivity_violated().ravel()
        return table

    def layers(self, target: str | None = None) -> pd.DataFrame:
        table = self.decomposition(target).layer_table()
        table.insert(1, "target", target or self.target)
        table["sink_heads"] = (self.sink_scores() > self.sink_threshold).sum(1)
        split = self.split()
        table["split_ss_scores"] = split.scores.sum(1)
        table["split_ss_denominator"] = split.denominator.sum(1)
        table["split_ss_cross"] = split.cross.sum(1)
        table["split_composition"] = split.layer_composition()
        return table

    def top_heads(self, k: int = 10) -> pd.DataFrame:
        col = f"{self.target}_L_total"
        cols = ["label", col, f"{self.target}_L_resid", f"{self.target}_L_mask", "sink_score"]
        return self.heads().nlargest(k, col)[cols].reset_index(drop=True)

    def summary(self) -> dict:
        out = {"target": self.target, "n_prompts": self.n_prompts}
        out.update(self.decomposition().summary())
        out["by_target"] = {t: self.decomposition(t).summary() for t in self.targets}
        out["ablation_free_split"] = self.split().summary()
        out["top_heads"] = self.top_heads(5)["label"].tolist()
        out["sink_heads"] = [head_label(l, h) for l, h in self.sink_heads()]
        pz = self.position_zero()
        out["position_zero_max_std"] = {c: float(np.max(p["std"])) for c, p in pz.items()}
        return out


def analyze(
    model: HookedTransformer,
    tokens: Tensor,
    *,
    target: str = "pattern",
    spec: PairSpec = PairSpec(),
    batch_size: int = 8,
    n_buckets: int = DEFAULT_BUCKETS,
    sink_threshold: float = SINK_THRESHOLD,
    progress: bool = True,
    prompt_ids=None,
    metadata: dict | None = None,
    checkpoint=None,
    checkpoint_every: int = 0,
    checkpoint_seconds: float = 0.0,
) -> Analysis:
    """Run the full decomposition of ``model`` on ``tokens`` (``[prompt, pos]``).

    One forward pass per batch and condition (causal, bidirectional) accumulates all
    targets at once; see :func:`rope_leak.engine.run.run_statistics` (also for
    ``prompt_ids`` and the resumable ``checkpoint``).
    """
    if target not in REPORTED_TARGETS:
        raise ValueError(f"target must be one of {REPORTED_TARGETS}, got {target!r}.")
    if len(tokens) < 4:
        raise ValueError(
            f"{len(tokens)} prompts are too few to cross-fit over two halves of the prompts. "
            "Fix: use at least 4 prompts (64 recommended)."
        )
    stats = run_statistics(
        model, tokens, targets=TARGETS, spec=spec, batch_size=batch_size, n_buckets=n_buckets,
        progress=progress, prompt_ids=prompt_ids, metadata=metadata, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds,
    )
    return Analysis(stats, target=target, sink_threshold=sink_threshold)
