"""The streaming engine and the share fits, against independent references:
numpy least squares on the raw per-pair rows, and synthetic heads whose answer is
known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rope_leak.engine.accumulate import LayerAccumulator, NonFiniteAttentionError
from rope_leak.engine.diagonals import diagonal_sums
from rope_leak.engine.pairs import PairDesign, PairSpec
from rope_leak.engine.run import run_statistics
from rope_leak.engine.statistics import TARGETS, RunStatistics
from rope_leak.fits.shares import absolute_sum_of_squares, fit_shares

MASKED_TARGETS = TARGETS


def masked(scores: torch.Tensor) -> torch.Tensor:
    n = scores.shape[-1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return scores.masked_fill(j > i, float("-inf"))


def relative_scores(n_prompts, n_heads, n, noise=0.3, absolute=0.0, seed=0):
    """Scores ``f((i - j) mod n) + absolute * g(i) + noise``: purely relative when
    ``absolute == 0``. Periodic in the offset, so under a bidirectional mask every query
    sees the same multiset of logits and ``Z_i`` carries no position."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(n, generator=gen, dtype=torch.float64)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    base = f[(i - j) % n] + absolute * torch.sin(i / 3.0)
    return base + noise * torch.randn(n_prompts, n_heads, n, n, generator=gen, dtype=torch.float64)


def accumulate(scores, spec=PairSpec(), targets=MASKED_TARGETS, n_buckets=4, cell_maps=True):
    """Statistics of masked ``scores``."""
    design = PairDesign(spec, scores.shape[-1])
    acc = LayerAccumulator(design, 1, scores.shape[1], n_buckets, targets, cell_maps=cell_maps)
    ids = torch.arange(scores.shape[0])
    acc.add_layer(0, scores, ids)
    acc.add_prompts(ids)
    return acc.to_statistics()


def lstsq_r2(design: PairDesign, y: np.ndarray, columns: slice | None) -> float:
    """Cross-fitted R² by numpy lstsq on the per-pair rows (y: [prompt, cell])."""
    X = design.design_matrix()
    if columns is not None:
        X = X[:, columns]
    folds = np.arange(len(y)) % 2
    r2 = []
    for fit_fold in (0, 1):
        train, test = y[folds == fit_fold], y[folds != fit_fold]
        beta = np.linalg.lstsq(np.tile(X, (len(train), 1)), train.ravel(), rcond=None)[0]
        residual = test - X @ beta
        r2.append(1 - (residual**2).sum() / ((test - test.mean()) ** 2).sum())
    return float(np.mean(r2))


def test_diagonal_sums_match_torch_diagonal():
    y = torch.randn(3, 2, 9, 9)
    expected = torch.stack([torch.diagonal(y, -d, -2, -1).sum(-1) for d in range(9)], -1)
    torch.testing.assert_close(diagonal_sums(y), expected)


@pytest.mark.parametrize("spec", [PairSpec(), PairSpec(include_sink=True), PairSpec(min_query=3, max_query=10),
                                  PairSpec(max_offset=5)])
def test_r2_matches_numpy_least_squares(spec):
    scores = masked(relative_scores(8, 2, 12, absolute=0.4, seed=1))
    stats = accumulate(scores.float(), spec)
    design = PairDesign(spec, 12)
    q, k = design.cells
    log_z = torch.logsumexp(scores, -1, keepdim=True)
    references = {
        "scores": scores, "log_pattern": scores - log_z, "pattern": (scores - log_z).exp(),
        "neg_log_z": (-log_z).expand_as(scores),
    }
    for target, y in references.items():
        fit = fit_shares(stats[target])
        for head in range(2):
            rows = y[:, head, q, k].numpy()
            assert fit.r2_abs[0, head] == pytest.approx(lstsq_r2(design, rows, None), abs=2e-5)
            assert fit.r2_rel[0, head] == pytest.approx(lstsq_r2(design, rows, design.relative_columns), abs=2e-5)
            # M_cell: out-of-sample cell means.
            folds = np.arange(len(rows)) % 2
            r2_cell = np.mean([
                1 - ((rows[folds != f] - rows[folds == f].mean(0)) ** 2).sum()
                / ((rows[folds != f] - rows[folds != f].mean()) ** 2).sum()
                for f in (0, 1)
            ])
            assert fit.r2_cell[0, head] == pytest.approx(r2_cell, abs=2e-5)


