"""The sinks analysis: sink heads (two named metrics), the BOS status and the position-0
stream by token, the position-0 trajectory, sink-reading heads, the fingerprint probe and
the BOS-intervention table, in one call.

``analyze_sinks(model, tokens)`` returns a :class:`SinkAnalysis`; its ``save(out_dir)``
(:func:`rope_leak.output.results.save_sinks`) writes ``sinks.json``, ``sink_heads.csv``,
``trajectory.csv``, ``probe.csv``, ``bos_interventions.csv`` and ``sinks.html``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from rope_leak.analyses.bos_interventions import (
    BosInterventions,
    bos_interventions,
    default_replacement_token,
)
from rope_leak.analyses.bos_status import bos_status as measure_bos_status
from rope_leak.analyses.fingerprint import bag_of_tokens, fingerprint, probe_table
from rope_leak.analyses.sink_reading import SINK_READING_THRESHOLD, SinkReading, sink_reading
from rope_leak.analyses.sink_scores import (
    SINK_THRESHOLD,
    position_zero_profile,
    sink_heads,
    sink_metrics,
    sink_scores,
)
from rope_leak.analyses.trajectory import Trajectories, position_zero_trajectories
from rope_leak.display import Displayable
from rope_leak.engine.run import default_buckets, run_statistics
from rope_leak.engine.statistics import RunStatistics
from rope_leak.heads import head_label
from rope_leak.interventions.mask import bidirectional
from rope_leak.output.bos_text import bos_label
from rope_leak.output.records import SinkRecord
from rope_leak.output.results import save_sinks


@dataclass(repr=False)
class SinkAnalysis(Displayable):
    """Sink heads, BOS status, position-0 trajectories, sink reading, fingerprint probe and
    BOS interventions of one model (:func:`analyze_sinks`).

    >>> sinks = rl.analyze_sinks(model, corpus.tokens)   # doctest: +SKIP
    >>> sinks.heads()                                     # one row per head  # doctest: +SKIP
    >>> sinks.save("out/")                                # sinks.json, sinks.html, ...  # doctest: +SKIP
    """

    sink_scores: np.ndarray  # [layer, head], rope_leak's score (mean over i >= 1 of A[i, 0])
    sink_threshold: float
    position_zero: dict  # causal / bidirectional profiles (std, norms)
    trajectory: Trajectories
    trajectory_bidirectional: Trajectories
    reading: SinkReading
    probe: pd.DataFrame | None
    fingerprint_spread: pd.DataFrame | None
    bos_interventions: BosInterventions | None
    settings: dict = field(default_factory=dict)
    n_boot: int = 200
    sink_metrics: dict = field(default_factory=dict)  # both metrics by name (analyses.sink_scores.sink_metrics)
    bos_status: dict = field(default_factory=dict)  # analyses.bos_status.bos_status
    probe_status: dict = field(default_factory=dict)  # {"run": bool, "reason": str, "target": ...}

    def sink_heads(self) -> list[tuple[int, int]]:
        return sink_heads(self.sink_scores, self.sink_threshold)

    def _display_items(self):
        scores = np.asarray(self.sink_scores)
        l, h = np.unravel_index(np.nanargmax(scores), scores.shape)
        gu = self.sink_metrics.get("gu_et_al_2025", {})
        items = [("bos", bos_label(self.bos_status)),
                 ("sink_heads", f"{len(self.sink_heads())} of {scores.size} (score > {self.sink_threshold})"),
                 ("top_sink", f"{head_label(l, h)} {scores[l, h]:.3f}")]
        if "sink_ratio" in gu:
            items.append(("sink_ratio_gu", gu["sink_ratio"]))
        items += [("sink_reading_heads", len(self.reading.heads())),
                  ("probe", "run" if self.probe_status.get("run") else "not run"),
                  ("bos_interventions", "not run" if self.bos_interventions is None
                   else self.bos_interventions.replacements)]
        return items

    def heads(self) -> pd.DataFrame:
        table = self.reading.table(sink_scores=self.sink_scores, n_boot=self.n_boot)
        table["sink_head"] = table["sink_score"] > self.sink_threshold
        gu = self.sink_metrics.get("gu_et_al_2025")
        if gu:
            table["alpha0_gu"] = np.asarray(gu["alpha0"]).ravel()
            table["sink_head_gu"] = table["alpha0_gu"] > gu["epsilon"]
        return table

    def bos_table(self) -> pd.DataFrame | None:
        return None if self.bos_interventions is None else self.bos_interventions.table()

    def record(self) -> SinkRecord:
        """The plain tables and dicts that output renders (figures, pages, saved files)."""
        within = pd.concat([t.within_token_spread().assign(condition=t.condition)
                            for t in (self.trajectory, self.trajectory_bidirectional)], ignore_index=True)
        return SinkRecord(
            summary=self.summary(), heads=self.heads(), trajectory_within=within,
            trajectory_between=self.trajectory.between_token_distance(),
            reading_threshold=self.reading.threshold, source_token_id=self.reading.source_token_id,
            reading_prompts=self.reading.n_prompts, probe=self.probe, probe_status=self.probe_status,
            bos_table=self.bos_table(), bos_status=self.bos_status, sink_metrics=self.sink_metrics)

    def save(self, out_dir: str | Path, *, provenance: dict | None = None, overwrite: bool = False) -> Path:
        """Write the sink result files (:data:`rope_leak.output.results.SINK_FILES`) into ``out_dir``."""
        return save_sinks(self.record(), out_dir, provenance=provenance, overwrite=overwrite)

    def summary(self) -> dict:
        out = {
            "sink_threshold": self.sink_threshold,
            "sink_heads": [f"L{l}H{h}" for l, h in self.sink_heads()],
            "sink_metrics": self.sink_metrics,
            "bos_status": self.bos_status,
            "sink_reading": self.reading.to_dict(),
            "trajectory": self.trajectory.to_dict(),
            "trajectory_bidirectional": self.trajectory_bidirectional.to_dict(),
            "position_zero": self.position_zero,
            "probe_status": self.probe_status,
            "settings": self.settings,
        }
        if self.probe is not None:
            out["probe"] = self.probe.to_dict(orient="records")
        if self.bos_interventions is not None:
            out["bos_interventions"] = self.bos_interventions.table().to_dict(orient="records")
        return out


def content_targets(tokens: Tensor, doc_ids: list | None = None) -> tuple[np.ndarray, str]:
    """What the fingerprint probe predicts, and its name: the one-hot document of each
    prompt (``"document"``) when some document holds at least two prompts, else
    :func:`bag_of_tokens` of 20 tokens (``"bag_of_tokens"``)."""
    if doc_ids is not None:
        ids, inverse, counts = np.unique(np.asarray(doc_ids), return_inverse=True, return_counts=True)
        if len(ids) >= 2 and counts.max() >= 2:
            return np.eye(len(ids))[inverse][:, counts >= 2], "document"
    return bag_of_tokens(tokens, k=20)[0], "bag_of_tokens"


def analyze_sinks(
    model: HookedTransformer,
    tokens: Tensor,
    *,
    statistics: RunStatistics | None = None,
    bos_status: dict | None = None,
    sink_threshold: float = SINK_THRESHOLD,
    reading_threshold: float = SINK_READING_THRESHOLD,
    source_token_id: int | None = None,
    doc_ids: list | None = None,
    trajectory_tokens: list[int] | None = None,
    reading_prompts: int = 8,
    early_queries: int = 32,
    run_bos_interventions: bool = True,
    bos_bidirectional: bool = False,
    bos_tokens: Tensor | None = None,
    probe: bool = True,
    n_boot: int = 200,
    n_permutations: int = 100,
    batch_size: int = 8,
    progress: bool = True,
) -> SinkAnalysis:
    """Sink heads, BOS status, position-0 trajectory, sink reading, fingerprint probe and BOS
    interventions on ``tokens`` (``[prompt, pos]``).

    Args:
        statistics: the causal / bidirectional statistics of a main analysis
            (``Analysis.statistics``, possibly over more prompts): sink scores and the
            position-0 profiles are read from them instead of running both masks again.
        bos_status: :func:`rope_leak.analyses.bos_status.bos_status` of the main analysis
            (default: measured here on ``tokens``).
        source_token_id: the other position-0 token used by sink reading and the ``token``
            BOS replacement (default: the prompts' most common token).
        trajectory_tokens: position-0 tokens put on 2 prompts each to compare trajectories
            (default: the prompts' own position-0 token, the source token and the prompts'
            second most common token). The within-token deviation of *these* groups is the
            closed-system property checked, not a property of the corpus: the corpus'
            own grouping is in ``bos_status``.
        doc_ids: document of each prompt. The fingerprint probe runs only when some
            document holds at least two prompts (it then predicts the document, one-hot)
            and there are at least 10 prompts; otherwise it is not run and
            ``probe_status["reason"]`` says why.
        reading_prompts: prompts used for sink reading (it reruns every layer).
        early_queries: BOS interventions score queries ``i < early_queries`` and run only the
            first ``early_queries`` tokens of each prompt.
        bos_bidirectional: also run the BOS interventions under the bidirectional ablation
            (full-length prompts; about six times the cost of the default).
        bos_tokens: prompts for the BOS interventions (default ``tokens``). They run only
            the first ``early_queries`` tokens, so more prompts cost little there.
        progress: progress bars for every step that makes forward passes (statistics, BOS
            interventions, trajectories, sink reading, fingerprint and probe); False hides them.
    """
    source = default_replacement_token(tokens) if source_token_id is None else int(source_token_id)
    if statistics is None:
        statistics = run_statistics(model, tokens, targets=("pattern",), batch_size=batch_size,
                                    n_buckets=default_buckets(len(tokens)), progress=progress,
                                    start_cut_window=None)
    causal_stats = statistics.conditions["causal"]
    bos_result = None
    if run_bos_interventions:
        bos_prompts = tokens if bos_tokens is None else bos_tokens
        bos_result = bos_interventions(model, bos_prompts, token_id=source, n_boot=n_boot,
                                       early_queries=min(early_queries, tokens.shape[1]),
                                       bidirectional=bos_bidirectional, batch_size=batch_size,
                                       n_buckets=default_buckets(len(bos_prompts)),
                                       progress=progress)
    if trajectory_tokens is None:
        trajectory_tokens = default_trajectory_tokens(tokens, source)
    trajectory, trajectory_b = _trajectories(model, tokens, trajectory_tokens, early_queries,
                                             batch_size, progress)
    reading = sink_reading(model, tokens[:reading_prompts], source_token_id=source,
                           threshold=reading_threshold, batch_size=batch_size, progress=progress)
    probe_result, spread, probe_status = _fingerprint_probe(
        model, tokens, doc_ids, reading, run=probe, n_permutations=n_permutations,
        batch_size=batch_size, progress=progress)
    settings = {"source_token_id": source, "reading_threshold": reading_threshold,
                "reading_prompts": int(min(reading_prompts, len(tokens))),
                "early_queries": early_queries, "probe_target": probe_status["target"], "n_boot": n_boot,
                "n_permutations": n_permutations, "bos_bidirectional": bos_bidirectional,
                "trajectory_tokens": trajectory_tokens, "n_prompts": int(len(tokens)),
                "n_tokens": int(tokens.shape[1]),
                "bos_prompts": None if bos_result is None else int(bos_result.statistics.conditions[
                    "baseline/causal"].n_prompts),
                "sink_statistics_prompts": int(causal_stats.n_prompts)}
    return SinkAnalysis(
        sink_scores=sink_scores(causal_stats), sink_threshold=sink_threshold,
        position_zero={condition: position_zero_profile(statistics.conditions[condition].position_zero)
                       for condition in ("causal", "bidirectional")},
        trajectory=trajectory, trajectory_bidirectional=trajectory_b, reading=reading,
        probe=probe_result, fingerprint_spread=spread, bos_interventions=bos_result, settings=settings, n_boot=n_boot,
        sink_metrics=sink_metrics(causal_stats, sink_threshold),
        bos_status=bos_status if bos_status is not None else measure_bos_status(model, tokens),
        probe_status=probe_status)


def default_trajectory_tokens(tokens: Tensor, source: int) -> list[int]:
    """The position-0 tokens whose trajectories are compared: the prompts' own position-0
    token, ``source`` and the prompts' second most common token (each once)."""
    ids, counts = np.unique(tokens[:, 1:].reshape(-1).numpy(), return_counts=True)
    second = int(ids[np.argsort(-counts, kind="stable")[1]]) if len(ids) > 1 else source
    return list(dict.fromkeys([int(tokens[0, 0]), source, second]))


def _trajectories(model: HookedTransformer, tokens: Tensor, trajectory_tokens: list[int],
                  early_queries: int, batch_size: int, progress: bool) -> tuple[Trajectories, Trajectories]:
    """Position-0 trajectories: each of ``trajectory_tokens`` put on two prompts (causal
    mask), and two prompts under the bidirectional ablation."""
    n_traj = 2 * len(trajectory_tokens)
    rows = tokens[np.arange(n_traj) % len(tokens)]
    # Causal: position 0 sees no later token, so a short prefix gives the same stream.
    rows = rows[:, :min(rows.shape[1], max(2, early_queries))]
    with tqdm(total=2, desc="position-0 trajectories", disable=not progress, leave=False) as bar:
        causal = position_zero_trajectories(model, rows, [t for t in trajectory_tokens for _ in (0, 1)],
                                            batch_size=max(batch_size, n_traj))
        bar.update()
        # Bidirectional: position 0 sees the whole prompt (full length needed); the main pass
        # already has the cross-prompt spread over all prompts, so 2 prompts show the trajectory.
        bidirectional_run = position_zero_trajectories(model, tokens[:min(len(tokens), 2)],
                                                       condition=bidirectional,
                                                       condition_name="bidirectional")
        bar.update()
    return causal, bidirectional_run


def _fingerprint_probe(model: HookedTransformer, tokens: Tensor, doc_ids: list | None,
                       reading: SinkReading, *, run: bool, n_permutations: int, batch_size: int,
                       progress: bool) -> tuple[pd.DataFrame | None, pd.DataFrame | None, dict]:
    """The fingerprint probe's table, the fingerprint's spread and the probe's status
    (``{"run", "reason", "target"}``: when it is not run, why)."""
    targets, target_kind = content_targets(tokens, doc_ids)
    table = spread = None
    if not run:
        status = {"run": False, "reason": "switched off (probe=False / --no-probe)"}
    elif target_kind != "document":
        status = {"run": False, "reason": (
            "not run: no document holds two of the prompts, so there is no prompt content shared "
            "within a group for the probe to decode (one prompt per article: chance by design). Run "
            "`rope-leak sinks --documents 4` (several prompts per article) for a meaningful probe")}
    elif len(tokens) < 10:
        status = {"run": False, "reason": (
            f"not run: {len(tokens)} prompts are too few for 5-fold cross-validation (need 10)")}
    elif not reading.heads():
        status = {"run": False, "reason": "not run: no sink-reading head to take a fingerprint from"}
    else:
        fp = fingerprint(model, tokens, reading.heads(), batch_size=batch_size, progress=progress)
        spread = fp.spread()
        table = probe_table(fp, targets, n_permutations=n_permutations, progress=progress)
        status = {"run": True, "reason": "several prompts per document: the probe predicts "
                  "the document (one-hot)"}
    status["target"] = target_kind if status["run"] else None
    return table, spread, status
