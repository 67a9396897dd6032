"""Reduced-precision models: bfloat16/float16 weights and activations, while the engine
keeps softmax and statistics in float32/float64 (add_layer casts the scores to float32).

Stated tolerance: on the tiny random RoPE model (2 layers x 4 heads, 24 prompts of 32
tokens), every head's absolute-position share (pattern and log_pattern targets, causal
and bidirectional) under bfloat16 is within 0.03 of the float32 share, and under
float16 within 0.01 (float16 has 3 more mantissa bits). The measured gaps on SmolLM2
are printed by bench/precision.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rope_leak.analyses.analysis import analyze
from rope_leak.backends import tiny_rope_model

TOLERANCE = {torch.bfloat16: 0.03, torch.float16: 0.01}


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 50, (24, 32), generator=gen)
    tokens[:, 0] = 0
    return tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reduced_precision_shares_agree_with_float32(dtype, prompts):
    reference = analyze(tiny_rope_model(seed=0), prompts, progress=False)
    model = tiny_rope_model(seed=0).to(dtype)
    assert model.W_Q.dtype == dtype
    reduced = analyze(model, prompts, progress=False)
    gaps = {}
    for key, fit in reference.fits.items():
        if key[1] in ("pattern", "log_pattern"):
            gaps[key] = float(np.nanmax(np.abs(reduced.fits[key].share - fit.share)))
    assert max(gaps.values()) < TOLERANCE[dtype], gaps
    # The statistics themselves are float64 whatever the model's dtype.
    assert reduced.statistics.conditions["causal"].targets["pattern"].xty.dtype == np.float64
