"""RoPE controls (rope_leak.interventions.rope) against closed forms, HF and restoration;
rope_controls (composition under identity / scrambled RoPE)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rope_leak.backends import tiny_rope_model
from rope_leak.interventions.rope import (
    identity_rope,
    permutation,
    rope_base,
    rope_scaling,
    rotary_modules,
    scrambled_rope,
)
from rope_leak.quantities import NOT_ESTIMABLE


@pytest.fixture(scope="module")
def model():
    return tiny_rope_model(n_layers=2, n_ctx=64, seed=3)


@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(1, 50, (3, 16), generator=gen)
    t[:, 0] = 0
    return t


def _capture(model, tokens, names):
    cache = {}
    hooks = [(n, lambda x, hook: cache.__setitem__(hook.name, x.detach().clone())) for n in names]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
    return logits, cache


def _snapshot(model):
    return [(a.rotary_sin, a.rotary_cos, a.rotary_sin.clone(), a.rotary_cos.clone())
            for a in rotary_modules(model)]


def _assert_restored(model, snap):
    for attn, (sin, cos, sin_c, cos_c) in zip(rotary_modules(model), snap):
        assert attn.rotary_sin is sin and attn.rotary_cos is cos
        assert torch.equal(attn.rotary_sin, sin_c) and torch.equal(attn.rotary_cos, cos_c)


def _rotate(attn, x, sin, cos, positions):
    """Reference rotation of x [batch, pos, head, d] at the given position ids."""
    flip = attn.rotate_every_two(x)
    return x * cos[positions][None, :, None] + flip * sin[positions][None, :, None]


def test_identity_rope_gives_unrotated_dot_products(model, tokens):
    names = [f"blocks.{l}.attn.{h}" for l in range(2)
             for h in ("hook_q", "hook_k", "hook_rot_q", "hook_rot_k", "hook_attn_scores")]
    with identity_rope(model):
        _, cache = _capture(model, tokens, names)
    for layer in range(2):
        q, k = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_k"]
        assert torch.equal(cache[f"blocks.{layer}.attn.hook_rot_q"], q)
        assert torch.equal(cache[f"blocks.{layer}.attn.hook_rot_k"], k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(model.cfg.d_head)
        causal = torch.ones(16, 16, dtype=torch.bool).tril()
        got = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        torch.testing.assert_close(got[..., causal], scores[..., causal], atol=1e-5, rtol=1e-5)


def test_scrambled_rope_rotates_position_p_as_perm_p(model, tokens):
    n = tokens.shape[1]
    names = [f"blocks.{l}.attn.{h}" for l in range(2) for h in ("hook_q", "hook_rot_q", "hook_rot_k", "hook_k")]
    with scrambled_rope(model, seed=7, n_positions=n):
        _, cache = _capture(model, tokens, names)
    perm = permutation(n, 7)
    assert sorted(perm.tolist()) == list(range(n)) and not torch.equal(perm, torch.arange(n))
    for layer in range(2):
        attn = model.blocks[layer].attn
        sin, cos = attn.calculate_sin_cos_rotary(attn.cfg.rotary_dim, n, base=attn._rotary_base())
        for raw, rot in (("hook_q", "hook_rot_q"), ("hook_k", "hook_rot_k")):
            x = cache[f"blocks.{layer}.attn.{raw}"]
            expected = _rotate(attn, x, sin, cos, perm)
            torch.testing.assert_close(cache[f"blocks.{layer}.attn.{rot}"], expected, atol=1e-6, rtol=1e-6)


def test_scrambled_fix_first_keeps_position_zero():
    perm = permutation(10, 3, fix_first=True)
    assert perm[0] == 0 and sorted(perm.tolist()) == list(range(10))


def test_rope_base_equals_model_built_with_that_base(model, tokens):
    other = tiny_rope_model(n_layers=2, n_ctx=64, seed=3, rotary_base=2500)
    with torch.no_grad():
        expected = other(tokens)
        with rope_base(model, 2500):
            got = model(tokens)
        plain = model(tokens)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert not torch.allclose(plain, expected)


def test_linear_scaling_is_position_interpolation(model):
    factor = 4.0
    with rope_scaling(model, kind="linear", factor=factor):
        attn = model.blocks[0].attn
        sin, cos = attn.rotary_sin.clone(), attn.rotary_cos.clone()
    d = attn.cfg.rotary_dim
    inv_freq = 1.0 / (attn.cfg.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    pos = torch.arange(sin.shape[0], dtype=torch.float64)
    angles = (pos[:, None] / factor) * inv_freq.repeat(2)[None, :]
    torch.testing.assert_close(sin.double(), angles.sin(), atol=2e-5, rtol=0)
    torch.testing.assert_close(cos.double(), angles.cos(), atol=2e-5, rtol=0)


def test_ntk_by_parts_matches_transformers_llama3(model):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = model.cfg.d_head
    config = LlamaConfig(
        hidden_size=model.cfg.d_model, num_attention_heads=model.cfg.n_heads, head_dim=d,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16},
    )
    inv_freq, scale = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert scale == 1.0
    with rope_scaling(model, kind="ntk_by_parts", factor=4.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_ctx_len=16):
        sin = model.blocks[1].attn.rotary_sin.clone()
    pos = torch.arange(sin.shape[0], dtype=torch.float64)
    angles = pos[:, None] * inv_freq.double().repeat(2)[None, :]
    torch.testing.assert_close(sin.double(), angles.sin().to(torch.float32).double(), atol=5e-5, rtol=0)
    # the scaling really changed the low frequencies
    assert not torch.allclose(sin, model.blocks[1].attn.rotary_sin[: sin.shape[0]])


@pytest.mark.parametrize("control", [
    lambda m: identity_rope(m),
    lambda m: scrambled_rope(m, 1),
    lambda m: rope_base(m, 500.0),
    lambda m: rope_scaling(m, "linear", 2.0),
    lambda m: rope_scaling(m, "ntk_by_parts", 8.0),
])
def test_restored_bit_exactly_after_error(model, tokens, control):
    snap = _snapshot(model)
    with torch.no_grad():
        before = model(tokens)
    with pytest.raises(KeyError):
        with control(model):
            model(tokens)
            raise KeyError("boom")
    _assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(model(tokens), before)


def test_no_table_extension_undoes_control_and_long_tables_restored():
    # n_ctx above TransformerLens' initial cache (2048 rows): the model's tables start
    # short and TransformerLens would replace them for a long sequence.
    m = tiny_rope_model(n_layers=1, n_ctx=2100, d_vocab=20, seed=0)
    attn = m.blocks[0].attn
    rows_before = attn.rotary_sin.shape[0]
    assert rows_before == 2048
    snap = _snapshot(m)
    long = torch.randint(0, 20, (1, 2060))
    with identity_rope(m):
        with torch.no_grad():
            m(long, return_type=None)
        assert attn.rotary_sin.shape[0] == 2100
        assert torch.count_nonzero(attn.rotary_sin) == 0
    _assert_restored(m, snap)


def test_validation(model):
    with pytest.raises(ValueError):
        with rope_scaling(model, kind="yarn"):
            pass
    with pytest.raises(ValueError):
        with rope_base(model, 0.5):
            pass
    with pytest.raises(ValueError):
        with scrambled_rope(model, 0, n_positions=10_000):
            pass


def test_gemma_style_local_layers(tiny_gemma_hooked):
    """Two bases: rope_base(local_base=None) and scaling(apply_to='global') leave the
    local layers' tables untouched; the global ones change."""
    m = tiny_gemma_hooked
    kinds = [blk.attn.attn_type for blk in m.blocks]
    assert "local" in kinds and "global" in kinds
    originals = [blk.attn.rotary_sin.clone() for blk in m.blocks]
    for control in (lambda: rope_base(m, 777.0), lambda: rope_scaling(m, "ntk_by_parts", 4.0),
                    lambda: rope_scaling(m, "linear", 4.0)):
        with control():
            for blk, orig in zip(m.blocks, originals):
                n = orig.shape[0]
                same = torch.equal(blk.attn.rotary_sin[:n], orig)
                assert same == (blk.attn.attn_type == "local"), blk.attn.attn_type
    with rope_scaling(m, "linear", 4.0, apply_to="all"):
        for blk, orig in zip(m.blocks, originals):
            assert not torch.equal(blk.attn.rotary_sin[: orig.shape[0]], orig)


