"""Ground truth by construction: hand-set tiny models whose answer is known, on which
both decompositions (the bidirectional ablation and the ablation-free split) are tested.

Every token embeds to the same vector, so without a planted signal the residual stream
carries nothing position-dependent and the logits are purely relative. The RoPE tables
are set to frequencies that are whole multiples of ``2 pi / n``: the logits are then
periodic in ``i - j`` and, under a bidirectional mask, every query sees the same
multiset of logits, so ``Z_i`` is constant and the pattern is purely relative too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rope_leak.analyses.analysis import analyze
from rope_leak.backends import tiny_rope_model
from rope_leak.engine.pairs import PairDesign, PairSpec
from tests.reference_start_cut import completed_split_reference

N = 16
D_MODEL, D_HEAD = 8, 4


def rotate(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Llama ("rotate half") RoPE of ``x`` ([d_head]) at each row of ``angles`` ([pos, d_head])."""
    half = x.shape[-1] // 2
    rotated_half = np.concatenate([-x[half:], x[:half]])
    return x * np.cos(angles) + rotated_half * np.sin(angles)


def periodic_angles(n: int) -> np.ndarray:
    omega = 2 * np.pi * np.array([1.0, 2.0]) / n
    omega = np.concatenate([omega, omega])  # TransformerLens "(2 d)" layout
    return np.arange(n)[:, None] * omega[None, :]


def hand_set_model(planted: float, seed: int = 0):
    """One layer, one head. ``planted`` scales a position signal ``sin(i / 2) * u`` added
    to the residual stream before the head reads it."""
    model = tiny_rope_model(n_layers=1, d_model=D_MODEL, n_heads=1, d_head=D_HEAD, n_ctx=N,
                            d_vocab=10, normalization_type=None, final_rms=False)
    rng = np.random.default_rng(seed)
    e, u = rng.normal(size=D_MODEL), rng.normal(size=D_MODEL)
    w_q, w_k = rng.normal(size=(D_MODEL, D_HEAD)), rng.normal(size=(D_MODEL, D_HEAD))
    attn = model.blocks[0].attn
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.W_E[:] = torch.tensor(e, dtype=torch.float32)
        attn.W_Q[0] = torch.tensor(w_q, dtype=torch.float32)
        attn.W_K[0] = torch.tensor(w_k, dtype=torch.float32)
        angles = torch.tensor(periodic_angles(N), dtype=torch.float32)
        attn.rotary_sin, attn.rotary_cos = angles.sin(), angles.cos()
    signal = np.sin(np.arange(N) / 2.0)[:, None] * u[None, :]

    def plant(resid, hook):
        return resid + planted * torch.tensor(signal[: resid.shape[1]], dtype=resid.dtype)

    model.add_hook("blocks.0.hook_resid_pre", plant, is_permanent=True)
    resid = e[None, :] + planted * signal  # [pos, d_model], identical for every prompt
    q = np.stack([rotate(resid[i] @ w_q, periodic_angles(N)[i]) for i in range(N)])
    k = np.stack([rotate(resid[j] @ w_k, periodic_angles(N)[j]) for j in range(N)])
    scores = q @ k.T / np.sqrt(D_HEAD)  # independent of TransformerLens
    return model, scores


def absolute_ss(values: np.ndarray, per: np.ndarray | None = None) -> float:
    """``||(H_abs - H_rel) y||^2`` over the causal pairs, by numpy least squares, as a
    fraction of the total sum of squares of ``per`` (default ``values``) over those pairs."""
    design = PairDesign(PairSpec(), N)
    X = design.design_matrix()
    y = values[design.cells]
    fit = lambda Xm: Xm @ np.linalg.lstsq(Xm, y, rcond=None)[0]  # noqa: E731
    reference = (values if per is None else per)[design.cells]
    total = ((reference - reference.mean()) ** 2).sum()
    return float(((fit(X) - fit(X[:, design.relative_columns])) ** 2).sum() / total)


def causal_log_pattern(scores: np.ndarray) -> np.ndarray:
    masked = np.where(np.tril(np.ones_like(scores, dtype=bool)), scores, -np.inf)
    return masked - np.logaddexp.reduce(masked, axis=1, keepdims=True)


WINDOW = 4  # the completed split's window at these short prompts


@pytest.fixture(scope="module")
def tokens():
    out = torch.randint(1, 10, (8, N), generator=torch.Generator().manual_seed(0))
    out[:, 0] = 0
    return out


