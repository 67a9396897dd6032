"""Kills while results are written (merge, the report, shards), with real processes and
SIGKILL, the way tests/test_atomic.py and tests/output/test_shards.py kill theirs.

* The journaled commit (``rope_leak.download_cache.staged_files``, used by
  ``save_analysis`` and ``write_shard``) killed at every one of its steps, in a child
  that loads download_cache.py on its own (stdlib + filelock: fast): once recovered, the
  folder holds exactly its earlier files or exactly the new set, never a mix, never a
  leftover; a rerun ends byte-identical to an uninterrupted write.
* ``rope-leak merge`` killed at random moments (while loading, while the report and
  results are staged) and at the commit's own steps (a hard link of an earlier file, a
  move into --out, just before ``results.json``, the last): --out keeps its earlier
  results, or nothing, and a rerun of the same command ends byte-identical to an
  uninterrupted merge.
* A shard rewritten over an earlier one and killed between its two files: the earlier
  pair is what a merge reads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from rope_leak.download_cache import JOURNAL, recover_staged
from rope_leak.output.results import STAGING_PREFIX, recover_output_dir

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------
# The commit itself, killed at each step
# ---------------------------------------------------------------------------------------

# Every file-system call that changes a folder is counted; the child kills itself at call
# number KILL_AT (0: never) and prints the number of calls it made.
COMMIT_CHILD = textwrap.dedent(
    """
    import importlib.util, os, signal, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("rl_cache", {cache_py!r})
    cache = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cache)
    kill_at, calls = int(sys.argv[2]), [0]
    def counted(fn):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return call
    for name in ("replace", "rename", "link", "unlink", "rmdir", "mkdir"):
        setattr(os, name, counted(getattr(os, name)))
    folder = Path(sys.argv[1])
    with cache.staged_files(folder, prefix={prefix!r}, last="results.json",
                            owned=("results.json", "heads.csv", "stale.csv", "report.html")) as staging:
        cache.atomic_write_text(staging / "heads.csv", "new heads\\n" * 1000)
        cache.atomic_write_text(staging / "report.html", "<html>new report</html>" * 1000)
        cache.atomic_write_text(staging / "results.json", '{{"new": true}}\\n')
    print("calls", calls[0])
    """
)

EARLIER = {"results.json": '{"earlier": true}\n', "heads.csv": "earlier heads\n", "stale.csv": "earlier stale\n",
           "notes.txt": "not ours: never touched\n"}
NEW = {"results.json": '{"new": true}\n', "heads.csv": "new heads\n" * 1000,
       "report.html": "<html>new report</html>" * 1000, "notes.txt": "not ours: never touched\n"}


def folder_state(folder: Path) -> dict[str, str]:
    """Every entry of the folder (hidden ones included) with its text."""
    return {p.name: (p.read_text() if p.is_file() else "<dir>") for p in sorted(folder.iterdir())}


def commit_child(folder: Path, kill_at: int) -> subprocess.CompletedProcess:
    script = COMMIT_CHILD.format(cache_py=str(ROOT / "rope_leak" / "download_cache.py"), prefix=STAGING_PREFIX)
    return subprocess.run([sys.executable, "-c", script, str(folder), str(kill_at)], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("start", ["earlier results", "empty"])
def test_commit_killed_at_every_step(tmp_path, start):
    earlier = EARLIER if start == "earlier results" else {}

    def fresh(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for file, text in earlier.items():
            (folder / file).write_text(text)
        return folder

    whole = fresh("whole")
    done = commit_child(whole, 0)
    assert done.returncode == 0, done.stderr
    n_calls = int(done.stdout.split()[-1])
    expected_new = {k: v for k, v in NEW.items() if k in earlier or k != "notes.txt"}
    assert folder_state(whole) == expected_new
    outcomes = []
    for k in range(1, n_calls + 1):
        folder = fresh(f"kill{k}")
        killed = commit_child(folder, k)
        assert killed.returncode == -signal.SIGKILL, (k, killed.stderr)
        # Right after the kill: results.json is whole (the earlier or the new one), and any
        # change the commit made is undoable (its journal is there).
        results = (folder / "results.json").read_text() if (folder / "results.json").exists() else None
        assert results in (earlier.get("results.json"), NEW["results.json"]), (k, results)
        visible = {n: t for n, t in folder_state(folder).items() if not n.startswith(".")}
        if visible not in (earlier, expected_new):
            assert any((p / JOURNAL).exists() for p in folder.glob(STAGING_PREFIX + "*")), (k, visible)
        # Recovered (what every later write or check of the folder runs first): exactly the
        # earlier files or exactly the new set, and nothing else.
        recover_staged(folder, STAGING_PREFIX)
        state = folder_state(folder)
        assert state in (earlier, expected_new), (k, state)
        outcomes.append("new" if state == expected_new and state != earlier else "earlier")
        # A rerun ends byte-identical to the uninterrupted write.
        again = commit_child(folder, 0)
        assert again.returncode == 0, again.stderr
        assert folder_state(folder) == expected_new, k
    # Killed early the folder stays as it was; killed after the commit point it is complete.
    assert outcomes[0] == "earlier" and outcomes[-1] == "new"
    assert outcomes == sorted(outcomes, key=["earlier", "new"].index), outcomes
    print(f"{n_calls} kill points ({start}): {outcomes.count('earlier')} leave the earlier files, "
          f"{outcomes.count('new')} the new set")


def test_error_during_commit_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    from rope_leak import download_cache

    folder = tmp_path / "out"
    folder.mkdir()
    for file, text in EARLIER.items():
        (folder / file).write_text(text)
    real, moves = os.replace, []

    def failing(src, dst):
        if Path(dst).parent == folder:
            moves.append(dst)
            if len(moves) == 2:
                raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(download_cache.os, "replace", failing)
    with pytest.raises(OSError, match="No space"):
        with download_cache.staged_files(folder, prefix=STAGING_PREFIX, last="results.json",
                                         owned=("results.json", "heads.csv", "stale.csv")) as staging:
            download_cache.atomic_write_text(staging / "heads.csv", "new")
            download_cache.atomic_write_text(staging / "layers.csv", "new")
            download_cache.atomic_write_text(staging / "results.json", "new")
    assert folder_state(folder) == EARLIER


# ---------------------------------------------------------------------------------------
# rope-leak merge, killed
# ---------------------------------------------------------------------------------------


def cli_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "rope_leak.cli", *map(str, args)], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"rope-leak {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


# Runs the command line in-process with os.replace / os.link counted: SIGKILL at the
# KILL_AT-th call of KIND whose destination lies in --out (the commit's moves) or in a
# staging folder's backups (the commit's hard links).
CLI_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    kind, kill_at, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]).resolve()
    seen = [0]
    def counted(fn, name):
        def call(src, dst, *args, **kwargs):
            parent = Path(dst).resolve().parent
            if name == kind and (parent == out or parent.name == ".previous"):
                seen[0] += 1
                if seen[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(src, dst, *args, **kwargs)
        return call
    os.replace, os.link = counted(os.replace, "replace"), counted(os.link, "link")
    from rope_leak.cli import main
    sys.exit(main(sys.argv[4:]))
    """
)


