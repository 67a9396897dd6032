"""Documents -> fixed-length token chunks, stratified across documents, deterministic.

``make_chunks`` tokenises each document *without* special tokens, cuts its token
sequence into non-overlapping windows (``n_tokens - 1`` tokens when a BOS token will be
prepended, ``n_tokens`` otherwise) and samples ``n_prompts`` windows:

1. the documents are shuffled with ``numpy.random.default_rng(seed)``;
2. windows are taken round-robin, one per document per round, in that shuffled order,
   until ``n_prompts`` are collected. Within a document the windows are visited in a
   random order drawn from ``default_rng([seed, document index])``.

So the chunks spread over as many documents as possible (``min(n_prompts, documents
with a full window)`` distinct documents), the same seed always gives the same tokens,
and documents are tokenised lazily: only as many as the rounds need.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Int

from rope_leak.corpus.document import Document
from rope_leak.corpus.errors import CorpusError
from rope_leak.corpus.tokenize import encode_text, tokenizer_name
from rope_leak.display import Displayable

__all__ = ["Corpus", "Document", "make_chunks", "corpus_sha256", "MIN_PROMPTS"]

MIN_PROMPTS = 4
"""Fewest prompts a corpus may have: cross-fitting splits the prompts into two halves."""

RECOMMENDED_PROMPTS = 64


@dataclass(repr=False)
class Corpus(Displayable):
    """A batch of equal-length token prompts cut from documents, with its provenance.

    Attributes:
        tokens: ``[prompt, pos]`` int64 token ids; column 0 is ``bos_token_id`` when
            one was prepended.
        doc_ids: ``Document.doc_id`` of the document each prompt was cut from.
        starts: token offset of each prompt's text within its document's tokenisation
            (the BOS, if any, is not counted: it is not part of the document).
        source: where the text came from (``"wikipedia"``, a path, ``"random"``).
        n_documents: number of documents in the source.
        sha256: hash of the token bytes plus the settings, to trace a result to its input.
        bos_token_id: the token prepended at position 0, or None.
        attribution: licence / attribution text of the source, kept in the metadata.
        titles: title of the document of each prompt.
        seed: the sampling seed.
        tokenizer: name of the tokenizer used.
    """

    tokens: Int[torch.Tensor, "prompt pos"]
    doc_ids: list[int]
    starts: list[int]
    source: str
    n_documents: int
    sha256: str
    bos_token_id: int | None = None
    attribution: str | None = None
    titles: list[str] = field(default_factory=list)
    seed: int = 0
    tokenizer: str = ""

    @property
    def n_prompts(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_documents_used(self) -> int:
        return len(set(self.doc_ids))

    def __len__(self) -> int:
        return self.n_prompts

    def _display_items(self) -> list[tuple[str, Any]]:
        return [
            ("source", str(self.source)), ("prompts", self.n_prompts), ("tokens", self.n_tokens),
            ("documents_used", f"{self.n_documents_used} of {self.n_documents}"),
            ("bos_token_id", self.bos_token_id), ("tokenizer", self.tokenizer), ("seed", self.seed),
            ("sha256", self.sha256[:12] + "..." if self.sha256 else self.sha256),
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metadata for results.json (everything but the tokens)."""
        return {
            "source": self.source,
            "n_prompts": self.n_prompts,
            "n_tokens": self.n_tokens,
            "seed": self.seed,
            "tokenizer": self.tokenizer,
            "bos_token_id": self.bos_token_id,
            "n_documents": self.n_documents,
            "n_documents_used": self.n_documents_used,
            "sha256": self.sha256,
            "attribution": self.attribution,
            "chunks": [
                {"doc_id": d, "start": s, **({"title": t} if t is not None else {})}
                for d, s, t in zip(
                    self.doc_ids,
                    self.starts,
                    self.titles or [None] * len(self.doc_ids),
                    strict=True,
                )
            ],
        }


def corpus_sha256(tokens: torch.Tensor, settings: dict[str, Any]) -> str:
    """sha256 of the int64 token bytes followed by the JSON of ``settings``."""
    digest = hashlib.sha256()
    array = np.ascontiguousarray(tokens.detach().cpu().numpy().astype("<i8"))
    digest.update(repr(tuple(array.shape)).encode())
    digest.update(array.tobytes())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def check_sizes(n_prompts: int, n_tokens: int) -> None:
    """Raise ``CorpusError`` for a request no analysis can use."""
    if n_tokens < 2:
        raise CorpusError(
            f"n_tokens={n_tokens} is too short: a prompt needs at least 2 tokens to have "
            "any query-key pair besides position 0. Fix: use n_tokens >= 2 (the reported "
            "setup uses 256)."
        )
    if n_prompts < MIN_PROMPTS:
        raise CorpusError(
            f"n_prompts={n_prompts} is too few: cross-fitting splits the prompts into two "
            f"halves, so it needs at least {MIN_PROMPTS}. Fix: use n_prompts >= "
            f"{MIN_PROMPTS}; >= {RECOMMENDED_PROMPTS} is recommended (smaller samples bias "
            "the cross-fitted share low)."
        )


