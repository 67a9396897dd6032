"""Scale out and resume, with real processes: shards run as separate
``python -m rope_leak.cli`` processes and merge into a single run's results; a run
killed with SIGKILL after its first checkpoint resumes to identical results; torchrun
(gloo, CPU) runs the shards of examples/torchrun_shards.py and merges them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rope_leak.engine.run import run_statistics
from rope_leak.engine.statistics import RunStatistics
from rope_leak.output.shards import parse_shard, shard_prompts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory, synthetic_text):
    folder = tmp_path_factory.mktemp("scale_texts")
    for k in range(8):
        (folder / f"doc{k}.txt").write_text(synthetic_text(2000, seed=k))
    return folder


def cli(*args, check=True, env_extra=None, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "rope_leak.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"rope-leak {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def compare_results(a: Path, b: Path, atol: float = 1e-12) -> bool:
    """Numbers equal within atol (raises otherwise); True when the files are byte-identical."""
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())

    def walk(x, y, path="$"):
        assert type(x) is type(y) or {type(x), type(y)} <= {int, float}, path
        if isinstance(x, dict):
            assert x.keys() == y.keys(), path
            for k in x:
                walk(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), path
            for k, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{k}]")
        elif isinstance(x, float):
            assert abs(x - y) <= atol * max(1.0, abs(x)), f"{path}: {x} vs {y}"
        else:
            assert x == y, f"{path}: {x!r} vs {y!r}"

    walk(ra, rb)
    return a.read_bytes() == b.read_bytes()


def test_parse_and_slice_shards():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    slices = [shard_prompts(21, 4, (k, 3)) for k in range(3)]
    assert [list(s) for s in slices] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 21))]
    assert all(s.start % 4 == 0 for s in slices)  # whole batches: same forward passes
    with pytest.raises(ValueError, match="empty"):
        shard_prompts(8, 4, (0, 3))


def test_shards_in_separate_processes_merge_to_single_run(tiny_folder, text_corpus, tmp_path):
    common = ["--model", tiny_folder, "--corpus", text_corpus, "--prompts", 14, "--tokens", 24,
              "--batch-size", 3, "--no-progress", "--save-statistics"]
    single = tmp_path / "single"
    procs = [
        subprocess.Popen([sys.executable, "-m", "rope_leak.cli", "analyze", *map(str, common),
                          "--shard", f"{k}/3", "--out", str(tmp_path / f"shard{k}")], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE, text=True)
        for k in range(3)
    ]
    cli("analyze", *common, "--out", single)
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    for k in range(3):
        assert not (tmp_path / f"shard{k}" / "results.json").exists()  # no report for a shard
        info = json.loads((tmp_path / f"shard{k}" / "shard.json").read_text())
        assert info["shard"] == [k, 3]
    # Incomplete or duplicated shard sets are refused.
    assert "exactly once" in cli("merge", tmp_path / "shard0", tmp_path / "shard1", "--out",
                                 tmp_path / "bad", check=False).stderr
    cli("merge", *(tmp_path / f"shard{k}" for k in (2, 0, 1)), "--out", tmp_path / "merged")
    identical = compare_results(single / "results.json", tmp_path / "merged" / "results.json")
    print(f"merged results.json byte-identical to the single run: {identical}")
    a = RunStatistics.load(single / "statistics.npz")
    b = RunStatistics.load(tmp_path / "merged" / "statistics.npz")
    assert a.prompts_done == b.prompts_done == list(range(14))
    for c in a.conditions:
        for t, st in a.conditions[c].targets.items():
            np.testing.assert_allclose(b.conditions[c].targets[t].xty, st.xty, rtol=1e-13, atol=1e-12)
            np.testing.assert_allclose(b.conditions[c].targets[t].sumsq, st.sumsq, rtol=1e-13, atol=1e-12)
    for name in ("heads.csv", "layers.csv", "report.html"):
        assert (tmp_path / "merged" / name).stat().st_size > 0


def test_killed_run_resumes_to_identical_results(tiny_folder, text_corpus, tmp_path):
    common = ["analyze", "--model", tiny_folder, "--corpus", text_corpus, "--prompts", 48,
              "--tokens", 48, "--batch-size", 1, "--no-progress", "--checkpoint-every", 1,
              "--save-statistics"]
    cli(*common, "--out", tmp_path / "whole")
    assert not (tmp_path / "whole" / "checkpoint.npz").exists()  # removed once results exist

    out = tmp_path / "resumed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "rope_leak.cli", *map(str, common), "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoint.npz"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint.exists() and not (out / "results.json").exists(), "the run ended before the kill"
    done = RunStatistics.load(checkpoint).prompts_done
    assert 0 < len(done) < 48
    # Other settings are refused rather than mixed in.
    wrong = cli(*[a if a != 48 else 40 for a in common[:-2]], "--checkpoint-every", 1, "--out", out,
                check=False)
    assert wrong.returncode == 2 and "checkpoint" in wrong.stderr
    resumed = cli(*common, "--out", out)
    assert "resuming" in resumed.stderr
    assert not checkpoint.exists()
    assert compare_results(tmp_path / "whole" / "results.json", out / "results.json", atol=0.0)
    a = RunStatistics.load(tmp_path / "whole" / "statistics.npz")
    b = RunStatistics.load(out / "statistics.npz")
    for c in a.conditions:
        for t, st in a.conditions[c].targets.items():
            np.testing.assert_array_equal(b.conditions[c].targets[t].xty, st.xty)
            np.testing.assert_array_equal(b.conditions[c].targets[t].sumsq, st.sumsq)


def test_resume_in_process_equals_uninterrupted(tiny_model, tiny_tokens, tmp_path):
    whole = run_statistics(tiny_model, tiny_tokens, batch_size=2, progress=False, n_buckets=8)
    ckpt = tmp_path / "ckpt.npz"
    # an interrupted run: checkpoints after its first two batches (prompts 0..3)
    run_statistics(tiny_model, tiny_tokens[:6], batch_size=2, progress=False, prompt_ids=range(6),
                   n_buckets=8, checkpoint=ckpt, checkpoint_every=1)
    assert RunStatistics.load(ckpt).prompts_done == [0, 1, 2, 3]
    resumed = run_statistics(tiny_model, tiny_tokens, batch_size=2, progress=False, checkpoint=ckpt,
                             n_buckets=8)
    for c, cond in whole.conditions.items():
        for t, st in cond.targets.items():
            np.testing.assert_array_equal(resumed.conditions[c].targets[t].xty, st.xty)
            np.testing.assert_array_equal(resumed.conditions[c].targets[t].sumsq, st.sumsq)
        np.testing.assert_array_equal(resumed.conditions[c].sink_sum, cond.sink_sum)
        np.testing.assert_array_equal(resumed.conditions[c].position_zero.dev_sumsq,
                                      cond.position_zero.dev_sumsq)
    with pytest.raises(ValueError, match="first whole batches"):
        run_statistics(tiny_model, tiny_tokens, batch_size=3, progress=False, checkpoint=ckpt,
                       n_buckets=8)


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_example_two_ranks_gloo(tiny_folder, text_corpus, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    common = ["--model", tiny_folder, "--corpus", text_corpus, "--prompts", 8, "--tokens", 24,
              "--batch-size", 2, "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2",
                           str(ROOT / "examples" / "torchrun_shards.py"), *map(str, common),
                           "--out", str(tmp_path / "dist")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # same thread count as the ranks: float32 forward passes depend on it
    cli("analyze", *common, "--out", tmp_path / "single", env_extra={"OMP_NUM_THREADS": "1"})
    compare_results(tmp_path / "single" / "results.json", tmp_path / "dist" / "results.json")
    assert (tmp_path / "dist" / "report.html").exists()
