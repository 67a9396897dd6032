"""The one private TransformerLens attribute rope_leak relies on is there.

The bidirectional mask sets each attention module's ``_attention_dir_override``
(TransformerLens 3.9 applies the causal mask before ``hook_attn_scores`` unless it says
otherwise). If a TransformerLens release drops it, this test names the problem first."""

from __future__ import annotations

import importlib.metadata

import torch

from rope_leak.backends import tiny_rope_model
from rope_leak.interventions.mask import bidirectional


def test_attention_modules_have_the_direction_override():
    model = tiny_rope_model(n_layers=1)
    version = importlib.metadata.version("transformer-lens")
    attn = model.blocks[0].attn
    assert hasattr(attn, "_attention_dir_override"), (
        f"transformer-lens {version}: attention modules have no _attention_dir_override, which "
        "rope_leak's mask swap sets. Fix: install the version pyproject.toml pins (transformer-lens 3.9).")
    tokens = torch.randint(1, 50, (1, 8), generator=torch.Generator().manual_seed(0))
    _, causal = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    with bidirectional(model):
        _, swapped = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    upper = torch.ones(8, 8, dtype=torch.bool).triu(1)
    assert (causal["blocks.0.attn.hook_pattern"][..., upper] == 0).all()
    assert (swapped["blocks.0.attn.hook_pattern"][..., upper] > 0).all()  # the override took effect
