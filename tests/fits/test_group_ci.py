"""Pooled shares of the completed split over groups of heads, with their jackknife
intervals, and the interval of the difference between two groups.

Checked on constructed heads (scores injected into a tiny float64 model, two layers,
noisy prompts): a group of one layer is that layer's ``layer_ci``, the whole model is the
model's ``ci``, one head is its ``head_ci``, and every interval equals a delete-one-bucket
jackknife written out here from the per-bucket projections with explicit loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import norm

from rope_leak.backends import tiny_rope_model
from rope_leak.engine.run import run_statistics
from rope_leak.fits.projection import BucketProjection
from rope_leak.fits.start_cut import completed_split, mask_part_rows, row_projection
from rope_leak.interventions.mask import causal
from tests.reference_start_cut import constructed_scores

N, PROMPTS, WINDOW = 64, 12, 8
KINDS = (("power_law", "key_effect", "rope_cosines"), ("temperature", "linear_key", "varying_sink"))
NAMES = ("mask_share", "mask_part", "scores_part", "cross")


@pytest.fixture(scope="module")
def built():
    """The causal statistics and the completed split of 2 x 3 constructed, noisy heads."""
    gen = torch.Generator().manual_seed(7)
    above = torch.ones(N, N, dtype=torch.bool).triu(1)
    per_layer = []
    for kinds in KINDS:
        base = torch.stack([torch.from_numpy(constructed_scores(k, N)) for k in kinds])
        scores = base.expand(PROMPTS, *base.shape).clone()
        scores += 0.4 * torch.randn(scores.shape, generator=gen, dtype=torch.float64)
        per_layer.append(scores.masked_fill(above, float("-inf")))
    model = tiny_rope_model(n_layers=2, n_heads=3, d_model=24, d_head=8, n_ctx=N, dtype=torch.float64)
    for layer, scores in enumerate(per_layer):
        calls = []

        def inject(s, hook, scores=scores, calls=calls):
            calls.append(len(s))
            start = sum(calls[:-1]) % PROMPTS
            return scores[start:start + len(s)].to(s.dtype)

        model.blocks[layer].attn.hook_attn_scores.add_hook(inject)
    tokens = torch.randint(1, 50, (PROMPTS, N), generator=gen)
    tokens[:, 0] = 0
    stats = run_statistics(model, tokens, conditions={"causal": causal}, targets=("log_pattern",),
                           batch_size=4, progress=False, start_cut_window=WINDOW)
    causal_stats = stats.conditions["causal"]
    return causal_stats, completed_split(causal_stats)


def reference_replicates(causal_stats) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Point sums and delete-one-bucket sums ``[bucket, layer, head]`` of ``SS(D log A)``,
    ``SS(D m)`` and ``<D m, D log A>``, from the bucket sums' absolute-position
    coordinates: ``sum_{g != g'} <z_g, z'_g'> / sum_{g != g'} c_g c_g'`` over the buckets
    kept, one pair at a time."""
    cut = causal_stats.start_cut
    log_a = BucketProjection.from_statistics(cut.log_pattern)
    m = row_projection(cut.log_pattern.design, mask_part_rows(cut), cut.buckets, cut.log_pattern.n_buckets)
    buckets = [g for g in range(log_a.n_buckets) if log_a.count[g] > 0]

    def u_statistic(a, b, kept):
        num = np.zeros(a.z.shape[1:3])
        den = 0.0
        for g, h in itertools.permutations(kept, 2):
            num += (a.z[g] * b.z[h]).sum(-1)
            den += a.count[g] * a.count[h]
        return num / den

    def sums(kept):
        return {"total": u_statistic(log_a, log_a, kept), "mask": u_statistic(m, m, kept),
                "mask_inner": u_statistic(m, log_a, kept)}

    point = sums(buckets)
    left_out = [sums([g for g in buckets if g != k]) for k in buckets]
    return point, {name: np.stack([r[name] for r in left_out]) for name in point}


def pooled_mask_share(sums, keep):
    return (sums["mask_inner"] * keep).sum((-2, -1)) / (sums["total"] * keep).sum((-2, -1))


def jackknife_interval(estimate, replicates, level=0.95):
    g = len(replicates)
    se = np.sqrt((g - 1) / g * ((replicates - replicates.mean()) ** 2).sum())
    z = norm.ppf((1 + level) / 2)
    return se, (estimate - z * se, estimate + z * se)


