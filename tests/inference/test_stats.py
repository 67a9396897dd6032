"""Statistics layer (rope_leak.inference): exactness of the batched fits, calibration of the
nulls, BH, debiasing and bootstrap coverage, on synthetic heads fed through the engine's
LayerAccumulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rope_leak.engine.accumulate import LayerAccumulator
from rope_leak.engine.pairs import PairDesign, PairSpec
from rope_leak.fits.debias import crossfit_bias, debiased_share
from rope_leak.fits.projection import BucketProjection
from rope_leak.fits.shares import fit_shares
from rope_leak.inference.bootstrap import bootstrap_shares, bootstrap_statistic, bucket_weights
from rope_leak.inference.fdr import benjamini_hochberg
from rope_leak.inference.nulls import diagonal_permutations, permutation_null, signflip_null


def relative_logits(n: int, n_heads: int, rng: np.random.Generator) -> np.ndarray:
    """``[head, n, n]`` logits ``f_h(i - j)``, periodic in ``i - j`` with period ``n``
    (RoPE-like frequencies that are multiples of 2π/n). Periodicity makes every row of
    the bidirectional softmax a cyclic shift of row 0, so Z_i is the same for all i and
    even ``pattern`` is purely relative on the causal cells (a non-periodic f would
    leak absolute position through Z_i)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    out = np.zeros((n_heads, n, n))
    for m in (1, 2, 3):
        amp = rng.uniform(0.3, 1.0, size=(n_heads, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, size=(n_heads, 1, 1))
        out += amp * np.cos(2 * np.pi * m * d[None] / n + phase)
    return out


def absolute_term(n: int) -> np.ndarray:
    """``[n, n]`` absolute-position logits ``g(i) + h(j)`` (query and key effects)."""
    pos = np.arange(n) / n
    return np.cos(np.pi * pos)[:, None] + 0.5 * np.sin(2 * np.pi * pos)[None, :]


def simulate(n, n_prompts, n_heads, n_buckets, seed, beta=0.0, sigma=1.0, causal=False,
             targets=("scores",)):
    """Accumulate ``f_h(i - j) + beta_h * abs(i, j) + sigma * noise`` for one layer.

    Returns ``(stats by target, population cell means [head, n, n])``."""
    rng = np.random.default_rng(seed)
    beta = np.broadcast_to(np.asarray(beta, dtype=float), (n_heads,))
    mean = relative_logits(n, n_heads, rng) + beta[:, None, None] * absolute_term(n)[None]
    noise = rng.normal(size=(n_prompts, n_heads, n, n)) * sigma
    scores = torch.tensor(mean[None] + noise, dtype=torch.float32)
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    design = PairDesign(PairSpec(), n)
    acc = LayerAccumulator(design, 1, n_heads, n_buckets, targets, cell_maps=True)
    ids = torch.arange(n_prompts)
    acc.add_prompts(ids)
    acc.add_layer(0, scores, ids)
    return acc.to_statistics(), mean


def population_share(mean: np.ndarray, sigma: float) -> np.ndarray:
    """dR2 of the population for target ``scores``, computed independently with numpy
    lstsq on the dense design: ``||(H_abs - H_rel) mu||² / (sum (mu - mean mu)² +
    n_cells sigma²)`` over the cells ``1 <= j <= i``."""
    n = mean.shape[-1]
    qi, kj = np.tril_indices(n)
    keep = (kj >= 1) & (qi >= 1)
    qi, kj = qi[keep], kj[keep]
    onehot = lambda v: (v[:, None] == np.unique(v)[None]).astype(float)  # noqa: E731
    x_rel = onehot(qi - kj)
    x_abs = np.hstack([x_rel, onehot(qi), onehot(kj)])
    def rss(x, mu):
        return ((mu - x @ np.linalg.lstsq(x, mu, rcond=None)[0]) ** 2).sum()

    out = []
    for mu in mean[:, qi, kj]:
        sst = ((mu - mu.mean()) ** 2).sum() + len(mu) * sigma**2
        out.append((rss(x_rel, mu) - rss(x_abs, mu)) / sst)
    return np.array(out)


# -- exactness ------------------------------------------------------------------------
def test_batched_share_matches_fit_shares_with_weights():
    stats, _ = simulate(10, 20, 3, 8, seed=1, beta=[0.0, 0.3, 1.0], causal=True,
                        targets=("scores", "pattern"))
    rng = np.random.default_rng(0)
    weights = bucket_weights(stats["pattern"].count, 6, rng)
    for target in ("scores", "pattern"):
        bp = BucketProjection.from_statistics(stats[target])
        batched = bp.crossfit_share(weights)
        for b, w in enumerate(weights):
            np.testing.assert_allclose(
                batched[b], fit_shares(stats[target], w).share, atol=1e-7, rtol=1e-6
            )
        np.testing.assert_allclose(bp.crossfit_share()[0], fit_shares(stats[target]).share,
                                   atol=1e-7)


def test_bucket_weights_resample_within_folds():
    count = np.array([2, 2, 2, 2, 1, 1, 0, 0])
    w = bucket_weights(count, 50, np.random.default_rng(0))
    assert np.all(w[:, 0::2].sum(1) == 3) and np.all(w[:, 1::2].sum(1) == 3)
    assert np.all(w[:, 6:] == 0)  # empty buckets are not units
    assert w[:, :6].std(0).min() > 0  # really resampled


def test_debiased_share_matches_bruteforce_u_statistic():
    n, P, H, G = 9, 14, 2, 6
    stats, _ = simulate(n, P, H, G, seed=3, beta=[0.0, 0.5])
    stats = stats["scores"]
    design = stats.design
    # rebuild per-prompt cell vectors from the same generator
    rng = np.random.default_rng(3)
    mean = relative_logits(n, H, rng) + np.array([0.0, 0.5])[:, None, None] * absolute_term(n)
    y = (mean[None] + rng.normal(size=(P, H, n, n))).astype(np.float32).astype(float)
    y = y[..., design.cells[0], design.cells[1]]  # [P, H, cell]
    x = design.design_matrix()
    x_rel = x[:, design.relative_columns]
    dproj = x @ np.linalg.pinv(x) - x_rel @ np.linalg.pinv(x_rel)
    buckets = np.arange(P) % G
    dy = y @ dproj
    cross = sum(
        (dy[p] * dy[q]).sum(-1) for p in range(P) for q in range(P) if buckets[p] != buckets[q]
    )
    m = np.bincount(buckets)
    theta = cross / (P**2 - (m**2).sum())
    sst = ((y - y.mean((0, 2), keepdims=True)) ** 2).sum((0, 2)) / P
    np.testing.assert_allclose(debiased_share(stats)[0], theta / sst, rtol=1e-6)


def test_permutation_null_identity_is_crossfit_share_and_stays_in_diagonals():
    stats, _ = simulate(10, 12, 2, 4, seed=2, beta=0.5)
    res = permutation_null(stats["scores"], n_perm=3)
    np.testing.assert_allclose(res.observed, fit_shares(stats["scores"]).share, atol=1e-8)
    design = stats["scores"].design
    perms = diagonal_permutations(design, 5, np.random.default_rng(0))
    offset = design.cells[0] - design.cells[1]
    assert np.all(offset[perms] == offset[None])
    assert np.all(np.sort(perms, 1) == np.arange(design.n_cells))
    assert (perms != np.arange(design.n_cells)).any()


# -- BH ---------------------------------------------------------------------------------
def test_benjamini_hochberg_matches_hand_computation():
    p = np.array([[0.01, 0.04, 0.03], [0.005, 0.5, np.nan]])
    # m = 5 finite; sorted 0.005, 0.01, 0.03, 0.04, 0.5 -> p*m/rank = .025 .025 .05 .05 .5
    # running minimum from the top leaves them unchanged.
    res = benjamini_hochberg(p, level=0.05)
    np.testing.assert_allclose(res.qvalues[0], [0.025, 0.05, 0.05])
    np.testing.assert_allclose(res.qvalues[1, :2], [0.025, 0.5])
    assert np.isnan(res.qvalues[1, 2])
    assert res.significant.tolist() == [[True, True, True], [True, False, False]]
    res = benjamini_hochberg(p, level=0.04)
    assert res.significant.tolist() == [[True, False, False], [True, False, False]]
    # step-up: a small p at rank 2 rescues rank 1 (0.03*3/2 = 0.045 > 0.04 = 0.04*3/3)
    q = benjamini_hochberg(np.array([0.03, 0.04, 0.04])).qvalues
    np.testing.assert_allclose(q, [0.04, 0.04, 0.04])


# -- null calibration -------------------------------------------------------------------
@pytest.mark.parametrize("target", ["scores", "pattern"])
def test_relative_head_bidirectional_is_not_significant(target):
    """40 purely relative heads, no mask: few false discoveries after BH at 0.05."""
    false_disc = []
    for seed in range(3):
        stats, _ = simulate(16, 32, 40, 16, seed=seed, sigma=1.0, targets=(target,))
        for res in (signflip_null(stats[target], 1000, seed=seed),
                    permutation_null(stats[target], 99, seed=seed)):
            false_disc.append(benjamini_hochberg(res.pvalues, 0.05).n_significant)
    assert max(false_disc) <= 2 and sum(false_disc) <= 3, false_disc


def test_causal_mask_makes_relative_logits_absolute_in_pattern():
    """Control: the same relative logits under the causal mask put absolute position in
    ``pattern`` (Z_i grows with i), which the nulls must detect."""
    stats, _ = simulate(16, 32, 10, 16, seed=0, sigma=1.0, causal=True, targets=("pattern",))
    for res in (signflip_null(stats["pattern"], 500), permutation_null(stats["pattern"], 99)):
        assert benjamini_hochberg(res.pvalues, 0.05).significant.all()


def test_signflip_pvalues_roughly_uniform_under_null():
    stats, _ = simulate(12, 32, 200, 16, seed=7, sigma=1.0)
    p = signflip_null(stats["scores"], 400, seed=1).pvalues.ravel()
    assert 0.01 <= (p <= 0.05).mean() <= 0.12
    assert 0.4 <= np.mean(p) <= 0.6


# -- debiasing --------------------------------------------------------------------------
@pytest.mark.parametrize("n_prompts", [16, 32, 64])
def test_debiased_share_is_mean_zero_for_relative_heads(n_prompts):
    """Simulation: purely relative heads (bidirectional, ``scores``): the debiased share
    has mean 0 within 3 standard errors; the cross-fitted share is clearly negative (the
    small-sample bias), which the bias estimate accounts for."""
    debiased, crossfit, corrected = [], [], []
    for seed in range(4):
        stats, _ = simulate(16, n_prompts, 50, 16, seed=seed, sigma=1.0)
        st = stats["scores"]
        debiased.append(debiased_share(st).ravel())
        crossfit.append(fit_shares(st).share.ravel())
        corrected.append(crossfit[-1] - crossfit_bias(st).ravel())
    for values in (debiased, corrected):
        v = np.concatenate(values)
        assert abs(v.mean()) < 3 * v.std() / np.sqrt(v.size), (v.mean(), v.std())
    cf = np.concatenate(crossfit)
    assert cf.mean() < -5 * cf.std() / np.sqrt(cf.size)


def test_debiased_share_is_unbiased_for_planted_share():
    betas = np.array([0.3, 0.6])
    errors = []
    for seed in range(10):
        stats, mean = simulate(16, 32, 2, 16, seed=seed, beta=betas, sigma=1.0)
        errors.append(debiased_share(stats["scores"])[0] - population_share(mean, 1.0))
    errors = np.array(errors)
    assert np.all(np.abs(errors.mean(0)) < 3 * errors.std(0) / np.sqrt(len(errors)) + 1e-4)


# -- planted absolute term: significance and coverage ------------------------------------
def test_planted_absolute_term_is_significant_and_covered():
    """``f(i - j) + beta * (g(i) + h(j)) + noise``: population shares ~0.02-0.04 and ~0.08-0.13 (seed-dependent relative part);
    found significant after BH, and the 95% bootstrap interval (default: debiased share,
    pivotal) covers the closed-form population share in >= 80% of 20 seeds, per head."""
    betas = np.array([0.3, 0.6])
    covered, significant = [], []
    for seed in range(20):
        stats, mean = simulate(16, 64, 2, 32, seed=seed, beta=betas, sigma=1.0)
        st = stats["scores"]
        pop = population_share(mean, 1.0)
        assert pop[0] > 0.01 and pop[1] > 0.05
        ci = bootstrap_shares(st, n_boot=300, seed=seed)
        covered.append((ci.ci_low[0] <= pop) & (pop <= ci.ci_high[0]))
        p = signflip_null(st, 300, seed=seed).pvalues
        significant.append(benjamini_hochberg(p, 0.05).significant[0])
    assert np.mean(covered, 0).min() >= 0.8, np.mean(covered, 0)
    assert np.mean(significant, 0).min() >= 0.9, np.mean(significant, 0)
    # the same data under the within-diagonal permutation null
    assert np.all(permutation_null(st, 49, seed=0).pvalues <= 0.02)


def test_crossfit_percentile_interval_misses_population_share():
    """Documents why the default is not the cross-fitted percentile interval: it is
    centred below the population share (estimator bias, doubled in the bootstrap)."""
    stats, mean = simulate(16, 32, 2, 32, seed=0, beta=[0.3, 0.6], sigma=1.0)
    pop = population_share(mean, 1.0)
    cf = bootstrap_shares(stats["scores"], 300, share="crossfit", method="percentile")
    assert np.all(cf.ci_high[0] < pop + 0.01)
    assert np.all((cf.ci_low[0] + cf.ci_high[0]) / 2 < pop)


# -- joint resampling across conditions ---------------------------------------------------
def test_bootstrap_statistic_resamples_conditions_jointly():
    stats, _ = simulate(12, 32, 3, 16, seed=4, beta=[0.0, 0.3, 0.6], sigma=1.0)
    st = stats["scores"]
    # identical conditions: their difference is exactly 0 in every joint replicate
    res = bootstrap_statistic({"causal": st, "bidir": st}, lambda s: s["causal"] - s["bidir"],
                              n_boot=100, keep_samples=True)
    assert res.samples.shape == (100, 1, 3)
    assert np.all(res.samples == 0) and np.all(res.ci_low == 0) and np.all(res.ci_high == 0)
    # a scalar aggregate works and matches the point estimate
    agg = bootstrap_statistic({"a": st}, lambda s: s["a"].mean((-1, -2)), n_boot=100)
    assert agg.estimate.shape == () and agg.ci_low <= agg.estimate <= agg.ci_high
    np.testing.assert_allclose(agg.estimate, debiased_share(st).mean())
    # single-condition shares agree with bootstrap_shares, same seed
    one = bootstrap_shares(st, 100, seed=3)
    two = bootstrap_statistic({"x": st}, None, n_boot=100, seed=3)
    np.testing.assert_array_equal(one.ci_low, two.ci_low)
    other, _ = simulate(12, 30, 3, 16, seed=5)
    with pytest.raises(ValueError, match="different prompt buckets"):
        bootstrap_statistic({"a": st, "b": other["scores"]}, lambda s: s["a"] - s["b"])