# ------------------------------------------------------------------ rope_controls


def test_rope_controls_table(tiny_model, tiny_tokens):
    from rope_leak.analyses.architectures import CONTROL_NAMES, rope_controls

    table = rope_controls(tiny_model, tiny_tokens, n_buckets=4, progress=False)
    assert list(table["control"]) == list(CONTROL_NAMES)
    for col in ("L_total_debiased", "L_resid_debiased", "L_mask_debiased", "composition_debiased",
                "composition_crossfit", "composition_debiased_minus_real", "additivity_violated",
                "agrees_with_real"):
        assert col in table
    real = table.set_index("control").loc["real"]
    assert real["composition_debiased_minus_real"] == 0
    assert np.isfinite(table["L_total_debiased"]).all()
    # identity RoPE: every logit is position-free, so under the bidirectional mask only
    # the residual stream can carry position.
    assert np.isfinite(table.set_index("control").loc["identity", "L_resid_debiased"])
    # the real row is what analyze reports for the same prompts
    from rope_leak.analyses.analysis import analyze

    summary = analyze(tiny_model, tiny_tokens, n_buckets=4, progress=False, n_boot=1).summary()
    assert real["composition_debiased"] == pytest.approx(summary["composition_debiased"], rel=1e-9)
    assert real["L_resid_debiased"] == pytest.approx(summary["L_resid_debiased"], rel=1e-9)


