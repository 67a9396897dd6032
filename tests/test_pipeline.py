"""The pipeline API (``rope_leak.run`` and friends): it writes exactly what the command
line writes, the command line is a thin layer over it, in-memory runs write nothing,
and its progress switch reaches the sink analysis and ``compare``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import rope_leak as rl
import rope_leak.pipeline as pipeline
from rope_leak.analyses.architectures import compare_models
from rope_leak.analyses.sinks import analyze_sinks
from rope_leak.cli import main
from rope_leak.corpus import make_random_corpus
from rope_leak.output.results import RESULT_FILES, SINK_FILES

ROOT = Path(__file__).resolve().parents[1]
# Files whose bytes depend only on the inputs (report.html / sinks.html embed plotly ids,
# run_info.json timings).
DETERMINISTIC = ("results.json", "heads.csv", "layers.csv", "sinks.json", "sink_heads.csv",
                 "trajectory.csv", "probe.csv", "bos_interventions.csv")


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory, synthetic_text):
    folder = tmp_path_factory.mktemp("pipeline_texts")
    for k in range(4):
        (folder / f"doc{k}.txt").write_text(synthetic_text(600, seed=k))
    return folder


def test_run_writes_what_the_cli_writes(tiny_folder, text_corpus, tmp_path):
    settings = {"prompts": 8, "tokens": 24, "seed": 1, "batch_size": 4, "sink_prompts": 8,
                "bos_prompts": 8, "reading_prompts": 2}
    result = rl.run(str(tiny_folder), str(text_corpus), tmp_path / "api", progress=False,
                    save_statistics=True, **settings)
    args = ["analyze", "--model", str(tiny_folder), "--corpus", str(text_corpus), "--no-progress",
            "--save-statistics", "--out", str(tmp_path / "cli")]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "rope_leak.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    api, cli = tmp_path / "api", tmp_path / "cli"
    assert sorted(p.name for p in api.iterdir()) == sorted(p.name for p in cli.iterdir())
    assert result.files == sorted(p.name for p in api.iterdir())
    assert set(result.files) == {*RESULT_FILES, "run_info.json", *SINK_FILES}
    for name in DETERMINISTIC:
        assert (api / name).read_bytes() == (cli / name).read_bytes(), name
    # The statistics the run wrote are the ones a bare analyze of its corpus computes.
    a = rl.RunStatistics.load(api / "statistics.npz")
    b = rl.analyze(result.model, result.corpus, batch_size=4, progress=False).statistics
    for condition, stats in b.conditions.items():
        for target, st in stats.targets.items():
            np.testing.assert_array_equal(a.conditions[condition].targets[target].xty, st.xty)
    heads = pd.read_csv(api / "heads.csv")
    np.testing.assert_allclose(heads["L_total_debiased"], result.analysis.heads()["L_total_debiased"],
                               rtol=1e-15)
    assert not (api / "checkpoint.npz").exists()
    # the report's head explorer carries the sink analysis' sink-reading flags
    from rope_leak.output.explorer import explorer_data

    page = (api / "report.html").read_text()
    embedded = page.split("<script type='application/json' id='explorer-data'>", 1)[1].split("</script>", 1)[0]
    expected = explorer_data(result.analysis, result.sinks)["numbers"]["sink_reading"]
    assert expected is not None and json.loads(embedded)["numbers"]["sink_reading"] == expected


def test_run_in_memory_writes_nothing_and_displays(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = make_random_corpus(8, 16, tiny_model.cfg.d_vocab, seed=0, bos_token_id=0)
    result = rl.run(tiny_model, corpus, progress=False, sink_prompts=8, reading_prompts=2)
    assert list(tmp_path.iterdir()) == []
    assert result.out is None and result.files == []
    assert result.analysis.n_prompts == 8 and result.sinks is not None
    assert result.provenance["settings"]["prompts"] == 8
    assert result.provenance["settings"]["dtype"] == "float32"
    text, html = repr(result), result._repr_html_()
    assert len(text) <= 400 and "\n" not in text and "2 layers x 4 heads" in text
    assert html.startswith("<table") and "sink_heads" in html
    skipped = rl.run(tiny_model, corpus, progress=False, sinks=False)
    assert skipped.sinks is None and "sinks='not run'" in repr(skipped)


def test_run_refuses_bad_inputs_with_a_fix(tiny_model, tmp_path):
    corpus = make_random_corpus(8, 16, tiny_model.cfg.d_vocab, seed=0, bos_token_id=0)
    with pytest.raises(TypeError, match="Fix: pass rl.load_corpus"):
        rl.run(tiny_model, corpus.tokens, progress=False)
    with pytest.raises(ValueError, match="Fix: pass out="):
        rl.run(tiny_model, corpus, shard=(0, 2), progress=False)
    with pytest.raises(ValueError, match="Fix: pass one of them"):
        rl.run("smollm2-135m", corpus, dtype="float64", progress=False)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="Fix: choose another --out"):
        rl.run(tiny_model, corpus, tmp_path, progress=False)


def test_shards_run_and_merge_like_one_run(tiny_model, tmp_path):
    corpus = make_random_corpus(12, 16, tiny_model.cfg.d_vocab, seed=2, bos_token_id=0)
    common = {"batch_size": 2, "progress": False, "sinks": False}
    whole = rl.run(tiny_model, corpus, tmp_path / "whole", **common)
    for k in range(3):
        shard = rl.run(tiny_model, corpus, tmp_path / f"s{k}", shard=f"{k}/3", **common)
        assert shard.analysis is None and shard.files == ["shard.json", "statistics.npz"]
    merged = rl.merge([tmp_path / f"s{k}" for k in (2, 0, 1)], tmp_path / "merged")
    assert merged.analysis.n_prompts == 12
    np.testing.assert_allclose(merged.analysis.heads()["L_total_debiased"],
                               whole.analysis.heads()["L_total_debiased"], rtol=1e-12, atol=1e-14)


# -- the command line only parses, calls the pipeline and prints --------------------------------
class Called(Exception):
    pass


def spy(name, monkeypatch):
    seen = {}

    def fake(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise Called(name)

    monkeypatch.setattr(pipeline, name, fake)
    return seen


@pytest.mark.parametrize("argv, name, check", [
    (["analyze", "--model", "m", "--corpus", "c", "--prompts", "12", "--no-sinks", "--no-progress",
      "--shard", "1/3", "--out", "o"], "run",
     lambda a, k: k["model"] == "m" and k["corpus"] == "c" and k["config"].prompts == 12
     and not k["config"].sinks and not k["progress"] and k["config"].shard == "1/3" and k["out"] == "o"),
    (["effects", "--heldout", "5", "--heads", "L1H2,L0H0", "--window", "8", "--out", "o"], "run_effects",
     lambda a, k: a[0] == "smollm2-135m" and k["heldout"] == 5 and k["heads"] == ["L1H2", "L0H0"]
     and k["window"] == 8 and a[2] == "o" and k["layers"]),
    (["merge", "s0", "s1", "--out", "o", "--no-report"], "merge",
     lambda a, k: list(a) == [["s0", "s1"], "o"] and k == {"overwrite": False, "report": False}),
    (["compare", "m1", "m2+ntk4", "--n-boot", "7", "--out", "o"], "compare",
     lambda a, k: a[0] == ["m1", "m2+ntk4"] and a[2] == "o" and k["n_boot"] == 7 and k["progress"]),
    (["sinks", "--model", "m", "--documents", "3", "--no-bos", "--out", "o"], "run_sinks",
     lambda a, k: a[:3] == ("m", "wikipedia", "o") and k["documents"] == 3 and k["run_bos_interventions"] is False),
])
def test_cli_calls_the_pipeline(argv, name, check, monkeypatch):
    seen = spy(name, monkeypatch)
    with pytest.raises(Called):
        main(argv)
    assert check(seen["args"], seen["kwargs"]), seen


# -- progress switches ---------------------------------------------------------------------------
def test_sink_analysis_progress_switch(tiny_model, tiny_tokens, capsys):
    capsys.readouterr()
    quiet = analyze_sinks(tiny_model, tiny_tokens, reading_prompts=2, n_boot=10, progress=False)
    assert capsys.readouterr().err == ""
    loud = analyze_sinks(tiny_model, tiny_tokens, reading_prompts=2, n_boot=10, progress=True)
    err = capsys.readouterr().err
    for bar in ("forward passes", "position-0 trajectories", "sink reading"):
        assert bar in err, (bar, err[-2000:])
    np.testing.assert_array_equal(quiet.sink_scores, loud.sink_scores)


def test_compare_progress_switch(tiny_model, tiny_tokens, capsys):
    kwargs = {"load": lambda _name: tiny_model, "tokens_for": lambda _model: tiny_tokens, "n_boot": 20}
    capsys.readouterr()
    quiet, _, _ = compare_models(["tiny"], progress=False, **kwargs)
    assert capsys.readouterr().err == ""
    loud, _, _ = compare_models(["tiny"], progress=True, **kwargs)
    err = capsys.readouterr().err
    assert "forward passes" in err and "bootstrap CIs of tiny" in err
    assert quiet["L_total_debiased"].equals(loud["L_total_debiased"])


def test_run_progress_switch(tiny_model, capsys):
    corpus = make_random_corpus(8, 16, tiny_model.cfg.d_vocab, seed=0, bos_token_id=0)
    capsys.readouterr()
    rl.run(tiny_model, corpus, progress=False, sink_prompts=8, reading_prompts=2).analysis.heads()
    assert capsys.readouterr().err == ""
    rl.run(tiny_model, corpus, progress=True, sink_prompts=8, reading_prompts=2).analysis.heads()
    err = capsys.readouterr().err
    assert "forward passes" in err and "sink reading" in err and "bootstrap CIs" in err