def test_the_constructed_heads_are_kept_and_the_reference_reproduces_the_sums(built):
    causal_stats, split = built
    assert split.keep.sum() >= 4
    point, replicates = reference_replicates(causal_stats)
    for name in point:
        np.testing.assert_allclose(getattr(split, name), point[name], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(split.replicates[name], replicates[name], rtol=1e-9, atol=1e-12)


def test_a_group_of_one_layer_is_its_layer_ci(built):
    _, split = built
    for layer in (0, 1):
        for group in ([layer], layer, np.arange(2) == layer):
            for name in NAMES:
                out = split.group_ci(group, name)
                assert out["estimate"] == pytest.approx(split.layer_table()[name][layer], rel=1e-12)
                np.testing.assert_allclose(out["ci"], split.layer_ci[name][layer], rtol=1e-12)


def test_every_head_is_the_model_ci(built):
    _, split = built
    for group in (np.ones((2, 3), dtype=bool), [0, 1], split.group()):
        for name in NAMES:
            out = split.group_ci(group, name)
            assert out["estimate"] == pytest.approx(split.model_table()[name], rel=1e-12)
            np.testing.assert_allclose(out["ci"], split.ci[name], rtol=1e-12)
            assert out["heads"] == split.keep.sum()


def test_one_head_is_its_head_ci(built):
    _, split = built
    for layer, head in zip(*np.nonzero(split.keep)):
        for name in ("mask_share", "cross"):
            out = split.group_ci([(layer, head)], name)
            assert out["estimate"] == pytest.approx(split.head_table()[name][layer, head], rel=1e-12)
            np.testing.assert_allclose(out["ci"], split.head_ci[name][layer, head], rtol=1e-10)


def test_groups_and_their_difference_equal_a_jackknife_written_out(built):
    causal_stats, split = built
    point, replicates = reference_replicates(causal_stats)
    first = split.group(heads=[(0, 0), (0, 1), (1, 2)])
    second = split.group(heads=[(0, 2), (1, 0), (1, 1)])
    results = {}
    for label, group in (("first", first), ("second", second)):
        keep = split.keep & group
        estimate = pooled_mask_share(point, keep)
        values = pooled_mask_share(replicates, keep[None])
        se, interval = jackknife_interval(estimate, values)
        out = split.group_ci(group)
        assert out["estimate"] == pytest.approx(estimate, rel=1e-9)
        assert out["se"] == pytest.approx(se, rel=1e-8)
        np.testing.assert_allclose(out["ci"], interval, rtol=1e-8)
        results[label] = (estimate, values)
    estimate = results["first"][0] - results["second"][0]
    values = results["first"][1] - results["second"][1]
    se, interval = jackknife_interval(estimate, values)
    diff = split.group_difference(first, second)
    assert diff["estimate"] == pytest.approx(estimate, rel=1e-9)
    assert diff["se"] == pytest.approx(se, rel=1e-8)
    np.testing.assert_allclose(diff["ci"], interval, rtol=1e-8)
    # the interval of the difference is not the one of independent groups
    independent = np.hypot(diff["first"]["se"], diff["second"]["se"])
    assert abs(diff["se"] - independent) > 1e-6 * independent


def test_a_group_against_itself_differs_by_exactly_zero(built):
    _, split = built
    diff = split.group_difference([1], np.arange(2) == 1)
    assert diff["estimate"] == 0.0 and diff["se"] == 0.0 and diff["ci"] == (0.0, 0.0)


def test_head_pairs_layers_and_arrays_name_the_same_groups(built):
    _, split = built
    by_pairs = split.group(heads=[(1, 0), (1, 1), (1, 2)])
    np.testing.assert_array_equal(by_pairs, split.group(layers=[1]))
    np.testing.assert_array_equal(split.group(layers=[0], heads=[(1, 2)]),
                                  np.array([[True] * 3, [False, False, True]]))
    with pytest.raises(ValueError, match="boolean layer group"):
        split.group(layers=np.ones(3, dtype=bool))


def test_groups_need_the_jackknife(built):
    causal_stats, _ = built
    split = completed_split(causal_stats, jackknife=False)
    assert split.group_table([0])["mask_share"] == pytest.approx(split.layer_table()["mask_share"][0])
    with pytest.raises(ValueError, match="jackknife"):
        split.group_ci([0])