@pytest.fixture(scope="module")
def shards(tiny_folder, tmp_path_factory, synthetic_text):
    """Two finished shards of one tiny analysis (real `analyze --shard` processes)."""
    root = tmp_path_factory.mktemp("kill_merge")
    corpus = root / "texts"
    corpus.mkdir()
    for k in range(6):
        (corpus / f"doc{k}.txt").write_text(synthetic_text(1500, seed=k))
    common = ["analyze", "--model", tiny_folder, "--corpus", corpus, "--prompts", 8, "--tokens", 40,
              "--batch-size", 2, "--no-progress", "--no-sinks"]
    procs = [subprocess.Popen([sys.executable, "-m", "rope_leak.cli", *map(str, common), "--shard", f"{k}/2",
                               "--out", str(root / f"shard{k}")], cwd=ROOT, env=cli_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for k in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    return [root / "shard0", root / "shard1"]


def result_files(folder: Path) -> dict[str, object]:
    """What a results folder holds, comparable across runs: bytes of every file but the
    statistics (compared by content: zip entries carry their write time) and run_info.json
    (timings: compared by keys)."""
    from rope_leak.engine.statistics import RunStatistics

    out: dict[str, object] = {}
    for path in sorted(folder.iterdir()):
        if path.name == "statistics.npz":
            stats = RunStatistics.load(path)
            out[path.name] = (stats.prompts_done, {
                (c, t): (st.xty.tobytes(), st.sumsq.tobytes()) for c, cond in stats.conditions.items()
                for t, st in cond.targets.items()})
        elif path.name == "run_info.json":
            out[path.name] = sorted(json.loads(path.read_text()))
        elif path.is_file():
            out[path.name] = path.read_bytes()
        else:
            out[path.name] = "<dir>"
    return out


def earlier_results(folder: Path) -> None:
    """A folder holding the results of an earlier run (and a file that is not ours)."""
    folder.mkdir()
    for name in ("results.json", "heads.csv", "layers.csv", "report.html"):
        (folder / name).write_text(f"earlier {name}\n")
    (folder / "run_info.json").write_text('{"earlier": 1}\n')
    (folder / "notes.txt").write_text("mine\n")


def raw(folder: Path) -> dict[str, bytes]:
    """Every entry of the folder, hidden ones included, with its bytes."""
    if not folder.exists():
        return {}
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.iterdir())}


def check_after_kill(out: Path, before: dict, whole: dict) -> str:
    """After recovery --out holds exactly (byte for byte) what it held, or the complete
    merge and nothing else."""
    recover_output_dir(out)
    if raw(out) == before:
        return "earlier"
    state = result_files(out)
    mine = {"notes.txt": before["notes.txt"]} if "notes.txt" in before else {}
    assert state == {**whole, **mine}, sorted(state)
    return "complete"


@pytest.fixture(scope="module")
def whole(shards, tmp_path_factory):
    """What an uninterrupted merge writes."""
    out = tmp_path_factory.mktemp("whole") / "merged"
    cli("merge", *shards, "--out", out)
    files = result_files(out)
    assert {"results.json", "heads.csv", "layers.csv", "statistics.npz", "report.html"} <= set(files)
    return files


