"""The renormalisation split: invariant under per-query shifts of the scores, right on
heads whose answer is known by construction, and equal to a float64 brute force."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rope_leak.backends import tiny_rope_model
from rope_leak.engine.accumulate import LayerAccumulator
from rope_leak.engine.pairs import PairDesign, PairSpec
from rope_leak.engine.run import run_statistics
from rope_leak.engine.statistics import TARGETS, ConditionStatistics, PositionZeroStatistics
from rope_leak.fits.shares import fit_shares
from rope_leak.fits.split import renormalisation_split


def split_of(full: torch.Tensor, n_buckets: int = 8):
    """Split of synthetic heads: ``full`` = unmasked scores ``[prompt, head, n, n]``."""
    n = full.shape[-1]
    masked = full.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    design = PairDesign(PairSpec(), n)
    acc = LayerAccumulator(design, 1, full.shape[1], n_buckets, TARGETS, unmasked=True)
    ids = torch.arange(full.shape[0])
    acc.add_layer(0, masked, ids, torch.logsumexp(full, -1))
    acc.add_prompts(ids)
    cond = ConditionStatistics("causal", acc.to_statistics(), np.zeros((n_buckets, 1, full.shape[1])),
                               PositionZeroStatistics())
    return renormalisation_split(cond, n_boot=0), cond


def heads(n=48, prompts=16, seed=0, key_effect=0.0, temperature=0.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(2 * n, generator=gen, dtype=torch.float64)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    base = f[(i - j) + n] + key_effect * torch.sin(j / 5.0) + shift * torch.randn(n, 1, generator=gen,
                                                                                      dtype=torch.float64)
    base = base * (1 + temperature * i / n)
    return base + 0.2 * torch.randn(prompts, 1, n, n, generator=gen, dtype=torch.float64)


def test_purely_relative_head_is_almost_all_mask():
    split, _ = split_of(heads())
    assert split.mask[0, 0] > 0
    assert split.composition() > 0.9  # the rest: sequence edges of the unmasked softmax


def test_per_query_shift_of_the_scores_changes_nothing():
    plain, _ = split_of(heads(shift=0.0))
    shifted, cond = split_of(heads(shift=25.0))
    for name in ("total", "resid", "mask", "cross", "sst"):
        np.testing.assert_allclose(getattr(shifted, name), getattr(plain, name), rtol=1e-9, atol=1e-12)
    # the scores themselves did move (the test can fail)
    assert not np.allclose(cond.targets["scores"].xty, split_of(heads())[1].targets["scores"].xty)


def test_planted_absolute_key_effect_lands_in_the_scores_term():
    plain, _ = split_of(heads())
    planted, _ = split_of(heads(key_effect=2.0))
    assert planted.resid[0, 0] > 20 * max(plain.resid[0, 0], 1e-9)
    assert planted.composition() < 0.5


def test_temperature_growing_with_the_query_lands_in_the_scores_term():
    plain, _ = split_of(heads())
    hot, _ = split_of(heads(temperature=1.0))
    assert hot.resid[0, 0] > 10 * max(plain.resid[0, 0], 1e-9)


def test_split_terms_equal_a_float64_brute_force():
    """U-statistics of <D mu_a, D mu_b> from per-prompt float64 log-softmaxes and dense
    least squares, against the engine's marginal sums."""
    full = heads(n=12, prompts=8, key_effect=0.7)
    split, _ = split_of(full, n_buckets=8)  # one prompt per bucket
    n = full.shape[-1]
    design = PairDesign(PairSpec(), n)
    q, k = design.cells
    masked = full.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    log_a = torch.log_softmax(masked, -1)[:, 0][:, q, k].numpy()
    log_full = torch.log_softmax(full, -1)[:, 0][:, q, k].numpy()
    m = log_a - log_full
    X = design.design_matrix()

    def d(y):  # (H_abs - H_rel) y for rows y
        hat = lambda M: M @ np.linalg.lstsq(M, y.T, rcond=None)[0]  # noqa: E731
        return (hat(X) - hat(X[:, design.relative_columns])).T

    def ustat(a, b):
        da, db = d(a), d(b)
        gram = da @ db.T
        return (gram.sum() - np.trace(gram)) / (len(a) ** 2 - len(a))

    np.testing.assert_allclose(split.total[0, 0], ustat(log_a, log_a), rtol=1e-8)
    np.testing.assert_allclose(split.resid[0, 0], ustat(log_full, log_full), rtol=1e-8)
    np.testing.assert_allclose(split.mask[0, 0], ustat(m, m), rtol=1e-8)
    np.testing.assert_allclose(split.cross[0, 0], 2 * ustat(log_full, m), rtol=1e-8, atol=1e-12)


