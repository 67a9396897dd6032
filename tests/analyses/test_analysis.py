"""The analysis, its files and the CLI, end to end on tiny models and on the real one."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rope_leak.analyses.analysis import analyze
from rope_leak.cli import main
from rope_leak.corpus import load_corpus
from rope_leak.output.results import OutputExistsError, save_analysis


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory, synthetic_text):
    folder = tmp_path_factory.mktemp("texts")
    for k in range(6):
        (folder / f"doc{k}.txt").write_text(synthetic_text(600, seed=k))
    return folder


def test_analysis_tables_are_consistent(tiny_model, tiny_tokens):
    analysis = analyze(tiny_model, tiny_tokens, progress=False, batch_size=5, window=4)
    heads = analysis.heads()
    assert len(heads) == 2 * 4 and heads["label"].iloc[5] == "L1H1"
    np.testing.assert_allclose(heads["pattern_L_mask_crossfit"],
                               heads["pattern_L_total_crossfit"] - heads["pattern_L_resid_crossfit"])
    assert "pattern_L_total" not in heads and "L_total" not in analysis.layers()  # every name says its estimator
    layers = analysis.layers()
    keep = ~heads["degenerate"].to_numpy()
    kept_heads = heads[keep]
    np.testing.assert_allclose(layers["L_total_crossfit"],
                               kept_heads.groupby("layer")["pattern_L_total_crossfit"].mean())
    summary = analysis.summary()
    # Both estimators' compositions pool sums of squares (sum dSS / sum SST per condition,
    # degenerate heads left out); the debiased one lies inside its own CI.
    from rope_leak.fits.projection import BucketProjection

    for estimator, total, resid in (("debiased", "L_total_debiased", "L_resid_debiased"),
                                    ("crossfit", "pattern_L_total_crossfit", "pattern_L_resid_crossfit")):
        pooled = {}
        for condition, name in (("causal", total), ("bidirectional", resid)):
            sst = BucketProjection.from_statistics(
                analysis.statistics.conditions[condition].targets["pattern"]).per_prompt_sst()[0].ravel()
            pooled[condition] = (heads[name].to_numpy() * sst)[keep].sum() / sst[keep].sum()
        expected = 1 - pooled["bidirectional"] / pooled["causal"]
        got = summary["composition_debiased"] if estimator == "debiased" else \
            summary["crossfit"]["pattern"]["composition"]
        assert got == pytest.approx(expected), estimator
    low, high = summary["composition_debiased_ci"]
    assert np.isfinite(low) and low <= high
    np.testing.assert_allclose(heads["L_mask_debiased"], heads["L_total_debiased"] - heads["L_resid_debiased"])
    # The completed split: its parts add up per head, and the model and layer values are
    # the pools of the per-head numbers (sum <D m, D log A> / sum SS(D log A)).
    split = analysis.completed_split()
    table = split.head_table()
    kept = split.keep
    np.testing.assert_allclose((table["mask_part"] + table["scores_part"] + table["cross"])[kept], 1.0)
    pooled = (split.mask_inner[kept].sum() / split.total[kept].sum())
    assert summary["completed_split"]["mask_share"] == pytest.approx(pooled)
    assert set(summary["completed_split"]) >= {"mask_share", "mask_share_ci", "cross", "scores_part",
                                                 "mask_part"}
    for layer in range(analysis.n_layers):
        keep = kept[layer]
        expected = split.mask_inner[layer][keep].sum() / split.total[layer][keep].sum() if keep.any() else np.nan
        assert layers["completed_mask_share"][layer] == pytest.approx(expected, nan_ok=True)
    np.testing.assert_allclose(heads["completed_mask_share"], table["mask_share"].ravel())
    np.testing.assert_allclose(heads["completed_cross"], table["cross"].ravel())
    assert summary["position_zero_max_std"]["causal"] == 0.0
    assert summary["position_zero_max_std"]["bidirectional"] > 0.0


def test_too_few_prompts_is_a_clear_error(tiny_model, tiny_tokens):
    with pytest.raises(ValueError, match="at least 4 prompts"):
        analyze(tiny_model, tiny_tokens[:3], progress=False)


def test_cli_writes_results_reproducibly(tiny_folder, text_corpus, tmp_path):
    args = ["analyze", "--model", str(tiny_folder), "--corpus", str(text_corpus), "--prompts", "8",
            "--tokens", "32", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    for name in ("results.json", "heads.csv", "layers.csv", "report.html", "sinks.json"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert not (tmp_path / "a" / "statistics.npz").exists()  # only with --save-statistics
    first = (tmp_path / "a" / "results.json").read_bytes()
    assert first == (tmp_path / "b" / "results.json").read_bytes()
    results = json.loads(first)
    assert results["provenance"]["settings"]["prompts"] == 8
    assert {"rope_leak", "torch", "transformer-lens"} <= set(results["provenance"]["versions"])
    assert results["provenance"]["corpus"]["sha256"]
    heads = pd.read_csv(tmp_path / "a" / "heads.csv")
    assert list(heads["label"][:2]) == ["L0H0", "L0H1"]
    # An existing output folder is never silently overwritten.
    assert main(args + ["--out", str(tmp_path / "a")]) == 2
    assert (tmp_path / "a" / "results.json").read_bytes() == first
    assert main(args + ["--out", str(tmp_path / "a"), "--overwrite"]) == 0


def test_save_refuses_existing_results(tiny_model, tiny_tokens, tmp_path):
    analysis = analyze(tiny_model, tiny_tokens, progress=False)
    save_analysis(analysis, tmp_path, report=False)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_analysis(analysis, tmp_path, report=False)


@pytest.mark.real_model
def test_real_model_analysis(real_model):
    corpus = load_corpus(real_model, "wikipedia", n_prompts=8, n_tokens=48, seed=0)
    assert (corpus.tokens[:, 0] == 1).all()
    analysis = analyze(real_model, corpus.tokens, progress=False)
    heads = analysis.heads()
    assert len(heads) == 30 * 9
    assert np.isfinite(heads["pattern_L_total_crossfit"]).all()
    # Position 0 holds the same BOS in every prompt: a closed system under the causal mask.
    pz = analysis.position_zero()
    assert max(pz["causal"]["std"]) == 0.0
    assert min(pz["bidirectional"]["std"][1:]) > 0.0
    # SmolLM2 has strong attention sinks.
    assert len(analysis.sink_heads()) > 10


def test_heads_csv_keeps_full_precision(tiny_model, tiny_tokens, tmp_path):
    analysis = analyze(tiny_model, tiny_tokens, progress=False, n_boot=20, window=4)
    analysis.save(tmp_path / "out")
    written = pd.read_csv(tmp_path / "out" / "heads.csv")
    expected = analysis.heads()
    for column in ("L_total_debiased", "pattern_L_total_crossfit", "completed_mask_share"):
        np.testing.assert_array_equal(written[column].to_numpy(), expected[column].to_numpy())


def test_cli_cell_maps_add_the_cell_mean_ceiling(tiny_folder, text_corpus, tmp_path):
    args = ["analyze", "--model", str(tiny_folder), "--corpus", str(text_corpus), "--prompts", "8",
            "--tokens", "24", "--no-progress", "--no-sinks"]
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert main(args + ["--cell-maps", "--out", str(tmp_path / "cells")]) == 0
    plain = pd.read_csv(tmp_path / "plain" / "heads.csv")
    cells = pd.read_csv(tmp_path / "cells" / "heads.csv")
    assert not any("r2_cell" in c for c in plain.columns)  # O(n) statistics only
    assert np.isfinite(cells["pattern_causal_r2_cell"]).all()
    # per-cell sums change nothing else
    np.testing.assert_array_equal(cells["L_total_debiased"], plain["L_total_debiased"])


def test_mean_head_composition_beside_the_pooled_one(tiny_model, tiny_tokens):
    analysis = analyze(tiny_model, tiny_tokens, progress=False, n_boot=50)
    summary, inf = analysis.summary(), analysis.inference()
    usable = ~inf.degenerate & (inf.total.low > 0)
    expected = (inf.mask.estimate[usable] / inf.total.estimate[usable]).mean()
    assert summary["mean_head_composition"] == pytest.approx(expected)
    assert summary["mean_head_composition_heads"] == int(usable.sum()) > 0
