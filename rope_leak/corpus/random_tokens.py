"""A corpus of uniformly random tokens, for unit tests with tiny models."""

from __future__ import annotations

import numpy as np
import torch

from rope_leak.corpus.chunking import Corpus, corpus_sha256
from rope_leak.corpus.errors import CorpusError


def make_random_corpus(
    n_prompts: int,
    n_tokens: int,
    d_vocab: int,
    seed: int = 0,
    bos_token_id: int | None = None,
) -> Corpus:
    """``n_prompts`` x ``n_tokens`` token ids drawn uniformly from ``[0, d_vocab)``.

    Deterministic in ``seed``. When ``bos_token_id`` is given it fills column 0 (and
    the random tokens avoid it, so BOS appears only at position 0). Each prompt is its
    own "document" (``doc_ids = 0..n_prompts-1``, ``starts = 0``). Meant for unit tests
    of the analysis code; use ``load_corpus`` for measurements. Unlike ``make_chunks``
    it accepts any ``n_prompts >= 1``.
    """
    if n_prompts < 1 or n_tokens < 1:
        raise CorpusError(
            f"make_random_corpus needs n_prompts >= 1 and n_tokens >= 1, got {n_prompts} and "
            f"{n_tokens}. Fix: pass positive sizes."
        )
    if bos_token_id is not None and not 0 <= bos_token_id < d_vocab:
        raise CorpusError(
            f"bos_token_id={bos_token_id} is outside the vocabulary [0, {d_vocab}). Fix: pass "
            "a token id below d_vocab, or None."
        )
    n_choices = d_vocab - (1 if bos_token_id is not None else 0)
    if n_choices < 1:
        raise CorpusError(
            f"d_vocab={d_vocab} leaves no token besides the BOS. Fix: use d_vocab >= 2."
        )
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, n_choices, size=(n_prompts, n_tokens), dtype=np.int64)
    if bos_token_id is not None:
        ids[ids >= bos_token_id] += 1  # skip the BOS id
        ids[:, 0] = bos_token_id
    tokens = torch.from_numpy(ids)
    settings = {
        "source": "random",
        "n_prompts": n_prompts,
        "n_tokens": n_tokens,
        "d_vocab": d_vocab,
        "seed": seed,
        "bos_token_id": bos_token_id,
    }
    return Corpus(
        tokens=tokens,
        doc_ids=list(range(n_prompts)),
        starts=[0] * n_prompts,
        source="random",
        n_documents=n_prompts,
        sha256=corpus_sha256(tokens, settings),
        bos_token_id=bos_token_id,
        attribution=None,
        titles=[f"random-{i}" for i in range(n_prompts)],
        seed=seed,
        tokenizer=f"uniform(d_vocab={d_vocab})",
    )
