"""The sinks orchestrator, its files, figures and CLI wiring (tiny model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rope_leak import cli
from rope_leak.analyses.sinks import analyze_sinks, content_targets
from rope_leak.output.results import SINK_FILES, save_sinks


def test_analyze_and_save_sinks(tiny_model, tmp_path):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (12, 16), generator=gen)
    tokens[:, 0] = 0
    doc_ids = [i % 3 for i in range(12)]
    result = analyze_sinks(tiny_model, tokens, doc_ids=doc_ids, n_boot=10, n_permutations=10,
                           early_queries=8)
    summary = result.summary()
    assert summary["trajectory"]["max_within_token_deviation"] == 0
    assert summary["settings"]["probe_target"] == "document"
    assert [r["replacement"] for r in summary["bos_interventions"]][0] == "baseline"
    heads = result.heads()
    assert {"sink_score", "sink_head", "relative_change", "key0_fraction"} <= set(heads.columns)
    out = save_sinks(result, tmp_path / "out")
    assert all((out / name).exists() for name in SINK_FILES)
    payload = json.loads((out / "sinks.json").read_text())
    assert payload["sink_reading"]["threshold"] == 0.1
    with pytest.raises(FileExistsError):
        save_sinks(result, out)
    save_sinks(result, out, overwrite=True)
    assert "Sink-reading heads" in (out / "sinks.html").read_text()


def test_content_targets_fall_back_to_bag_of_tokens():
    tokens = torch.tensor([[0, 1, 2, 2], [0, 3, 3, 1], [0, 1, 1, 1]])
    targets, kind = content_targets(tokens, doc_ids=[5, 6, 7])
    assert kind == "bag_of_tokens" and targets.shape[0] == 3
    targets, kind = content_targets(tokens, doc_ids=[5, 5, 7])
    assert kind == "document" and np.array_equal(targets[:, 0], [1, 1, 0])


def test_cli_has_sinks_command():
    args = cli.build_parser().parse_args(["sinks", "--prompts", "8", "--documents", "4", "--no-bos"])
    assert args.command == "sinks" and args.prompts == 8 and args.no_bos and args.documents == 4
    assert cli.COMMANDS["sinks"] is cli.run_sinks
    assert cli.build_parser().parse_args(["sinks"]).prompts == 32


def test_patching_and_bos_figures(tiny_model):
    from rope_leak.analyses import patching
    from rope_leak.analyses.bos_interventions import bos_interventions
    from rope_leak.output import plots_sinks

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (8, 12), generator=gen)
    tokens[:, 0] = 0
    result = patching.mask_swap_by_layer(tiny_model, tokens, n_buckets=8)
    fig = plots_sinks.patching_heatmap(result, "L1")
    assert fig.data[0].z.shape == (2, 4)
    table = bos_interventions(tiny_model, tokens, replacements=("zeros",), n_boot=5, n_buckets=8).table()
    # panels: the completed split's scores' part (queries 8 <= i < 12), the scores' SS, L_total
    assert len(plots_sinks.bos_interventions_figure(table).data) == 3
    assert plots_sinks.bos_table_figure(table).data[0].type == "table"


def test_sink_analysis_reuses_the_main_pass(tiny_model, tiny_tokens, monkeypatch):
    """Given the main analysis' statistics, the sink analysis reads sink scores and position-0
    profiles from them: its only streaming run is the BOS interventions' short causal one."""
    import rope_leak.analyses.bos_interventions as bos_module
    import rope_leak.analyses.sinks as sink_module
    from rope_leak.analyses.analysis import analyze

    analysis = analyze(tiny_model, tiny_tokens, progress=False, n_boot=20)
    calls = []

    def counting(run):
        def wrapped(model, tokens, **kwargs):
            calls.append((tuple(tokens.shape), sorted(kwargs.get("conditions") or ["causal", "bidirectional"])))
            return run(model, tokens, **kwargs)
        return wrapped

    monkeypatch.setattr(sink_module, "run_statistics", counting(sink_module.run_statistics))
    monkeypatch.setattr(bos_module, "run_statistics", counting(bos_module.run_statistics))
    result = analyze_sinks(tiny_model, tiny_tokens[:8], statistics=analysis.statistics, bos_status=analysis.bos_status,
                           n_boot=10, early_queries=6)
    assert len(calls) == 1 and calls[0][0] == (8, 7)  # queries i < 6, and one the start cut leaves out
    assert all(name.endswith("/causal") for name in calls[0][1])
    np.testing.assert_array_equal(result.sink_scores, analysis.sink_scores())
    assert result.summary()["bos_status"] is analysis.bos_status
    assert result.probe_status["run"] is False and "not run" in result.probe_status["reason"]