def test_purely_relative_logits_all_absolute_position_from_the_mask(tokens):
    model, scores = hand_set_model(planted=0.0)
    assert absolute_ss(scores) < 1e-20  # by construction
    analysis = analyze(model, tokens, progress=False, window=WINDOW)
    dec = analysis.decomposition("pattern")
    # Ablation: the bidirectional pattern is purely relative; the causal one is not.
    assert abs(dec.resid[0, 0]) < 1e-5
    assert dec.total[0, 0] > 0.01
    assert analysis.decomposition("scores").total[0, 0] == pytest.approx(0, abs=1e-5)
    # Completed split: the scores are periodic in the offset (relative), so the start cut
    # carries log A's absolute position; equal to the per-cell reference.
    split = analysis.completed_split()
    ref = completed_split_reference(scores, w=WINDOW, min_query=WINDOW, max_query=len(scores) - 1)
    for name in ("mask_share", "mask_part", "scores_part", "cross"):
        assert split.head_table()[name][0, 0] == pytest.approx(ref[name], abs=1e-5), name
    assert split.head_table()["mask_share"][0, 0] > 0.9


def test_planted_residual_stream_signal_is_recovered(tokens):
    model, scores = hand_set_model(planted=0.8)
    log_a = causal_log_pattern(scores)
    truth_scores = absolute_ss(scores, per=log_a)
    assert truth_scores > 0.05  # the planted signal is large by construction
    analysis = analyze(model, tokens, progress=False, window=WINDOW)
    # Every prompt is identical here, so the debiased SS is the exact SS: equal to the
    # per-cell reference, and the planted signal is in the scores' part.
    split = analysis.completed_split().head_table()
    ref = completed_split_reference(scores, w=WINDOW, min_query=WINDOW, max_query=len(scores) - 1)
    for name in ("mask_share", "mask_part", "scores_part", "cross"):
        assert split[name][0, 0] == pytest.approx(ref[name], abs=1e-5), name
    assert split["scores_part"][0, 0] > 0.05
    # The planted signal survives the mask swap: the ablation sees it as residual stream.
    dec = analysis.decomposition("pattern")
    assert dec.resid[0, 0] > 0.05
    assert analysis.decomposition("scores").resid[0, 0] > 0.05


def test_a_composition_over_a_zero_l_total_is_not_estimable(tokens):
    """A composition is a ratio over the pooled L_total: where that is 0 it is not
    estimable, in every table, not a number with an interval. Purely relative scores have
    L_total = 0 by construction (6e-15 here, rounding); a random tiny model's scores have
    an L_total whose interval reaches 0. The pattern's composition (L_total > 0) stays a
    number."""
    from rope_leak.analyses.architectures import ablation_columns
    from rope_leak.backends import tiny_rope_model
    from rope_leak.fits.decomposition import composition_estimable

    model, _ = hand_set_model(planted=0.0)
    relative = analyze(model, tokens, progress=False, window=WINDOW, n_boot=200).inference("scores")
    assert relative.means.estimate[0] < 1e-12 and not relative.composition_estimable
    model = tiny_rope_model(n_layers=2, n_heads=4, d_model=32, d_head=8, n_ctx=64)
    prompts = torch.randint(1, 50, (8, 32), generator=torch.Generator().manual_seed(1))
    prompts[:, 0] = 0
    analysis = analyze(model, prompts, progress=False, window=8, n_boot=200)
    scores = analysis.inference("scores")
    assert scores.means.low[0] < 0  # the baseline's interval reaches 0
    assert not scores.composition_estimable and np.isfinite(scores.composition_point)
    assert np.isnan(scores.composition.estimate) and np.isnan(scores.composition.low)
    assert not scores.layer_composition_estimable.any() and np.isnan(scores.layer_composition.estimate).all()
    pattern = analysis.inference("pattern")
    assert pattern.composition_estimable and np.isfinite(pattern.composition.estimate)
    causal, bidirectional = (analysis.statistics.conditions[c] for c in ("causal", "bidirectional"))
    row = ablation_columns(causal, bidirectional, "scores", n_boot=200)
    assert not row["composition_estimable"]
    assert np.isnan(row["composition_debiased"]) and np.isnan(row["composition_crossfit"])
    # the rule: the denominator and its interval's low end above 0 (no interval: the point)
    np.testing.assert_array_equal(composition_estimable([0.1, 0.1, -0.1, 0.1], [0.01, -0.01, 0.01, np.nan]),
                                  [True, False, False, True])
