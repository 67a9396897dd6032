"""What keeps long prompts within memory, against independent references: the derived
targets' ``X^T y`` (computed on access from row sums) against the per-cell values summed
directly, the Schur complement (prefix sums, built in blocks) against the dense design's
Gram, the in-place Cholesky projector against dense hat matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rope_leak.engine.accumulate import LayerAccumulator
from rope_leak.engine.pairs import PairDesign, PairSpec
from rope_leak.engine.run import run_statistics
from rope_leak.engine.statistics import RunStatistics, TargetStatistics
from rope_leak.fits.position_models import _schur_complement, absolute_projector
from rope_leak.fits.projection import BucketProjection
from rope_leak.fits.shares import fit_shares

SPECS = [PairSpec(), PairSpec(include_sink=True), PairSpec(min_query=3, max_query=11),
         PairSpec(max_offset=4)]
DERIVED = ("neg_log_z", "log_pattern")


def split_statistics(n_prompts=6, n_heads=2, n=13, spec=PairSpec(), seed=0):
    """Statistics of random (masked) scores and the
    per-prompt cell values of every target, computed directly from the scores."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(n_prompts, n_heads, n, n, generator=gen, dtype=torch.float64) * 2
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    scores = full.masked_fill(j > i, float("-inf"))
    log_z = torch.logsumexp(scores, -1)
    design = PairDesign(spec, n)
    acc = LayerAccumulator(design, 1, n_heads, 4, ("pattern",) + DERIVED)
    ids = torch.arange(n_prompts)
    acc.add_layer(0, scores, ids)
    acc.add_prompts(ids)
    values = {
        "scores": scores,
        "neg_log_z": (-log_z)[..., None].expand_as(scores),
        "log_pattern": scores - log_z[..., None],
    }
    return acc.to_statistics(), design, {k: v.numpy() for k, v in values.items()}


def reference_xty(design: PairDesign, values: np.ndarray, n_buckets: int = 4) -> np.ndarray:
    """``X^T y`` per bucket from the scored cells' values and the dense design matrix."""
    rows, keys = design.cells
    X = design.design_matrix()
    out = np.zeros((n_buckets, 1, values.shape[1], design.n_columns))
    for prompt, y in enumerate(values):
        out[prompt % n_buckets, 0] += y[:, rows, keys] @ X
    return out


@pytest.mark.parametrize("spec", SPECS[:3])
def test_derived_targets_hold_no_xty_and_match_the_cell_values(spec):
    stats, design, values = split_statistics(spec=spec)
    for target in DERIVED:
        st = stats[target]
        assert st.is_derived and st.__dict__["_xty"] is None
        np.testing.assert_allclose(st.xty, reference_xty(design, values[target]), rtol=1e-12, atol=1e-10)
    # the derived targets hold only the shared row sums: less than the stored scores
    assert stats["log_pattern"].nbytes < stats["scores"].nbytes


def test_derived_xty_equals_the_row_part_plus_the_scores_exactly():
    stats, design, _ = split_statistics()
    derived = stats["log_pattern"].derived
    eager = (design.row_xty(torch.from_numpy(derived.rows)) + torch.from_numpy(stats["scores"].xty)).numpy()
    assert np.array_equal(stats["log_pattern"].xty, eager)
    neg_log_z = stats["neg_log_z"].derived
    assert np.array_equal(stats["neg_log_z"].xty, design.row_xty(torch.from_numpy(neg_log_z.rows)).numpy())


def test_derived_statistics_fit_project_and_merge_like_stored_ones():
    stats, design, _ = split_statistics()
    for target in DERIVED:
        st = stats[target]
        stored = TargetStatistics(design, st.n_layers, st.n_heads, st.n_buckets, xty=st.xty.copy(),
                                  sumsq=st.sumsq, count=st.count)
        a, b = fit_shares(st), fit_shares(stored)
        assert np.array_equal(a.share, b.share) and np.array_equal(a.r2_abs_in, b.r2_abs_in)
        assert np.array_equal(BucketProjection.from_statistics(st).z,
                              BucketProjection.from_statistics(stored).z)
        merged = st.merge(stored)
        assert np.array_equal(merged.xty, 2 * stored.xty)


def test_saved_derived_statistics_load_identical(tiny_model, tiny_tokens, tmp_path):
    stats = run_statistics(tiny_model, tiny_tokens, batch_size=4, progress=False)
    loaded = RunStatistics.load(stats.save(tmp_path / "s.npz"))
    for name, cond in stats.conditions.items():
        for target, st in cond.targets.items():
            assert np.array_equal(loaded.conditions[name].targets[target].xty, st.xty), (name, target)
            assert not loaded.conditions[name].targets[target].is_derived


def test_bucket_projection_of_derived_statistics_is_computed_once():
    stats, _, _ = split_statistics()
    st = stats["log_pattern"]
    first = BucketProjection.from_statistics(st)
    assert BucketProjection.from_statistics(st) is first
    other = stats["neg_log_z"]  # the same row sums without the scores: its own projection
    assert BucketProjection.from_statistics(other) is not first
    st.derived = type(st.derived)(st.design, st.derived.rows.copy(), None, st.derived.base)
    recomputed = BucketProjection.from_statistics(st)  # new arrays: not the cached result
    assert recomputed is not first and np.array_equal(recomputed.z, first.z)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", [9, 24])
def test_schur_complement_matches_the_dense_gram(spec, n):
    design = PairDesign(spec, n)
    gram = design.gram
    n_off = len(design.offsets)
    expected = gram[n_off:, n_off:] - gram[n_off:, :n_off] @ np.diag(1 / design.offset_count) @ gram[:n_off, n_off:]
    for block in (1, 5, 128):
        np.testing.assert_allclose(_schur_complement(design, block=block), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS)
def test_in_place_cholesky_projector_matches_dense_hat_matrices(spec):
    design = PairDesign(spec, 15)
    absolute_projector.cache_clear()
    projector = absolute_projector(design)
    assert projector.method == "cholesky"
    X = design.design_matrix()
    hat = lambda A: A @ np.linalg.pinv(A)  # noqa: E731
    D = hat(X) - hat(X[:, design.relative_columns])
    y = np.random.default_rng(0).normal(size=(3, design.n_cells))
    z = projector.project(y @ X)
    np.testing.assert_allclose(z @ z.T, (D @ y.T).T @ (D @ y.T), rtol=1e-9, atol=1e-9)
    eigen = absolute_projector(design, "eigh").project(y @ X)
    np.testing.assert_allclose(z @ z.T, eigen @ eigen.T, rtol=1e-9, atol=1e-9)


