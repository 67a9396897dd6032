"""The two counterfactuals of the completed split (start cut removed, key positions
removed) and their effects on the loss, against answers known in advance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rope_leak.analyses.analysis import analyze
from rope_leak.analyses.effects import fitted_removals, loss_effects
from rope_leak.backends import tiny_rope_model
from rope_leak.interventions.hooks import act_name
from rope_leak.interventions.key_position_removal import identified_key_effect, remove_key_positions
from rope_leak.interventions.start_cut_removal import remove_start_cut, window_mass

N = 40
WINDOW = 8


def model_and_tokens(n_layers=1, seed=0, prompts=8):
    model = tiny_rope_model(n_layers=n_layers, n_heads=4, d_model=32, d_head=8, n_ctx=N, seed=seed,
                            dtype=torch.float64)
    tokens = torch.randint(1, 50, (prompts, N), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 0
    return model, tokens


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_window_mass_is_the_visible_mass_on_the_last_w_non_sink_keys():
    pattern = torch.softmax(torch.randn(2, 3, 10, 10, dtype=torch.float64).masked_fill(
        torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf")), -1)
    rho = window_mass(pattern, 4)
    for i in range(10):
        expected = pattern[..., i, max(1, i - 3):i + 1].sum(-1) if i else torch.zeros(2, 3, dtype=torch.float64)
        torch.testing.assert_close(rho[..., i], expected)


def test_zero_past_and_zero_key_effect_leave_the_logits_unchanged():
    model, tokens = model_and_tokens(n_layers=2)
    before = logits(model, tokens)
    zero_past = {(l, h): (np.zeros(N), torch.randn(8, dtype=torch.float64)) for l in range(2) for h in range(4)}
    with remove_start_cut(model, zero_past, window=WINDOW):
        torch.testing.assert_close(logits(model, tokens), before, rtol=0, atol=1e-6)
    with remove_key_positions(model, {(l, h): np.zeros(N) for l in range(2) for h in range(4)}):
        torch.testing.assert_close(logits(model, tokens), before, rtol=0, atol=1e-6)
    # and the interventions do change the logits when they have something to remove
    with remove_start_cut(model, {(0, 1): (np.ones(N), torch.ones(8, dtype=torch.float64))}, window=WINDOW):
        assert not torch.allclose(logits(model, tokens), before, atol=1e-6)


def test_a_linear_key_trend_is_not_identified_so_its_removal_is_a_no_op():
    keys = np.arange(1, N)
    trend = 0.3 * keys - 2.0
    assert np.abs(identified_key_effect(trend, keys)).max() < 1e-12
    model, tokens = model_and_tokens()
    before = logits(model, tokens)
    effect = np.zeros(N)
    effect[1:] = identified_key_effect(trend, keys)
    with remove_key_positions(model, {"L0H2": effect}):
        torch.testing.assert_close(logits(model, tokens), before, rtol=0, atol=1e-9)
    # the raw trend (not removed first) would not be a no-op: the test can fail
    raw = np.concatenate([[0.0], trend])
    with remove_key_positions(model, {"L0H2": raw}):
        assert not torch.allclose(logits(model, tokens), before, atol=1e-6)


def test_a_planted_linear_key_trend_fits_to_no_identified_key_effect():
    """Scores of every head planted as relative + a linear trend in the key: the fitted,
    identified key effect is 0, so key-position removal is a no-op end to end."""
    model, tokens = model_and_tokens(prompts=8)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    planted = (-1.5 * torch.log1p((i - j).abs().double()) + 0.2 * j).expand(1, 4, N, N)
    def inject(s, hook):  # the analysis also runs short prefixes (the BOS check)
        n = s.shape[-1]
        return planted[..., :n, :n].expand_as(s).masked_fill(j[:, :n] > i[:n], float("-inf")).to(s.dtype)

    model.blocks[0].attn.hook_attn_scores.add_hook(inject)
    analysis = analyze(model, tokens, progress=False, window=WINDOW, n_boot=10)
    fitted = fitted_removals(model, analysis, tokens)
    assert np.abs(fitted.key_effect).max() < 1e-6  # the planted trend spans 0.2 x 40 = 8
    before = logits(model, tokens)
    with remove_key_positions(model, fitted.key_positions([(0, h) for h in range(4)])):
        torch.testing.assert_close(logits(model, tokens), before, rtol=0, atol=1e-5)


def test_a_head_with_zero_output_weights_has_exactly_zero_effect():
    model, tokens = model_and_tokens(n_layers=2, prompts=8)
    with torch.no_grad():
        model.blocks[1].attn.W_O[2] = 0.0
    analysis = analyze(model, tokens, progress=False, window=WINDOW, n_boot=10)
    effects = loss_effects(model, analysis, tokens[:4], tokens[4:], heads=["L1H2", "L0H1"], layers=False,
                           progress=False)
    dead = effects.table[effects.table["label"] == "L1H2"]
    assert (dead["effect_nats"] == 0.0).all()
    live = effects.table[effects.table["label"] == "L0H1"]
    assert (live["effect_nats"].abs() > 0).any()  # the comparison can fail


def test_start_cut_removal_equals_a_hand_written_forward_pass():
    """One layer: the intervened logits against attention written out by hand with the
    counterfactual pattern A / (1 + rho T) and the virtual past's r v̄."""
    model, tokens = model_and_tokens(n_layers=1, prompts=3)
    past = np.linspace(0.0, 3.0, N)[None].repeat(4, 0)
    v_mean = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    spec = {(0, h): (past[h], v_mean[h]) for h in (1, 3)}
    with remove_start_cut(model, spec, window=WINDOW):
        got = logits(model, tokens)
    _, cache = model.run_with_cache(tokens)
    attn = model.blocks[0].attn
    pattern, v = cache[act_name("pattern", 0)].clone(), cache[act_name("v", 0)]
    for h in (1, 3):
        for i in range(N):
            rho = pattern[:, h, i, max(1, i - WINDOW + 1):i + 1].sum(-1) if i else torch.zeros(3, dtype=torch.float64)
            pattern[:, h, i] /= (1 + rho * past[h, i])[:, None]
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
    for h in (1, 3):
        mass = 1 - pattern[:, h].sum(-1)  # r_i: what the visible keys gave up
        z[:, :, h] += mass[..., None] * v_mean[h]
    resid = cache["blocks.0.hook_resid_pre"] + torch.einsum("bqhd,hdm->bqm", z, attn.W_O) + attn.b_O
    block = model.blocks[0]
    resid = resid + block.mlp(block.ln2(resid))
    expected = model.unembed(model.ln_final(resid))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_interventions_restore_the_model_after_an_error():
    model, tokens = model_and_tokens()
    before = logits(model, tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with remove_start_cut(model, {(0, 0): (np.ones(N), torch.zeros(8, dtype=torch.float64))}, window=WINDOW), \
                remove_key_positions(model, {(0, 1): np.ones(N)}):
            raise RuntimeError("boom")
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
    torch.testing.assert_close(logits(model, tokens), before, rtol=0, atol=0)


def test_effects_tables_and_errors():
    model, tokens = model_and_tokens(n_layers=2, prompts=10)
    analysis = analyze(model, tokens[:6], progress=False, window=WINDOW, n_boot=10)
    effects = loss_effects(model, analysis, tokens[:6], tokens[6:], heads=["L0H0"], progress=False)
    layer = effects.layer_table("key_positions_removed", "early")
    assert list(layer.index) == [0, 1] and (layer["ci_low"] <= layer["effect_nats"]).all()
    assert effects.head_table().loc[0, 0] == pytest.approx(
        effects.table.query("label == 'L0H0' and intervention == 'start_cut_removed' and queries == 'all'")
        ["effect_nats"].item())
    with pytest.raises(ValueError, match="held-out"):
        loss_effects(model, analysis, tokens[:6], tokens[6:7], progress=False)
    with pytest.raises(ValueError, match="intervention"):
        effects.layer_table("nothing")