def test_relative_head_bidirectional_has_no_share_causal_has_pattern_share():
    n, heads = 24, 6
    scores = relative_scores(32, heads, n, noise=0.5, seed=2)
    bidirectional = fit_shares(accumulate(scores.float())["pattern"]).share
    causal_stats = accumulate(masked(scores).float())
    causal_pattern = fit_shares(causal_stats["pattern"]).share
    causal_scores = fit_shares(causal_stats["scores"]).share
    # Bidirectional and on raw scores: nothing to find (cross-fitting => <= 0 up to noise).
    assert np.all(np.abs(bidirectional) < 0.01)
    assert np.all(np.abs(causal_scores) < 0.01)
    # The causal denominator makes the same head's pattern depend on the query position.
    assert np.all(causal_pattern > 0.05)


def test_planted_absolute_term_is_found_on_scores():
    scores = relative_scores(32, 2, 20, noise=0.3, absolute=0.5, seed=3)
    share = fit_shares(accumulate(masked(scores).float())["scores"]).share
    assert np.all(share > 0.05)


def test_absolute_sum_of_squares_is_zero_for_relative_and_positive_for_absolute():
    design = PairDesign(PairSpec(), 10)
    q, k = design.cells
    relative = np.cos(q - k)
    absolute = np.sin(q / 2.0)
    assert absolute_sum_of_squares(design, relative) == pytest.approx(0, abs=1e-18)
    assert absolute_sum_of_squares(design, absolute) > 0.1


def test_non_finite_scores_are_reported_with_layer_and_head():
    scores = masked(relative_scores(2, 3, 8)).float()
    scores[1, 2, 5, 3] = float("nan")
    design = PairDesign(PairSpec(), 8)
    acc = LayerAccumulator(design, 4, 3, 2, ("pattern",))
    with pytest.raises(NonFiniteAttentionError, match="layer 3, head 2"):
        acc.add_layer(3, scores, torch.arange(2))


def test_split_runs_merge_to_one_run(tiny_model, tiny_tokens):
    kw = dict(progress=False, n_buckets=8, cell_maps=True)
    whole = run_statistics(tiny_model, tiny_tokens, batch_size=3, **kw)
    first = run_statistics(tiny_model, tiny_tokens[:5], prompt_ids=range(5), **kw)
    second = run_statistics(tiny_model, tiny_tokens[5:], prompt_ids=range(5, 12), **kw)
    merged = first.merge(second)
    for condition, stats in whole.conditions.items():
        other = merged.conditions[condition]
        for target, cell in stats.targets.items():
            np.testing.assert_allclose(other.targets[target].xty, cell.xty, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(other.targets[target].fold_cell_sums(), cell.fold_cell_sums(), rtol=1e-9, atol=1e-9)
            np.testing.assert_array_equal(other.targets[target].count, cell.count)
            np.testing.assert_allclose(
                fit_shares(other.targets[target]).share, fit_shares(cell).share, atol=1e-9
            )
        np.testing.assert_allclose(other.position_zero.std(), stats.position_zero.std(), atol=1e-9)
    with pytest.raises(ValueError, match="share"):
        first.merge(first)


def test_statistics_round_trip_through_file(tiny_model, tiny_tokens, tmp_path):
    stats = run_statistics(tiny_model, tiny_tokens, progress=False)
    path = stats.save(tmp_path / "stats.npz")
    loaded = RunStatistics.load(path)
    for condition, cond in stats.conditions.items():
        for target, cell in cond.targets.items():
            np.testing.assert_array_equal(loaded.conditions[condition].targets[target].xty, cell.xty)
        np.testing.assert_array_equal(loaded.conditions[condition].sink_sum, cond.sink_sum)
    assert loaded.prompts_done == stats.prompts_done
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        RunStatistics.load(tmp_path / "bad.npz")


def test_statistics_file_is_byte_identical_at_any_time(tiny_model, tiny_tokens, tmp_path, monkeypatch):
    """The same statistics saved at two different clock times give the same bytes (zip
    entries carry no write time), and still load with numpy."""
    import time

    stats = run_statistics(tiny_model, tiny_tokens, progress=False)
    first = stats.save(tmp_path / "first.npz").read_bytes()
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 3 * 86400)  # three days later
    assert stats.save(tmp_path / "second.npz").read_bytes() == first
    loaded = RunStatistics.load(tmp_path / "second.npz")
    np.testing.assert_array_equal(loaded.conditions["causal"].targets["pattern"].xty,
                                  stats.conditions["causal"].targets["pattern"].xty)


