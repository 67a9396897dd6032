"""Reproducibility: the same inputs and seed give a byte-identical ``results.json``, in the
same process and in a fresh one, and the file records what is needed to trace and rerun
it: versions, the model's sha256, the corpus' sha256 and every setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rope_leak.analyses.analysis import analyze
from rope_leak.backends import tiny_rope_model
from rope_leak.cli import build_parser, main
from rope_leak.download_cache import sha256_file
from rope_leak.output.results import save_analysis

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory, synthetic_text):
    folder = tmp_path_factory.mktemp("texts")
    for k in range(4):
        (folder / f"doc{k}.txt").write_text(synthetic_text(500, seed=k))
    return folder


def args_for(folder, corpus, out, seed="3"):
    return ["analyze", "--model", str(folder), "--corpus", str(corpus), "--prompts", "6",
            "--tokens", "24", "--seed", seed, "--batch-size", "4", "--max-query", "20",
            "--no-progress", "--out", str(out)]


def test_cli_results_are_byte_identical_and_complete(tiny_folder, text_corpus, tmp_path):
    assert main(args_for(tiny_folder, text_corpus, tmp_path / "a")) == 0
    # A fresh process (another hash seed, fresh RNG and thread pool) gives the same bytes.
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="123")
    proc = subprocess.run([sys.executable, "-m", "rope_leak.cli",
                           *args_for(tiny_folder, text_corpus, tmp_path / "b")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = (tmp_path / "a" / "results.json").read_bytes()
    assert first == (tmp_path / "b" / "results.json").read_bytes()
    assert (tmp_path / "a" / "heads.csv").read_bytes() == (tmp_path / "b" / "heads.csv").read_bytes()

    results = json.loads(first)
    provenance = results["provenance"]
    assert {"rope_leak", "transformer-lens", "torch", "transformers", "numpy", "scipy",
            "python"} <= set(provenance["versions"])
    assert all(v and v != "not installed" for v in provenance["versions"].values())
    # The model: sha256 of its weight file, and what the hash covers.
    model = provenance["model"]
    assert model["sha256"] == sha256_file(tiny_folder / "model.safetensors")
    assert model["kind"] == "hf_folder" and model["sha256_of"] == "weight files"
    assert results["analysis"]["model"]["sha256"] == model["sha256"]
    # The corpus: sha256 of its tokens and settings, and the tokens' own sha256.
    assert len(provenance["corpus"]["sha256"]) == 64
    assert len(results["analysis"]["tokens_sha256"]) == 64
    # Every CLI setting is recorded (under provenance.settings, or the analysis record).
    settings = provenance["settings"]
    analysis = results["analysis"]
    recorded = {**settings, "device": analysis["model"]["device"]}
    # Run mechanics that cannot change the results (sharding and checkpoints are tested
    # to give identical results; --force only skips the memory check) are not settings.
    not_settings = {"command", "out", "overwrite", "no_progress", "shard", "checkpoint_minutes",
                    "checkpoint_every", "force"}
    analyze_parser = build_parser()._subparsers._group_actions[0].choices["analyze"]
    for action in analyze_parser._actions:
        if action.dest in not_settings or action.dest == "help":
            continue
        assert action.dest in recorded, f"--{action.dest} is not recorded in results.json"
    assert settings["seed"] == 3 and settings["batch_size"] == 4 and settings["max_query"] == 20
    for key in ("n_buckets", "n_boot", "bootstrap_seed", "sink_threshold", "target", "pairs",
                "batch_size", "n_tokens", "n_prompts"):
        assert key in analysis, key
    assert analysis["model"]["dtype"] == "float32"
    # Nothing that varies between runs (timings, paths of temporaries, dates).
    assert "seconds" not in first.decode()
    assert str(tmp_path) not in first.decode()

    # Another seed is another corpus: traced by a different sha256.
    assert main(args_for(tiny_folder, text_corpus, tmp_path / "c", seed="4")) == 0
    other = json.loads((tmp_path / "c" / "results.json").read_bytes())
    assert other["provenance"]["corpus"]["sha256"] != provenance["corpus"]["sha256"]


def test_library_results_are_byte_identical_and_record_the_model(tmp_path):
    tokens = torch.randint(1, 50, (8, 16), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    outs = []
    for name in ("a", "b"):
        model = tiny_rope_model(seed=2)  # rebuilt: nothing carried over between runs
        analysis = analyze(model, tokens, progress=False, n_boot=50, seed=7, batch_size=3)
        outs.append(save_analysis(analysis, tmp_path / name, report=False))
    first = (outs[0] / "results.json").read_bytes()
    assert first == (outs[1] / "results.json").read_bytes()
    results = json.loads(first)
    model = results["provenance"]["model"]
    assert model["kind"] == "tiny" and model["sha256_of"] == "parameters" and len(model["sha256"]) == 64
    assert tiny_rope_model(seed=3).rope_leak_source["sha256"] != model["sha256"]
    assert results["analysis"]["bootstrap_seed"] == 7 and results["analysis"]["batch_size"] == 3
    assert results["analysis"]["n_boot"] == 50


def test_bootstrap_seed_changes_only_the_intervals(tmp_path, tiny_model, tiny_tokens):
    a = analyze(tiny_model, tiny_tokens, progress=False, n_boot=50, seed=0)
    b = analyze(tiny_model, tiny_tokens, progress=False, n_boot=50, seed=1)
    assert a.heads()["pattern_L_total_crossfit"].equals(b.heads()["pattern_L_total_crossfit"])
    assert a.settings()["bootstrap_seed"] != b.settings()["bootstrap_seed"]
