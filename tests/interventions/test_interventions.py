"""Interventions: the bidirectional swap against Hugging Face's own forward pass with a
full (non-causal) 4D mask, per-layer / per-head swaps, position-0 replacement, and exact
restoration of the model on exit, also on error."""

from __future__ import annotations

import itertools

import pytest
import torch

from rope_leak.backends import load_hf_model, load_model
from rope_leak.interventions.mask import bidirectional
from rope_leak.interventions.position_zero import mean_embedding, replace_position_zero


def full_mask(tokens: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """An additive 4D mask that hides nothing: HF then attends bidirectionally."""
    batch, n = tokens.shape
    return torch.zeros(batch, 1, n, n, dtype=dtype)


@pytest.fixture(scope="module")
def tiny_hf_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=10000.0,
    )
    hf = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny") / "tiny_rope_lm"
    hf.save_pretrained(folder)
    return load_model(str(folder)), load_hf_model(str(folder))[0]


def test_bidirectional_matches_hf_with_full_mask(tiny_hf_llama):
    model, hf = tiny_hf_llama
    tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        causal_hf = hf(tokens).logits
        bidirectional_hf = hf(tokens, attention_mask=full_mask(tokens)).logits
        with bidirectional(model):
            ours = model(tokens)
        causal_ours = model(tokens)
    assert (causal_hf - bidirectional_hf).abs().max() > 0.05  # the swap changes something
    assert (ours - bidirectional_hf).abs().max() <= 2e-3
    assert (ours - bidirectional_hf).abs().max() <= max(1e-5, 10 * (causal_ours - causal_hf).abs().max())


@pytest.mark.real_model
def test_bidirectional_matches_hf_on_real_model(real_model, real_hf_model):
    hf, tokenizer = real_hf_model
    text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris."
    tokens = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text).input_ids])
    with torch.no_grad():
        reference = hf(tokens, attention_mask=full_mask(tokens)).logits
        causal_gap = (hf(tokens).logits - real_model(tokens)).abs().max()
        with bidirectional(real_model):
            ours = real_model(tokens)
    gap = (ours - reference).abs().max()
    assert gap <= 2e-3, f"bidirectional gap {gap}, causal gap {causal_gap}"


def test_swap_of_one_layer_leaves_earlier_layers_alone(tiny_model, tiny_tokens):
    _, cache = tiny_model.run_with_cache(tiny_tokens)
    with bidirectional(tiny_model, layers=[1]):
        _, swapped = tiny_model.run_with_cache(tiny_tokens)
    torch.testing.assert_close(swapped["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"],
                               rtol=0, atol=0)
    assert not torch.allclose(swapped["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"])
    above = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)
    assert swapped["blocks.1.attn.hook_pattern"][..., above].min() > 0


def test_swap_of_one_head_only(tiny_model, tiny_tokens):
    with bidirectional(tiny_model, heads={0: [2]}):
        _, cache = tiny_model.run_with_cache(tiny_tokens)
    pattern = cache["blocks.0.attn.hook_pattern"]
    above = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)
    assert pattern[:, 2][..., above].min() > 0
    for head in (0, 1, 3):
        assert pattern[:, head][..., above].abs().max() == 0
    assert cache["blocks.1.attn.hook_pattern"][..., above].abs().max() == 0


def test_bad_layer_or_head_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="layers .*0..1"):
        with bidirectional(tiny_model, layers=[5]):
            pass
    with pytest.raises(ValueError, match="heads .*0..3"):
        with bidirectional(tiny_model, heads={0: [9]}):
            pass


@pytest.mark.parametrize("replacement", ["token", "mean", "zeros", "noise"])
def test_position_zero_replacement(tiny_model, tiny_tokens, replacement):
    _, clean = tiny_model.run_with_cache(tiny_tokens)
    with replace_position_zero(tiny_model, replacement, token_id=7):
        _, patched = tiny_model.run_with_cache(tiny_tokens)
    embed, original = patched["hook_embed"], clean["hook_embed"]
    torch.testing.assert_close(embed[:, 1:], original[:, 1:], rtol=0, atol=0)
    expected = {
        "token": tiny_model.W_E[7],
        "mean": tiny_model.W_E.mean(0),
        "zeros": torch.zeros(tiny_model.cfg.d_model),
    }
    if replacement in expected:
        torch.testing.assert_close(embed[:, 0], expected[replacement].expand_as(embed[:, 0]),
                                   rtol=1e-5, atol=1e-6)
    else:  # norm-matched noise: same norm as what it replaces, a different direction
        torch.testing.assert_close(embed[:, 0].norm(dim=-1), original[:, 0].norm(dim=-1))
        cosine = torch.nn.functional.cosine_similarity(embed[:, 0], original[:, 0], dim=-1)
        assert cosine.abs().max() < 0.9
    # Later positions see a different position 0 from layer 1 on.
    assert not torch.allclose(patched["blocks.1.hook_resid_pre"][:, 1:], clean["blocks.1.hook_resid_pre"][:, 1:])


def test_mean_embedding_is_mean_of_rows(tiny_model):
    torch.testing.assert_close(mean_embedding(tiny_model, chunk=7), tiny_model.W_E.mean(0))


INTERVENTIONS = {
    "bidirectional": lambda m: bidirectional(m),
    "one_layer": lambda m: bidirectional(m, layers=[0]),
    "one_head": lambda m: bidirectional(m, heads={1: [0, 3]}),
    "token": lambda m: replace_position_zero(m, "token", token_id=3),
    "noise": lambda m: replace_position_zero(m, "noise", seed=1),
}


@pytest.mark.parametrize("names", [(n,) for n in INTERVENTIONS] + list(itertools.combinations(INTERVENTIONS, 2)))
def test_model_restored_exactly_after_error(tiny_model, tiny_tokens, names):
    before = tiny_model(tiny_tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with contextlib_nest([INTERVENTIONS[n](tiny_model) for n in names]):
            inside = tiny_model(tiny_tokens)
            assert not torch.equal(inside, before)
            raise RuntimeError("boom")
    assert torch.equal(tiny_model(tiny_tokens), before)
    assert all(not hp.fwd_hooks and not hp._forward_hooks for hp in tiny_model.hook_dict.values())


def contextlib_nest(managers):
    import contextlib

    stack = contextlib.ExitStack()
    for manager in managers:
        stack.enter_context(manager)
    return stack