def make_chunks(
    documents: Sequence[Document],
    tokenizer: Any,
    *,
    n_prompts: int = 64,
    n_tokens: int = 256,
    seed: int = 0,
    bos_token_id: int | None = None,
    source: str = "documents",
    attribution: str | None = None,
) -> Corpus:
    """Cut ``n_prompts`` prompts of exactly ``n_tokens`` tokens from ``documents``.

    Args:
        documents: the text, one ``Document`` per article / file / record.
        tokenizer: a Hugging Face tokenizer or ``ByteTokenizer``; called without
            special tokens.
        n_prompts: number of prompts (>= 4; 64 recommended).
        n_tokens: length of each prompt including the BOS when one is prepended.
        seed: sampling seed; the same seed gives identical tokens.
        bos_token_id: when given, every prompt starts with it and carries
            ``n_tokens - 1`` document tokens; when None, ``n_tokens`` document tokens.
        source, attribution: provenance recorded in the ``Corpus``.

    Raises:
        CorpusError: no documents, sizes too small, or fewer windows than prompts.
    """
    check_sizes(n_prompts, n_tokens)
    documents = list(documents)
    if not documents:
        raise CorpusError(
            f"the text source {source!r} has no documents. Fix: point it at a non-empty "
            "file or folder, or use source='wikipedia'."
        )
    window = n_tokens - 1 if bos_token_id is not None else n_tokens
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(documents))

    # pools: (document index, token ids, random visiting order of its windows)
    pools: list[tuple[int, list[int], np.ndarray]] = []
    picked: list[tuple[int, int]] = []  # (document index, token start)
    lengths: dict[int, int] = {}

    def take(pool: tuple[int, list[int], np.ndarray], round_: int) -> None:
        index, _, visit = pool
        picked.append((index, int(visit[round_]) * window))

    # Round 0 tokenises documents lazily in the shuffled order.
    for index in order.tolist():
        if len(picked) == n_prompts:
            break
        ids = encode_text(tokenizer, documents[index].text)
        lengths[index] = len(ids)
        n_windows = len(ids) // window
        if n_windows == 0:
            continue
        visit = np.random.default_rng([seed, index]).permutation(n_windows)
        pools.append((index, ids, visit))
        take(pools[-1], 0)

    round_ = 1
    while len(picked) < n_prompts:
        live = [p for p in pools if len(p[2]) > round_]
        if not live:
            break
        for pool in live:
            if len(picked) == n_prompts:
                break
            take(pool, round_)
        round_ += 1

    if len(picked) < n_prompts:
        _raise_too_few(len(picked), n_prompts, n_tokens, window, lengths, source, bos_token_id)

    ids_of = {p[0]: p[1] for p in pools}
    rows = []
    for index, start in picked:
        row = ids_of[index][start : start + window]
        rows.append(([bos_token_id] if bos_token_id is not None else []) + row)
    tokens = torch.tensor(rows, dtype=torch.int64)
    settings = {
        "source": source,
        "n_prompts": n_prompts,
        "n_tokens": n_tokens,
        "seed": seed,
        "bos_token_id": bos_token_id,
        "tokenizer": tokenizer_name(tokenizer),
        "doc_ids": [documents[i].doc_id for i, _ in picked],
        "starts": [s for _, s in picked],
    }
    return Corpus(
        tokens=tokens,
        doc_ids=[documents[i].doc_id for i, _ in picked],
        starts=[s for _, s in picked],
        source=source,
        n_documents=len(documents),
        sha256=corpus_sha256(tokens, settings),
        bos_token_id=bos_token_id,
        attribution=attribution,
        titles=[documents[i].title for i, _ in picked],
        seed=seed,
        tokenizer=tokenizer_name(tokenizer),
    )


def _raise_too_few(
    available: int,
    n_prompts: int,
    n_tokens: int,
    window: int,
    lengths: dict[int, int],
    source: str,
    bos_token_id: int | None,
) -> None:
    total = sum(lengths.values())
    longest = max(lengths.values(), default=0)
    with_bos = " (plus the BOS token)" if bos_token_id is not None else ""
    if available == 0:
        raise CorpusError(
            f"no document in {source!r} has {window} tokens{with_bos}, enough for one prompt "
            f"of n_tokens={n_tokens}: the longest has {longest} tokens ({total} in all, "
            f"{len(lengths)} documents). Fix: lower n_tokens to at most "
            f"{longest + (1 if bos_token_id is not None else 0)}, or add longer documents."
        )
    max_tokens = 0
    for candidate in range(n_tokens, 1, -1):  # longest prompt length that would suffice
        w = candidate - 1 if bos_token_id is not None else candidate
        if w >= 1 and sum(n // w for n in lengths.values()) >= n_prompts:
            max_tokens = candidate
            break
    hint = f" or lower n_tokens to {max_tokens}" if max_tokens else ""
    raise CorpusError(
        f"{source!r} has only {available} non-overlapping windows of {window} tokens"
        f"{with_bos} ({total} tokens in {len(lengths)} documents), but n_prompts={n_prompts} "
        f"were requested. Fix: lower n_prompts to at most {available}{hint}, or add more text."
    )