def test_engine_pattern_equals_model_pattern(tiny_model, tiny_tokens):
    """The engine derives A from the scores; it must be the model's own hook_pattern."""
    seen = {}

    def grab(pattern, hook):
        seen[hook.name] = pattern.detach().clone()

    design = PairDesign(PairSpec(include_sink=True), tiny_tokens.shape[1])
    acc = LayerAccumulator(design, tiny_model.cfg.n_layers, tiny_model.cfg.n_heads, 2, ("pattern",),
                           cell_maps=True)
    ids = torch.arange(len(tiny_tokens))
    hooks = [(f"blocks.{l}.attn.hook_pattern", grab) for l in range(tiny_model.cfg.n_layers)]
    hooks += [(f"blocks.{l}.attn.hook_attn_scores", lambda s, hook, l=l: acc.add_layer(l, s, ids))
              for l in range(tiny_model.cfg.n_layers)]
    with torch.no_grad():
        tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=hooks)
    acc.add_prompts(ids)
    cell_means = acc.to_statistics()["pattern"].fold_cell_sums().sum(0) / len(ids)
    q, k = design.cells
    for layer in range(tiny_model.cfg.n_layers):
        expected = seen[f"blocks.{layer}.attn.hook_pattern"][:, :, q, k].double().mean(0).numpy()
        np.testing.assert_allclose(cell_means[layer], expected, atol=1e-6)


def test_position_zero_std_exactly_zero_causal_nonzero_bidirectional(tiny_model, tiny_tokens):
    stats = run_statistics(tiny_model, tiny_tokens, progress=False)
    causal = stats.conditions["causal"].position_zero
    bidirectional = stats.conditions["bidirectional"].position_zero
    assert np.all(causal.std() == 0.0)
    assert np.all(causal.max_abs_dev == 0.0)
    # Embedding layer identical (same BOS), every later layer mixes in other positions.
    assert bidirectional.std()[0] == 0.0
    assert np.all(bidirectional.std()[1:] > 1e-3)


@pytest.mark.parametrize("targets", [("neg_log_z",), ("log_pattern",), ("pattern", "neg_log_z")])
def test_target_subsets_give_the_same_statistics(targets):
    scores = masked(3 * torch.randn(4, 2, 9, 9, generator=torch.Generator().manual_seed(4)))
    full = accumulate(scores)
    subset = accumulate(scores, targets=targets)
    expected = set(targets) | ({"scores"} if "log_pattern" in targets else set())
    assert set(subset) == expected
    for target in expected:
        np.testing.assert_array_equal(subset[target].xty, full[target].xty)
        np.testing.assert_array_equal(subset[target].sumsq, full[target].sumsq)
        np.testing.assert_array_equal(subset[target].fold_cell_sums(), full[target].fold_cell_sums())


def test_allocator_keeps_freed_memory_so_a_second_pass_does_not_fault():
    """After tune_allocator (glibc), freeing and re-allocating forward-sized tensors
    costs no page faults; ROPE_LEAK_MALLOC=0 leaves the allocator alone.

    Untuned glibc may or may not return the pages (its thresholds adapt to the history,
    which is the problem the tuning removes), so the control that shows the probe can
    fail returns them explicitly with malloc_trim."""
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    script = (
        "import ctypes, resource, sys, torch\n"
        "from rope_leak.engine.allocator import tune_allocator\n"
        "applied = tune_allocator()\n"
        "trim = sys.argv[1] == 'trim'\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "def one_pass():\n"
        "    held = [torch.ones(5_000_000) for _ in range(4)]; del held\n"
        "    if trim:\n"
        "        libc.malloc_trim(0)\n"
        "for _ in range(4):  # let the heap reach its steady size\n"
        "    one_pass()\n"
        "faults = []\n"
        "for _ in range(3):  # the least of three: a busy machine can add stray faults\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    one_pass()\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "print(applied, min(faults))\n"
    )
    root = str(Path(__file__).resolve().parents[2])

    def run(env_value, mode="plain"):
        env = dict(os.environ, ROPE_LEAK_MALLOC=env_value,
                   PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                             check=True, env=env)
        applied, faults = out.stdout.split()
        return applied == "True", int(faults)

    applied, faults = run("1")
    assert applied and faults < 100, faults  # 4 x 20 MB re-used: no fresh pages
    applied, faults = run("1", "trim")
    assert applied and faults > 1000, faults  # pages handed back do fault again: the probe sees it
    applied, _ = run("0")
    assert not applied




def test_torch_path_copies_nothing_to_the_host_per_batch(tiny_model, tiny_tokens, monkeypatch):
    """The accumulators of the torch path (the GPU path) stay on the model's device: no
    .cpu(), .numpy(), .item() or .tolist() during the batches; one transfer at the end."""
    from rope_leak.engine.run import ConditionRun

    run = ConditionRun(tiny_model, PairDesign(PairSpec(), tiny_tokens.shape[1]), TARGETS, 4,
                       start_cut_window=4)
    run.acc.use_kernel = False
    calls = []
    for name in ("cpu", "numpy", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for start in range(0, 12, 4):
        run.run_batch(tiny_tokens[start:start + 4], torch.arange(start, start + 4))
    assert calls == []
    stats = run.statistics("causal")  # the one transfer
    assert calls and stats.targets["pattern"].n_prompts == 12
