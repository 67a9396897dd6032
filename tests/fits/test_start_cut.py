"""The completed split (start cut) on heads whose answer is known by construction.

Scores are injected by a hook on a tiny float64 model, one constructed head per
attention head, and go through the whole engine (streaming statistics, cross-fitted
profile, bucket U-statistics). Checked against closed-form expectations and against an
independent per-cell implementation (``tests/reference_start_cut.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rope_leak.backends import tiny_rope_model
from rope_leak.engine.run import run_statistics
from rope_leak.engine.start_cut import check_window
from rope_leak.fits.start_cut import completed_split, imputed_past
from rope_leak.interventions.mask import causal
from tests.reference_start_cut import completed_split_reference, constructed_scores

RELATIVE = ("power_law", "rope_cosines", "linear_key")
ABSOLUTE = ("key_effect", "temperature", "varying_sink")


def engine_split(kinds, n, prompts=8, noise=0.0, shifts=0.0, window=32, seed=0, horizon=None,
                 scores=None, dtype=torch.float64):
    """The completed split of constructed heads ``kinds`` (one per head) at length ``n``
    (a float32 model takes the fused kernel's path on CPU)."""
    base = torch.stack([torch.from_numpy(constructed_scores(k, n)) for k in kinds]) if scores is None \
        else torch.as_tensor(scores)
    gen = torch.Generator().manual_seed(seed)
    per_prompt = base.expand(prompts, *base.shape).clone()
    if noise:
        per_prompt += noise * torch.randn(per_prompt.shape, generator=gen, dtype=torch.float64)
    if shifts:
        per_prompt += shifts * torch.randn(prompts, len(base), n, 1, generator=gen, dtype=torch.float64)
    above = torch.ones(n, n, dtype=torch.bool).triu(1)
    per_prompt = per_prompt.masked_fill(above, float("-inf"))
    model = tiny_rope_model(n_layers=1, n_heads=len(base), d_model=8 * len(base), d_head=8, n_ctx=n,
                            dtype=dtype)
    calls = []

    def inject(s, hook):
        calls.append(len(s))
        start = sum(calls[:-1]) % prompts
        return per_prompt[start:start + len(s)].to(s.dtype)

    model.blocks[0].attn.hook_attn_scores.add_hook(inject)
    tokens = torch.randint(1, 50, (prompts, n), generator=gen)
    tokens[:, 0] = 0
    stats = run_statistics(model, tokens, conditions={"causal": causal}, targets=("log_pattern",),
                           batch_size=min(prompts, 4), progress=False, start_cut_window=window)
    return completed_split(stats.conditions["causal"], horizon=horizon)


def per_head(split, name):
    return split.head_table()[name][0]


@pytest.mark.parametrize("n", [64, 256, 1024])
def test_relative_heads_are_all_mask(n):
    split = engine_split(RELATIVE, n, prompts=4)
    share, cross = per_head(split, "mask_share"), per_head(split, "cross")
    assert np.all(share >= 0.99), share
    assert np.all(np.abs(cross) <= 0.01), cross
    assert split.model_table()["mask_share"] >= 0.99


@pytest.mark.slow
def test_relative_heads_are_all_mask_at_4096():
    split = engine_split(RELATIVE, 4096, prompts=4)
    assert np.all(per_head(split, "mask_share") >= 0.99)
    assert np.all(np.abs(per_head(split, "cross")) <= 0.01)


@pytest.mark.parametrize("n", [64, 256, 1024])
def test_key_effects_temperatures_and_varying_sinks_are_scores(n):
    split = engine_split(ABSOLUTE, n, prompts=4)
    share = per_head(split, "mask_share")
    assert np.all(share <= 0.05), share
    assert np.all(per_head(split, "scores_part") >= 0.9)


@pytest.mark.parametrize("n", [64, 256])
def test_engine_equals_an_independent_per_cell_implementation(n):
    kinds = RELATIVE + ABSOLUTE + ("constant_sink", "broad")
    split = engine_split(kinds, n, prompts=4)
    for h, kind in enumerate(kinds):
        ref = completed_split_reference(constructed_scores(kind, n), w=32, min_query=32, max_query=n - 1)
        for name in ("mask_share", "mask_part", "scores_part", "cross"):
            assert per_head(split, name)[h] == pytest.approx(ref[name], abs=1e-6), (kind, name)
        assert split.imputed_past_mass[0, h] == pytest.approx(ref["imputed_past_mass_at_w"], rel=1e-9)


@pytest.mark.parametrize("n", [64, 256])
def test_the_kernel_path_equals_an_independent_per_cell_implementation(n):
    """Float32 scores on CPU: the fused kernel makes the start cut's rows in its pass."""
    from rope_leak.engine.kernel import load_kernel

    if load_kernel() is None:
        pytest.skip("no C compiler: the kernel path is not available")
    kinds = RELATIVE + ABSOLUTE + ("constant_sink", "broad")
    split = engine_split(kinds, n, prompts=4, dtype=torch.float32)
    for h, kind in enumerate(kinds):
        ref = completed_split_reference(constructed_scores(kind, n).astype(np.float32).astype(float), w=32,
                                        min_query=32, max_query=n - 1)
        for name in ("mask_share", "mask_part", "scores_part", "cross"):
            assert per_head(split, name)[h] == pytest.approx(ref[name], abs=2e-3), (kind, name)


@pytest.mark.parametrize("n", [64, 256, 1024])
def test_constant_sink_is_mask(n):
    assert per_head(engine_split(("constant_sink",), n, prompts=4), "mask_share")[0] >= 0.9


def test_per_query_shifts_change_nothing():
    kinds = ("power_law", "key_effect", "varying_sink")
    plain = engine_split(kinds, 96, prompts=8, noise=0.3, seed=3)
    shifted = engine_split(kinds, 96, prompts=8, noise=0.3, seed=3, shifts=20.0)
    for name in ("total", "mask", "scores", "cross", "mask_inner", "imputed_past_mass", "missing_mass"):
        np.testing.assert_allclose(getattr(shifted, name), getattr(plain, name), rtol=1e-9, atol=1e-12)
    for name, value in plain.summary().items():
        if isinstance(value, float):
            assert shifted.summary()[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("window", [8, 32])
def test_score_noise_leaves_a_relative_head_within_005_of_all_mask(window):
    """Score noise sd 0.5 at P = 32, n = 256. Measured bias of the mask share: +0.01 to
    +0.02 at w = 8, below 0.01 at w = 32. The power law's absolute-position part on
    queries i >= 32 is small beside that noise (its share, 0.79, is no number to read):
    at w = 32 it must come out not estimable."""
    kinds = ("rope_cosines", "linear_key", "broad", "power_law")
    split = engine_split(kinds, 256, prompts=32, noise=0.5, window=window, seed=1)
    share = per_head(split, "mask_share")
    np.testing.assert_allclose(share[:3], 1.0, atol=0.05)
    if window == 32:
        assert split.not_estimable[0, 3] and np.isnan(share[3])


def test_broad_heads_are_finite_and_follow_the_horizon_convention():
    """p <= 1: the mass does not converge. With the default horizon (every offset the
    prompt shows) the relative head is all mask; a shorter horizon imputes less past, and
    the count effect of the keys beyond it stays in the scores' part."""
    full, short = (engine_split(("broad",), 256, prompts=4, horizon=h) for h in (None, 64))
    for split in (full, short):
        assert all(np.isfinite(v).all() for v in split.head_table().values())
    assert per_head(full, "mask_share")[0] >= 0.99
    assert per_head(short, "mask_share")[0] < per_head(full, "mask_share")[0]
    assert full.imputed_past_mass[0, 0] > short.imputed_past_mass[0, 0] > 0


def test_broad_head_with_a_key_effect_on_the_first_keys_matches_the_reference():
    """The key effect is the scores' (and its profile tail is what is imputed)."""
    n = 128
    s = constructed_scores("broad", n)
    s[:, 1:9] += 1.5  # the first keys are favoured: an absolute key effect
    split = engine_split(None, n, prompts=4, scores=s[None])
    ref = completed_split_reference(s, w=32, min_query=32, max_query=n - 1)
    for name in ("mask_share", "mask_part", "scores_part", "cross"):
        assert np.isfinite(per_head(split, name)[0])
        assert per_head(split, name)[0] == pytest.approx(ref[name], abs=1e-6)
    assert ref["mask_share"] < 0.9  # the planted key effect is visible in the scores' part


def test_imputed_past_of_a_flat_profile_is_the_missing_offsets_over_the_window():
    n, w = 20, 4
    profile = np.where(np.arange(n) <= n - 2, 1.0 / w, 0.0)
    past = imputed_past(profile, w)
    # query i >= w: offsets i+1..n-2 over a window of w offsets
    assert past[10] == pytest.approx((n - 2 - 10) / w)
    # query i < w: the same offsets over its i window offsets
    assert past[2] == pytest.approx((n - 2 - 2) / 2)
    assert past[0] == 0.0


def test_bad_windows_are_refused_with_a_fix():
    with pytest.raises(ValueError, match="window"):
        check_window(0, 64)
    with pytest.raises(ValueError, match="Fix"):
        check_window(32, 33)


def test_kernel_and_torch_paths_give_the_same_start_cut_statistics():
    """On CPU float32 the start cut reuses the fused kernel's log-denominators; the torch
    path computes its own: both give the same statistics (to float32 rounding)."""
    from rope_leak.engine.kernel import load_kernel
    from rope_leak.engine.pairs import PairDesign, PairSpec
    from rope_leak.engine.run import ConditionRun

    if load_kernel() is None:
        pytest.skip("no C compiler: the kernel path is not available")
    model = tiny_rope_model(n_layers=2, n_heads=4, d_model=32, d_head=8, n_ctx=48)
    tokens = torch.randint(1, 50, (6, 48), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = 0
    out = []
    for use_kernel in (True, False):
        run = ConditionRun(model, PairDesign(PairSpec(), 48), ("log_pattern",), 4, start_cut_window=8)
        run.acc.use_kernel = use_kernel
        with causal(model):
            run.run_batch(tokens, torch.arange(6))
        out.append(run.statistics("causal").start_cut)
    kernel, plain = out
    np.testing.assert_allclose(kernel.log_rho[:, :, :, 1:], plain.log_rho[:, :, :, 1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernel.profile_sum, plain.profile_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kernel.log_pattern.xty, plain.log_pattern.xty, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spec", [dict(), dict(min_query=12), dict(max_query=30), dict(include_sink=True),
                                  dict(min_query=3, max_query=40)], ids=str)
def test_kernel_start_cut_rows_equal_the_torch_rows(spec):
    """The kernel's rows against :func:`start_cut_rows`, on random scores with a sink far
    above the window in some rows (the window's mass then underflows against the row's
    maximum and is worked out on its own)."""
    from rope_leak.engine.accumulate import LayerAccumulator
    from rope_leak.engine.kernel import load_kernel
    from rope_leak.engine.pairs import PairDesign, PairSpec, start_cut_spec
    from rope_leak.engine.start_cut import start_cut_rows

    if load_kernel() is None:
        pytest.skip("no C compiler: the kernel path is not available")
    B, H, n, w = 3, 4, 48, 8
    gen = torch.Generator().manual_seed(5)
    scores = 3 * torch.randn(B, H, n, n, generator=gen)
    scores[:, 1, :, 0] += 100.0  # a sink: exp(s - max) underflows on every other key
    scores[:, 2, 20:30, 0] += 60.0
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    design = PairDesign(PairSpec(**spec), n)
    sc_design = PairDesign(start_cut_spec(design.spec, w, n), n)
    acc = LayerAccumulator(design, 1, H, 4, ("log_pattern",), start_cut=(w, sc_design))
    acc.add_layer(0, scores, torch.arange(B))
    kernel = acc.last_start_cut_rows
    assert kernel is not None
    plain = start_cut_rows(scores, w, sc_design)
    np.testing.assert_allclose(kernel[0][..., 1:].numpy(), plain[0][..., 1:].numpy(), rtol=1e-5, atol=1e-4)
    assert torch.isneginf(kernel[0][..., 0]).all()
    for got, want in zip(kernel[1:], plain[1:]):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=2e-3)
    # a run of the pattern alone makes the same rows (the kernel sums the scores for them,
    # in its one pass for both targets: float64 sums in another order)
    pattern_only = LayerAccumulator(design, 1, H, 4, ("pattern",), start_cut=(w, sc_design))
    pattern_only.add_layer(0, scores, torch.arange(B))
    for got, want in zip(pattern_only.last_start_cut_rows, kernel):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-12)
    # and the full pairs' statistics are those of a run without the start cut
    alone = LayerAccumulator(design, 1, H, 4, ("log_pattern",))
    alone.add_layer(0, scores, torch.arange(B))
    for name, value in alone.state().items():
        np.testing.assert_allclose(acc.state()[name].numpy(), value.numpy(), rtol=1e-12, atol=1e-9,
                                   err_msg=name)


def test_the_start_cut_scores_queries_from_w_to_the_second_last():
    """The profile reaches offset n - 2; only the last query sees a key at n - 1."""
    from rope_leak.engine.pairs import PairDesign, PairSpec, start_cut_spec

    rows = PairDesign(start_cut_spec(PairSpec(), 8, 40), 40).row_count
    assert np.flatnonzero(rows).tolist() == list(range(8, 39))
    early = start_cut_spec(PairSpec(max_query=20), 8, 40)
    assert (early.min_query, early.max_query) == (8, 20)