def test_controls_report_section(tiny_model, tiny_tokens):
    from rope_leak.analyses.architectures import rope_controls
    from rope_leak.output.plots_architectures import controls_section

    table = rope_controls(tiny_model, tiny_tokens, n_buckets=4, n_boot=20, progress=False)
    assert (table["composition_ci_low"] <= table["composition_ci_high"]).all()
    html = controls_section(table, include_plotlyjs=False)
    assert html.startswith("<section>") and "additivity" in html.lower() and "scrambled" in html
    assert "plotly-graph-div" in html
    # a control whose composition is not estimable: said, and the figure is still drawn
    unknown = table.copy()
    unknown.loc[unknown["control"] == "scrambled", "composition_debiased"] = np.nan
    unknown["agrees_with_real"] = [None if c == "scrambled" else a
                                   for c, a in zip(unknown["control"], unknown["agrees_with_real"])]
    html = controls_section(unknown, include_plotlyjs=False)
    assert "scrambled is not estimable" in html and "plotly-graph-div" in html
    from rope_leak.output.plots_architectures import controls_figure

    bars = controls_figure(unknown).data
    assert bars[-1].name == "ablation composition (the paper's method)"
    assert list(bars[-1].text) == ["", "", NOT_ESTIMABLE]
    # with the completed split (prompts long enough for its window), its bars come first
    unknown["completed_mask_share"] = [0.4, 0.7, 0.1]
    bars = controls_figure(unknown).data
    assert [b.name for b in bars] == ["completed split (mask share of log A)",
                                      "ablation composition (the paper's method)"]
    assert list(bars[0].y) == [0.4, 0.7, 0.1]


def test_rope_controls_carry_each_causal_conditions_completed_split(tiny_model):
    """The real row's completed split is analyze's; the identity RoPE's differs."""
    from rope_leak.analyses.analysis import analyze
    from rope_leak.analyses.architectures import rope_controls

    tokens = torch.randint(1, 50, (16, 64), generator=torch.Generator().manual_seed(4))
    tokens[:, 0] = 0
    table = rope_controls(tiny_model, tokens, n_buckets=8, progress=False).set_index("control")
    split = analyze(tiny_model, tokens, n_buckets=8, progress=False, n_boot=1).summary()["completed_split"]
    assert table.loc["real", "completed_mask_share"] == pytest.approx(split["mask_share"], rel=1e-9)
    assert table.loc["real", "completed_cross"] == pytest.approx(split["cross"], rel=1e-9)
    assert table.loc["identity", "completed_mask_share"] != table.loc["real", "completed_mask_share"]
