"""Models without BOS through `analyze`, `sinks` and `compare`: a tiny random Llama-style
(Qwen2) model that prepends no BOS, and SmolLM2 on prompts that start with an ordinary
token. BOS status must be stated everywhere, and nothing that cannot be estimated is
printed as a number."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
import torch

from rope_leak.cli import main


@pytest.fixture(scope="module")
def no_bos_folder(tmp_path_factory):
    """A tiny random Qwen2 (Llama-style, RoPE) saved as a Hugging Face folder: no BOS token,
    TransformerLens' config does not prepend one; no tokenizer (the corpus uses bytes)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=2)
    folder = tmp_path_factory.mktemp("no_bos") / "tiny_no_bos_lm"
    Qwen2ForCausalLM(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def texts(tmp_path_factory, synthetic_text):
    folder = tmp_path_factory.mktemp("texts")
    for k in range(6):
        (folder / f"doc{k}.txt").write_text(synthetic_text(600, seed=k))
    return folder


RUN = ["--prompts", "8", "--tokens", "24", "--no-progress"]


def test_no_bos_model_through_analyze(no_bos_folder, texts, tmp_path, capsys):
    out = tmp_path / "analyze"
    assert main(["analyze", "--model", str(no_bos_folder), "--corpus", str(texts), *RUN,
                 "--sink-prompts", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "BOS: no BOS (model prepends none)" in printed and "vary with that token" in printed
    summary = json.loads((out / "results.json").read_text())["summary"]
    bos = summary["bos_status"]
    assert bos["model_prepends_bos"] is False and bos["position_zero"] == "ordinary tokens"
    assert bos["measured"] and bos["max_between_token_std"] > 0
    if bos["n_tokens_repeated"] == 0:
        assert bos["max_within_token_std"] is None and "within a token not estimable" in printed
    report = (out / "report.html").read_text()
    assert "id='bos-status'" in report and "no BOS (model prepends none)" in report
    assert "Gu et al. (ICLR 2025)" in report
    sinks = json.loads((out / "sinks.json").read_text())
    assert sinks["bos_status"]["model_prepends_bos"] is False
    assert sinks["probe_status"]["run"] is False and "not run" in sinks["probe_status"]["reason"]
    assert "not run" in (out / "probe.csv").read_text()
    bidir = sinks["trajectory_bidirectional"]
    repeated = max(bidir["prompts_per_token"].values()) > 1
    assert bidir["within_token_estimable"] == repeated
    assert (bidir["max_within_token_deviation"] is None) == (not repeated)  # never a 0 by default
    table = pd.read_csv(out / "bos_interventions.csv")
    for ratio in ("scores_ss_relative", "L_total_relative"):
        estimable = bool(table[f"{ratio}_estimable"].iloc[0])
        assert estimable or table[ratio].isna().all()


def test_no_bos_model_through_sinks(no_bos_folder, texts, tmp_path, capsys):
    out = tmp_path / "sinks"
    assert main(["sinks", "--model", str(no_bos_folder), "--corpus", str(texts), *RUN, "--bootstrap", "20",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "by Gu et al.'s alpha_0" in printed and "of 8 by rope_leak's score" in printed
    assert "BOS: no BOS" in printed and "fingerprint probe: not run" in printed
    payload = json.loads((out / "sinks.json").read_text())
    assert set(payload["sink_metrics"]) == {"gu_et_al_2025", "rope_leak_sink_score"}
    assert payload["sink_metrics"]["gu_et_al_2025"]["epsilon_source"].startswith("Gu et al.")
    heads = pd.read_csv(out / "sink_heads.csv")
    assert {"alpha0_gu", "sink_head_gu", "sink_score"} <= set(heads.columns)


def test_no_bos_model_through_compare(no_bos_folder, tiny_folder, texts, tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["compare", str(no_bos_folder), str(tiny_folder), "--corpus", str(texts), *RUN,
                 "--n-boot", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no BOS (model prepends none)" in printed and "BOS (id 1) at 0" in printed
    assert " / 8" in printed  # sink-head counts out of the head total
    table = pd.read_csv(out / "comparison.csv").set_index("model")
    assert (table["n_heads_total"] == 8).all() and (table["n_ctx"] == 256).all()
    assert table.loc[str(no_bos_folder), "model_prepends_bos"] == False  # noqa: E712
    assert table["window"].isna().all()  # no sliding-window layers
    page = (out / "comparison.html").read_text()
    assert "no BOS (model prepends none)" in page and "n_ctx" in page


@pytest.mark.real_model
def test_smollm2_on_prompts_starting_with_an_ordinary_token(real_model):
    """SmolLM2 prepends BOS; its prompts without it put an ordinary token at position 0:
    analyze (warned), the sink analysis and compare all say so."""
    from rope_leak.analyses.analysis import MissingBOSWarning, analyze
    from rope_leak.analyses.architectures import compare_models
    from rope_leak.analyses.sinks import analyze_sinks
    from rope_leak.corpus import load_corpus

    tokens = load_corpus(real_model, "wikipedia", n_prompts=8, n_tokens=33, seed=0).tokens[:, 1:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analysis = analyze(real_model, tokens, progress=False, n_boot=50, on_missing_bos="warn")
    assert any(issubclass(w.category, MissingBOSWarning) for w in caught)
    bos = analysis.summary()["bos_status"]
    assert bos["position_zero"] == "ordinary tokens" and bos["model_prepends_bos"]
    assert bos["max_between_token_std"] > 1  # the position-0 stream varies with the first token
    sinks = analyze_sinks(real_model, tokens, statistics=analysis.statistics, bos_status=analysis.bos_status,
                          n_boot=20, reading_prompts=2, early_queries=16)
    summary = sinks.summary()
    assert summary["bos_status"]["position_zero"] == "ordinary tokens"
    assert summary["probe_status"]["run"] is False
    table, _, _ = compare_models(["smollm2-135m"], load=lambda name: real_model, tokens_for=lambda m: tokens,
                                 n_boot=0, progress=False)
    assert table.loc[0, "bos"] == "no BOS (prompts lack it)" and table.loc[0, "n_heads_total"] == 270