@pytest.mark.parametrize("start,moment", [("fresh", "staging"), ("earlier results", "anytime"),
                                          ("earlier results", "staging")])
def test_merge_killed_at_a_random_moment(shards, whole, tmp_path, start, moment):
    """SIGKILL at a random moment of the whole merge (mostly while it loads), or while the
    report and results are staged; then the same command again."""
    overwrite = ["--overwrite"] if start == "earlier results" else []
    rng = random.Random(f"{start}/{moment}")
    out = tmp_path / "out"
    if overwrite:
        earlier_results(out)
    before = raw(out)
    proc = subprocess.Popen([sys.executable, "-m", "rope_leak.cli", "merge", *map(str, shards), "--out",
                             str(out), *overwrite], cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if moment == "anytime":
        time.sleep(rng.uniform(0.5, 5.0))
    else:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not any(out.glob(STAGING_PREFIX + "*")):
            time.sleep(0.002)
        assert proc.poll() is None, "the merge ended before it staged anything"
        time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    outcome = check_after_kill(out, before, whole) if proc.returncode == -signal.SIGKILL else "finished"
    print(f"merge killed ({start}, {moment}): {outcome}")
    rerun = cli("merge", *shards, "--out", out, *overwrite, check=False)
    # Killed after its commit point, a fresh merge has written everything: the rerun is
    # refused (the folder holds results) and the folder is already what it would write.
    assert rerun.returncode == 0 or (outcome == "complete" and "already holds results" in rerun.stderr), \
        rerun.stderr[-2000:]
    assert {k: v for k, v in result_files(out).items() if k != "notes.txt"} == whole
    assert not any(p.name.startswith(".") for p in out.iterdir())


@pytest.mark.parametrize("kind,kill_at", [("link", 1), ("replace", 3), ("replace", 6)])
def test_merge_killed_in_its_commit(shards, whole, tmp_path, kind, kill_at):
    """SIGKILL among the commit's own steps (hard links of the earlier files, the moves
    into --out; the sixth move is results.json, the last): after it --out holds its
    earlier results again once checked, and the same command then completes the merge."""
    out = tmp_path / "out"
    earlier_results(out)
    before = raw(out)
    args = ["merge", *map(str, shards), "--out", str(out), "--overwrite"]
    proc = subprocess.run([sys.executable, "-c", CLI_KILLER, kind, str(kill_at), str(out), *args], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # Before any recovery: results.json is still the earlier one (the last file moved).
    assert (out / "results.json").read_text() == "earlier results.json\n"
    assert any(out.glob(STAGING_PREFIX + "*"))
    assert check_after_kill(out, before, whole) == "earlier"
    assert not any(p.name.startswith(".") for p in out.iterdir())
    cli(*args)
    assert {k: v for k, v in result_files(out).items() if k != "notes.txt"} == whole
    assert (out / "notes.txt").read_text() == "mine\n"


def test_shard_write_killed_in_its_commit(shards, tmp_path):
    """A shard rewritten over an earlier one and killed between its two files: merge sees
    the earlier pair (recovered), never new statistics with an old shard.json."""
    from rope_leak.engine.statistics import RunStatistics
    from rope_leak.output.shards import SHARD_FILE, STATISTICS_FILE, recover_shard_dir, write_shard

    folder = tmp_path / "shard0"
    shutil.copytree(shards[0], folder)
    before = {n: (folder / n).read_bytes() for n in (STATISTICS_FILE, SHARD_FILE)}
    script = textwrap.dedent(
        f"""
        import os, signal, sys, json
        from pathlib import Path
        from rope_leak.engine.statistics import RunStatistics
        from rope_leak.output.shards import write_shard
        folder = Path({str(folder)!r})
        stats = RunStatistics.load(folder / "statistics.npz")
        info = json.loads((folder / "shard.json").read_text())
        real = os.replace
        def replace(src, dst):
            if Path(dst).name == "shard.json" and Path(dst).parent == folder:
                os.kill(os.getpid(), signal.SIGKILL)  # statistics.npz is already in place
            return real(src, dst)
        os.replace = replace
        write_shard(stats, folder, shard=(0, 2), n_prompts=info["n_prompts_total"],
                    provenance={{**info["provenance"], "rewritten": True}})
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (folder / STATISTICS_FILE).read_bytes() != before[STATISTICS_FILE]  # the new one, moved in
    recover_shard_dir(folder)
    assert {n: (folder / n).read_bytes() for n in (STATISTICS_FILE, SHARD_FILE)} == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in shards[0].iterdir())
    stats = RunStatistics.load(folder / STATISTICS_FILE)
    write_shard(stats, folder, shard=(0, 2), n_prompts=8,
                provenance=json.loads(before[SHARD_FILE])["provenance"])
    assert json.loads((folder / SHARD_FILE).read_text()) == json.loads(before[SHARD_FILE])
    np.testing.assert_array_equal(RunStatistics.load(folder / STATISTICS_FILE).prompts_done, stats.prompts_done)
