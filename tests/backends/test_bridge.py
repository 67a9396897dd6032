"""The same analysis on a TransformerBridge and on a HookedTransformer built from the
same tiny random Hugging Face model gives the same per-head shares.

Tolerance: the two run the same float32 arithmetic in a different order (HF eager
attention vs TransformerLens' einsums), so logits differ by ~1e-6; shares are smooth
functions of the patterns. Measured max |difference| (8 prompts x 12 tokens): logits
2e-7 (Llama) and 7e-7 (Gemma 3); per-head shares 1.6e-7 (L_total) and 3.1e-5 (L_resid,
Llama; 2e-7 Gemma 3). Asserted: 1e-4 absolute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rope_leak.analyses.analysis import analyze
from rope_leak.backends import hooked_from_hf
from rope_leak.backends.bridge import bridge_from_hf, is_bridge, layer_kinds
from rope_leak.interventions.mask import bidirectional

SHARE_TOL = 1e-4
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_llama_hf():
    from transformers import LlamaConfig, LlamaForCausalLM

    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=60, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    torch.random.set_rng_state(state)
    return model


@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(1, 50, (8, 12), generator=gen)
    t[:, 0] = 0
    return t


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def pair(request, tiny_llama_hf, tiny_gemma_hf):
    hf = tiny_llama_hf if request.param == "llama" else tiny_gemma_hf
    return request.param, hf, hooked_from_hf(hf), bridge_from_hf(hf)


def test_bridge_detected_and_layer_kinds(pair):
    name, _, hooked, bridge = pair
    assert is_bridge(bridge) and not is_bridge(hooked)
    expected = [b.attn.attn_type for b in hooked.blocks]
    assert layer_kinds(bridge) == expected


def test_logits_agree_causal_and_bidirectional(pair, tokens):
    _, _, hooked, bridge = pair
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), hooked(tokens), atol=LOGIT_TOL, rtol=0)
        with bidirectional(hooked):
            ref = hooked(tokens)
        with bidirectional(bridge):
            got = bridge(tokens)
        torch.testing.assert_close(got, ref, atol=LOGIT_TOL, rtol=0)
        # restored on exit
        torch.testing.assert_close(bridge(tokens), hooked(tokens), atol=LOGIT_TOL, rtol=0)


def test_per_head_swap_agrees(pair, tokens):
    _, _, hooked, bridge = pair
    heads = {0: [1, 2], 1: [0]}
    with torch.no_grad():
        with bidirectional(hooked, heads=heads):
            ref = hooked(tokens)
        with bidirectional(bridge, heads=heads):
            got = bridge(tokens)
    torch.testing.assert_close(got, ref, atol=LOGIT_TOL, rtol=0)


def test_same_per_head_shares(pair, tokens):
    """The full analysis (engine, fits, decomposition, sinks) on both models."""
    name, _, hooked, bridge = pair
    # For gemma3, n = 12 > window 4: both analyses score only pairs inside the window.
    a = analyze(hooked, tokens, progress=False, n_buckets=4)
    b = analyze(bridge, tokens, progress=False, n_buckets=4)
    assert a.statistics.conditions["causal"].targets["pattern"].design.spec.max_offset == (
        4 if name == "gemma3" else None)
    for target in ["pattern", "log_pattern", "scores"]:
        da, db = a.decomposition(target), b.decomposition(target)
        np.testing.assert_allclose(db.total, da.total, atol=SHARE_TOL, rtol=0)
        np.testing.assert_allclose(db.resid, da.resid, atol=SHARE_TOL, rtol=0)
    np.testing.assert_allclose(b.sink_scores(), a.sink_scores(), atol=SHARE_TOL)
    assert abs(a.decomposition().total).max() > 1e-3  # not a trivially-zero comparison


def test_rope_controls_refuse_bridges(pair):
    from rope_leak.interventions.rope import identity_rope

    bridge = pair[3]
    with pytest.raises(ValueError, match="TransformerBridge"):
        with identity_rope(bridge):
            pass
