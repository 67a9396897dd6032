"""The sinks analysis (issue 3): sink heads, the position-0 trajectory by token,
sink-reading heads, the fingerprint probe and the BOS-intervention table, in one call.

``analyze_sinks(model, tokens)`` returns a :class:`SinkAnalysis`; ``save_sinks(result,
out_dir)`` writes ``sinks.json``, ``sink_heads.csv``, ``trajectory.csv``, ``probe.csv``,
``bos_interventions.csv`` and ``sinks.html``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch import Tensor
from transformer_lens import HookedTransformer

from rope_leak.cache import atomic_write_text
from rope_leak.engine.pairs import PairSpec
from rope_leak.engine.run import run_statistics
from rope_leak.interventions.mask import bidirectional
from rope_leak.metrics.bos import BosInterventions, bos_interventions, default_replacement_token
from rope_leak.metrics.fingerprint import bag_of_tokens, fingerprint, probe_table
from rope_leak.metrics.sink_reading import SINK_READING_THRESHOLD, SinkReading, sink_reading
from rope_leak.metrics.sinks import SINK_THRESHOLD, position_zero_profile, sink_heads, sink_scores
from rope_leak.metrics.trajectory import Trajectories, position_zero_trajectories

SINK_FILES = ("sinks.json", "sink_heads.csv", "trajectory.csv", "probe.csv",
              "bos_interventions.csv", "sinks.html")


@dataclass
class SinkAnalysis:
    sink_scores: np.ndarray  # [layer, head]
    sink_threshold: float
    position_zero: dict  # causal / bidirectional profiles (std, norms)
    trajectory: Trajectories
    trajectory_bidirectional: Trajectories
    reading: SinkReading
    probe: pd.DataFrame | None
    fingerprint_spread: pd.DataFrame | None
    bos: BosInterventions | None
    settings: dict = field(default_factory=dict)
    n_boot: int = 200

    def sink_heads(self) -> list[tuple[int, int]]:
        return sink_heads(self.sink_scores, self.sink_threshold)

    def heads(self) -> pd.DataFrame:
        table = self.reading.table(sink_scores=self.sink_scores, n_boot=self.n_boot)
        table["sink_head"] = table["sink_score"] > self.sink_threshold
        return table

    def bos_table(self) -> pd.DataFrame | None:
        return None if self.bos is None else self.bos.table()

    def summary(self) -> dict:
        out = {
            "sink_threshold": self.sink_threshold,
            "sink_heads": [f"L{l}H{h}" for l, h in self.sink_heads()],
            "sink_reading": self.reading.to_dict(),
            "trajectory": self.trajectory.to_dict(),
            "trajectory_bidirectional": self.trajectory_bidirectional.to_dict(),
            "position_zero": self.position_zero,
            "settings": self.settings,
        }
        if self.probe is not None:
            out["probe"] = self.probe.to_dict(orient="records")
        if self.bos is not None:
            out["bos_interventions"] = self.bos.table().to_dict(orient="records")
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
    sink_threshold: float = SINK_THRESHOLD,
    reading_threshold: float = SINK_READING_THRESHOLD,
    source_token_id: int | None = None,
    doc_ids: list | None = None,
    trajectory_tokens: list[int] | None = None,
    reading_prompts: int = 8,
    early_queries: int = 32,
    bos: bool = True,
    probe: bool = True,
    n_boot: int = 200,
    n_permutations: int = 100,
    batch_size: int = 8,
    progress: bool = False,
) -> SinkAnalysis:
    """Everything of issue 3 points 1-5 on ``tokens`` (``[prompt, pos]``).

    Args:
        source_token_id: the other position-0 token used by sink reading and the
            ``token``/``replace_all`` BOS replacements (default: the prompts' most common token).
        trajectory_tokens: position-0 tokens compared in the trajectory (default: the
            prompts' own position-0 token, the source token and the prompts' second
            most common token); each is put on 2 prompts.
        doc_ids: document of each prompt; when some document holds several prompts, the
            fingerprint probe predicts the document (one-hot), else the bag of tokens.
        reading_prompts: prompts used for sink reading (it reruns every layer).
        early_queries: BOS interventions score queries ``i < early_queries``.
    """
    source = default_replacement_token(tokens) if source_token_id is None else int(source_token_id)
    n_buckets = 2 * max(1, min(16, len(tokens) // 2))
    if bos:
        bos_result = bos_interventions(model, tokens, token_id=source, n_boot=n_boot,
                                       spec=PairSpec(max_query=min(early_queries, tokens.shape[1])),
                                       batch_size=batch_size, n_buckets=n_buckets, progress=progress)
        base = bos_result.statistics.conditions
        causal_stats, bidir_stats = base["baseline/causal"], base["baseline/bidirectional"]
    else:
        bos_result = None
        stats = run_statistics(model, tokens, targets=("pattern",), batch_size=batch_size,
                               n_buckets=n_buckets, progress=progress)
        causal_stats, bidir_stats = stats.conditions["causal"], stats.conditions["bidirectional"]
    scores = sink_scores(causal_stats)
    profiles = {"causal": position_zero_profile(causal_stats.position_zero),
                "bidirectional": position_zero_profile(bidir_stats.position_zero)}

    if trajectory_tokens is None:
        ids, counts = np.unique(tokens[:, 1:].reshape(-1).numpy(), return_counts=True)
        second = int(ids[np.argsort(-counts, kind="stable")[1]]) if len(ids) > 1 else source
        trajectory_tokens = list(dict.fromkeys([int(tokens[0, 0]), source, second]))
    n_traj = 2 * len(trajectory_tokens)
    rows = tokens[np.arange(n_traj) % len(tokens)]
    trajectory = position_zero_trajectories(model, rows, [t for t in trajectory_tokens for _ in (0, 1)],
                                            batch_size=batch_size)
    trajectory_b = position_zero_trajectories(model, tokens[:min(len(tokens), batch_size)],
                                              condition=bidirectional, condition_name="bidirectional")
    reading = sink_reading(model, tokens[:reading_prompts], source_token_id=source,
                           threshold=reading_threshold, batch_size=batch_size)
    probe_result = spread = None
    target_kind = None
    if probe and reading.heads() and len(tokens) >= 10:
        fp = fingerprint(model, tokens, reading.heads(), batch_size=batch_size)
        spread = fp.spread()
        targets, target_kind = content_targets(tokens, doc_ids)
        probe_result = probe_table(fp, targets, n_permutations=n_permutations)
    settings = {"source_token_id": source, "reading_threshold": reading_threshold,
                "reading_prompts": int(min(reading_prompts, len(tokens))),
                "early_queries": early_queries, "probe_target": target_kind, "n_boot": n_boot, "n_permutations": n_permutations,
                "trajectory_tokens": trajectory_tokens, "n_prompts": int(len(tokens)),
                "n_tokens": int(tokens.shape[1])}
    return SinkAnalysis(scores, sink_threshold, profiles, trajectory, trajectory_b, reading,
                        probe_result, spread, bos_result, settings, n_boot)


def save_sinks(result: SinkAnalysis, out_dir: str | Path, *, provenance: dict | None = None,
               overwrite: bool = False) -> Path:
    """Write the sink result files (see :data:`SINK_FILES`) into ``out_dir``."""
    from rope_leak.plots_sinks import sinks_html
    from rope_leak.results import check_output_dir, package_versions, to_jsonable

    out = check_output_dir(out_dir, overwrite, SINK_FILES)
    payload = to_jsonable({"rope_leak_sinks": 1,
                           "provenance": {"versions": package_versions(), **(provenance or {})},
                           **result.summary()})
    atomic_write_text(out / "sinks.json", json.dumps(payload, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "sink_heads.csv", result.heads().to_csv(index=False, float_format="%.6g"))
    traj = result.trajectory.within_token_spread().merge(
        result.trajectory.between_token_distance(), on="depth")
    atomic_write_text(out / "trajectory.csv", traj.to_csv(index=False, float_format="%.6g"))
    if result.probe is not None:
        atomic_write_text(out / "probe.csv", result.probe.to_csv(index=False, float_format="%.6g"))
    if result.bos is not None:
        atomic_write_text(out / "bos_interventions.csv",
                          result.bos.table().to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "sinks.html", sinks_html(result))
    return out
