"""Turning text into token ids: a real tokenizer, or a byte fallback for tiny test models."""

from __future__ import annotations

from typing import Any

from rope_leak.corpus.errors import CorpusError


class ByteTokenizer:
    """Deterministic byte-level fallback tokenizer, **for tests with tiny models only**.

    Token id = UTF-8 byte value modulo ``d_vocab``. It lets the corpus pipeline run on
    tokenizer-less toy ``HookedTransformer``s without any tokenizer files; the ids are
    meaningless to a trained model, so never use it for a real measurement.
    """

    name = "byte-fallback"

    def __init__(self, d_vocab: int) -> None:
        if d_vocab < 1:
            raise CorpusError(
                f"ByteTokenizer needs d_vocab >= 1, got {d_vocab}. Fix: pass the model's "
                "cfg.d_vocab."
            )
        self.d_vocab = int(d_vocab)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b % self.d_vocab for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        if self.d_vocab < 256:
            raise CorpusError(
                f"ByteTokenizer(d_vocab={self.d_vocab}) folds bytes modulo {self.d_vocab}, so "
                "its ids cannot be decoded. Fix: decode only with d_vocab >= 256."
            )
        return bytes(ids).decode("utf-8", errors="replace")


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with **no** special tokens (no BOS/EOS added).

    Works with Hugging Face tokenizers (the length warning for long documents is
    silenced: documents are cut into chunks afterwards) and with ``ByteTokenizer``.
    """
    if not hasattr(tokenizer, "encode"):
        raise CorpusError(
            f"{type(tokenizer).__name__} has no encode() method. Fix: pass a Hugging Face "
            "tokenizer (e.g. model.tokenizer) or rope_leak.corpus.ByteTokenizer(d_vocab)."
        )
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    try:
        ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    except TypeError:  # a tokenizer that does not take ``verbose``
        ids = tokenizer.encode(text, add_special_tokens=False)
    return [int(i) for i in ids]


def tokenizer_name(tokenizer: Any) -> str:
    """A short name for the tokenizer, recorded in corpus metadata."""
    if isinstance(tokenizer, ByteTokenizer):
        return f"byte-fallback(d_vocab={tokenizer.d_vocab})"
    name = getattr(tokenizer, "name_or_path", None) or ""
    return f"{type(tokenizer).__name__}({name})" if name else type(tokenizer).__name__