@pytest.fixture(scope="module")
def double_model():
    model = tiny_rope_model(n_layers=2, d_model=32, n_heads=2, d_head=16, n_ctx=32, d_vocab=40, seed=3)
    model.cfg.dtype = torch.float64
    return model.to(torch.float64)


def test_model_run_invariant_to_a_per_query_score_offset(double_model):
    """A hook adds random c_i to every score of query i (softmax unchanged): every
    number of the split and of the pattern / log_pattern fits stays equal."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 40, (8, 16), generator=gen)
    tokens[:, 0] = 0
    offsets = 30 * torch.randn(2, 16, generator=gen, dtype=torch.float64)

    def run(shift: bool):
        double_model.reset_hooks()
        if shift:
            for layer in range(2):
                double_model.add_hook(f"blocks.{layer}.attn.hook_attn_scores",
                                      lambda s, hook, c=offsets[layer]: s + c[:, None])
        try:
            return run_statistics(double_model, tokens, progress=False, n_buckets=8)
        finally:
            double_model.reset_hooks()

    plain, shifted = run(False), run(True)
    a, b = (renormalisation_split(s.conditions["causal"], n_boot=50) for s in (plain, shifted))
    for name in ("total", "resid", "mask", "cross", "sst"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-9, atol=1e-12)
    assert a.summary()["composition"] == pytest.approx(b.summary()["composition"], abs=1e-9)
    for target in ("pattern", "log_pattern"):
        fa, fb = (fit_shares(s.conditions["causal"].targets[target]) for s in (plain, shifted))
        np.testing.assert_allclose(fb.share, fa.share, rtol=1e-9, atol=1e-12)
    # the raw scores moved, so the hook did act
    sa, sb = (s.conditions["causal"].targets["scores"].sumsq for s in (plain, shifted))
    assert not np.allclose(sa, sb)


@pytest.mark.parametrize("dtype", ["float64", "float32"], ids=["torch-path", "kernel-path"])
def test_unmasked_pass_leaves_the_model_output_unchanged(double_model, dtype):
    """Lifting the mask and re-imposing it in the hook computes exactly the causal model
    (float32 runs the C kernel on the unmasked scores, where it is available)."""
    from rope_leak.engine.run import ConditionRun

    model = double_model if dtype == "float64" else copy.deepcopy(double_model).float()
    if dtype == "float32":
        model.cfg.dtype = torch.float32
    tokens = torch.randint(1, 40, (3, 12), generator=torch.Generator().manual_seed(2))
    expected = model(tokens)
    run = ConditionRun(model, PairDesign(PairSpec(), 12), TARGETS, 2, unmasked=True)
    logits = run.forward(tokens, torch.arange(3), return_type="logits")
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12 if dtype == "float64" else 0)
    assert all(b.attn._attention_dir_override is None for b in model.blocks)
    assert run.acc.count.sum() == 3


def test_degenerate_heads_by_total_or_fold_variance():
    from rope_leak.fits.degenerate import DEGENERATE_FLOOR, degenerate_heads

    sst = np.array([[1.0, 2.0, 0.5, 1e-6]])
    folds = np.stack([sst, sst.copy()])
    folds[1, 0, 2] = 1e-7  # one fold of head 2 has almost no variance (a ratio of tiny numbers)
    assert degenerate_heads(sst).tolist() == [[False, False, False, True]]
    assert degenerate_heads(sst, fold_sst=folds).tolist() == [[False, False, True, True]]
    assert degenerate_heads(sst * 0).all()  # no variance anywhere
    assert DEGENERATE_FLOOR == 1e-3


def test_a_sink_head_is_degenerate_and_left_out_of_the_pooled_composition():
    """A head with all its attention on key 0 (not scored) has a pattern of about 0 on
    every scored pair: flagged, and the pooled composition is that of the other head."""
    from rope_leak.inference.intervals import decomposition_inference

    full = torch.cat([heads(seed=1), heads(seed=2)], 1)
    full[:, 1, :, 0] += 60.0  # head 1: a sink
    _, causal = split_of(full)
    _, solo = split_of(full[:, :1])
    both = decomposition_inference(causal, causal, "pattern", n_boot=20, n_flips=20)
    one = decomposition_inference(solo, solo, "pattern", n_boot=20, n_flips=20)
    assert both.degenerate.tolist() == [[False, True]]
    assert float(both.means.estimate[0]) == pytest.approx(float(one.means.estimate[0]), rel=1e-12)
