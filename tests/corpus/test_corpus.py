"""Tests of rope_leak.corpus: chunking, user files, Wikipedia cleaning, load_corpus."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from rope_leak.corpus import (
    WIKIPEDIA_ATTRIBUTION,
    ByteTokenizer,
    CorpusError,
    Document,
    load_corpus,
    make_chunks,
    make_random_corpus,
    read_documents,
)
from rope_leak.corpus.wikipedia import clean_wikitext


def fake_model(tokenizer, n_ctx=512, d_vocab=400, prepend_bos=True, **extra):
    cfg = SimpleNamespace(n_ctx=n_ctx, d_vocab=d_vocab, default_prepend_bos=prepend_bos)
    return SimpleNamespace(cfg=cfg, tokenizer=tokenizer, **extra)


# --- chunking ------------------------------------------------------------------------


def test_same_seed_same_tokens_other_seed_differs(bpe_tokenizer, make_documents):
    docs = make_documents(6, n_words=600)
    a = make_chunks(docs, bpe_tokenizer, n_prompts=12, n_tokens=32, seed=3, bos_token_id=0)
    b = make_chunks(docs, bpe_tokenizer, n_prompts=12, n_tokens=32, seed=3, bos_token_id=0)
    c = make_chunks(docs, bpe_tokenizer, n_prompts=12, n_tokens=32, seed=4, bos_token_id=0)
    assert torch.equal(a.tokens, b.tokens) and a.sha256 == b.sha256
    assert (a.doc_ids, a.starts) == (b.doc_ids, b.starts)
    assert not torch.equal(a.tokens, c.tokens) and a.sha256 != c.sha256


def test_stratified_all_documents_used(bpe_tokenizer, make_documents):
    docs = make_documents(10, n_words=600)
    corpus = make_chunks(docs, bpe_tokenizer, n_prompts=10, n_tokens=32, seed=0)
    assert sorted(corpus.doc_ids) == [d.doc_id for d in docs]
    # more prompts than documents: round-robin keeps the counts balanced (2 or 3 each)
    corpus = make_chunks(docs, bpe_tokenizer, n_prompts=25, n_tokens=32, seed=1)
    counts = Counter(corpus.doc_ids)
    assert len(counts) == 10 and set(counts.values()) <= {2, 3}
    assert len(set(zip(corpus.doc_ids, corpus.starts, strict=True))) == 25  # no window twice


def test_short_documents_are_skipped_not_fatal(bpe_tokenizer, make_documents):
    docs = make_documents(5, n_words=600) + [Document(1, "tiny", "a few words")]
    corpus = make_chunks(docs, bpe_tokenizer, n_prompts=5, n_tokens=64, seed=0)
    assert 1 not in corpus.doc_ids and corpus.n_documents == 6


@pytest.mark.parametrize("bos", [None, 0])
def test_bos_at_position_zero_exactly_when_requested(bpe_tokenizer, make_documents, bos):
    docs = make_documents(5, n_words=600)
    corpus = make_chunks(docs, bpe_tokenizer, n_prompts=8, n_tokens=40, bos_token_id=bos)
    bos_id = bpe_tokenizer.bos_token_id
    if bos is None:
        assert not (corpus.tokens == bos_id).any()
    else:
        assert (corpus.tokens[:, 0] == bos).all()
        assert not (corpus.tokens[:, 1:] == bos).any()
    assert corpus.bos_token_id == bos


@pytest.mark.parametrize("n_tokens", [2, 17, 64])
@pytest.mark.parametrize("bos", [None, 0])
def test_chunk_shape_and_dtype_exact(bpe_tokenizer, make_documents, n_tokens, bos):
    docs = make_documents(4, n_words=500)
    corpus = make_chunks(docs, bpe_tokenizer, n_prompts=6, n_tokens=n_tokens, bos_token_id=bos)
    assert corpus.tokens.shape == (6, n_tokens) and corpus.tokens.dtype == torch.int64
    assert (corpus.n_prompts, corpus.n_tokens) == (6, n_tokens)
    assert len(corpus.doc_ids) == len(corpus.starts) == len(corpus.titles) == 6


@pytest.mark.parametrize("bos", [None, 0])
def test_chunks_are_contiguous_spans_of_their_document(bpe_tokenizer, make_documents, bos):
    docs = make_documents(5, n_words=500)
    corpus = make_chunks(docs, bpe_tokenizer, n_prompts=12, n_tokens=48, bos_token_id=bos, seed=7)
    by_id = {d.doc_id: d for d in docs}
    skip = 0 if bos is None else 1
    window = 48 - skip
    for row, doc_id, start in zip(
        corpus.tokens.tolist(), corpus.doc_ids, corpus.starts, strict=True
    ):
        text = by_id[doc_id].text
        ids = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]  # independent call
        assert start % window == 0  # non-overlapping windows
        assert row[skip:] == ids[start : start + window]
        assert bpe_tokenizer.decode(row[skip:]) in text


def test_byte_tokenizer_is_deterministic_bytes_mod_vocab(synthetic_text):
    tok = ByteTokenizer(d_vocab=50)
    assert tok.encode("AB é") == [b % 50 for b in "AB é".encode()]
    docs = [Document(i, f"d{i}", synthetic_text(100, i)) for i in range(4)]
    corpus = make_chunks(docs, tok, n_prompts=4, n_tokens=20, bos_token_id=49)
    assert int(corpus.tokens[:, 1:].max()) < 50 and (corpus.tokens[:, 0] == 49).all()


def test_to_dict_is_json_metadata_without_tokens(bpe_tokenizer, make_documents):
    corpus = make_chunks(
        make_documents(4), bpe_tokenizer, n_prompts=4, n_tokens=16, attribution="CC X"
    )
    meta = json.loads(json.dumps(corpus.to_dict()))
    assert "tokens" not in meta and meta["sha256"] == corpus.sha256
    assert meta["attribution"] == "CC X" and len(meta["chunks"]) == 4
    assert meta["n_prompts"] == 4 and meta["n_tokens"] == 16 and meta["n_documents_used"] == 4


def test_make_random_corpus_deterministic_with_bos_only_at_zero():
    a = make_random_corpus(5, 12, d_vocab=7, seed=1, bos_token_id=3)
    b = make_random_corpus(5, 12, d_vocab=7, seed=1, bos_token_id=3)
    assert torch.equal(a.tokens, b.tokens) and a.tokens.dtype == torch.int64
    assert (a.tokens[:, 0] == 3).all() and not (a.tokens[:, 1:] == 3).any()
    assert int(a.tokens.max()) < 7
    assert not torch.equal(a.tokens, make_random_corpus(5, 12, d_vocab=7, seed=2).tokens)


# --- chunking errors -------------------------------------------------------------------


def test_error_documents_too_short(bpe_tokenizer):
    docs = [Document(0, "a", "short text here"), Document(1, "b", "also short")]
    with pytest.raises(CorpusError, match=r"no document .* Fix: lower n_tokens to at most \d+"):
        make_chunks(docs, bpe_tokenizer, n_prompts=4, n_tokens=256)


def test_error_too_few_chunks_names_available_and_fix(bpe_tokenizer, make_documents):
    docs = make_documents(2, n_words=200)
    with pytest.raises(CorpusError, match=r"only \d+ non-overlapping windows.*lower n_prompts"):
        make_chunks(docs, bpe_tokenizer, n_prompts=500, n_tokens=64)


def test_error_sizes_and_empty(bpe_tokenizer, make_documents):
    with pytest.raises(CorpusError, match=r"n_tokens >= 2"):
        make_chunks(make_documents(4), bpe_tokenizer, n_prompts=4, n_tokens=1)
    with pytest.raises(CorpusError, match=r"at least 4.*>= 64 is recommended"):
        make_chunks(make_documents(4), bpe_tokenizer, n_prompts=2, n_tokens=16)
    with pytest.raises(CorpusError, match=r"no documents.*Fix"):
        make_chunks([], bpe_tokenizer, n_prompts=4, n_tokens=16)


# --- user files ------------------------------------------------------------------------


def test_txt_file_is_one_document_blank_lines_kept(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    docs = read_documents(path)
    assert len(docs) == 1 and docs[0].title == "notes.txt"
    assert docs[0].text == "First paragraph.\n\nSecond paragraph."


def test_txt_form_feed_splits_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("one\f\ftwo\fthree", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("\ufefffour", encoding="utf-8")  # BOM ok
    (tmp_path / ".hidden.txt").write_text("ignored", encoding="utf-8")
    (tmp_path / "other.csv").write_text("ignored", encoding="utf-8")
    docs = read_documents(tmp_path)
    assert [d.text for d in docs] == ["one", "two", "three", "four"]
    assert [d.doc_id for d in docs] == [0, 1, 2, 3]


def test_jsonl_file(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"text": "alpha", "title": "A"}, {"text": "beta", "meta": 1}, {"text": "  "}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    docs = read_documents(path)
    assert [(d.title, d.text) for d in docs] == [("A", "alpha"), ("d.jsonl:2", "beta")]


def test_load_corpus_from_user_files(tmp_path, bpe_tokenizer, synthetic_text):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(synthetic_text(300, i), encoding="utf-8")
    corpus = load_corpus(fake_model(bpe_tokenizer), tmp_path, n_prompts=8, n_tokens=32)
    assert corpus.tokens.shape == (8, 32) and (corpus.tokens[:, 0] == 0).all()
    assert corpus.source == str(tmp_path) and corpus.n_documents_used == 4
    assert corpus.attribution is None


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("empty.txt", b"  \n\n", r"is empty.*Fix"),
        ("nul.txt", b"text\x00more", r"binary.*NUL.*Fix: pass a UTF-8"),
        ("latin.txt", "caf\xe9".encode("latin-1"), r"not valid UTF-8.*Fix: convert it to UTF-8"),
        ("notext.jsonl", b'{"body": "x"}\n', r"line 1 has no 'text' field.*Fix"),
        ("bad.jsonl", b'{"text": "x"}\n{oops\n', r"line 2 is not valid JSON.*Fix"),
        ("num.jsonl", b'{"text": 5}\n', r"not a string.*Fix"),
        ("data.csv", b"a,b\n", r"neither .txt nor .jsonl.*Fix"),
    ],
)
def test_bad_files_raise_with_fix(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=pattern):
        read_documents(path)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CorpusError, match=r"does not exist.*Fix: check the path"):
        read_documents(tmp_path / "nope.txt")
    with pytest.raises(CorpusError, match=r"no .txt or .jsonl files.*Fix"):
        read_documents(tmp_path)


# --- load_corpus -----------------------------------------------------------------------


def test_load_corpus_n_tokens_beyond_context(bpe_tokenizer, make_documents):
    model = fake_model(bpe_tokenizer, n_ctx=64)
    with pytest.raises(CorpusError, match=r"n_ctx=64.*Fix: use n_tokens <= 64"):
        load_corpus(model, make_documents(4), n_prompts=4, n_tokens=65)


def test_load_corpus_bos_follows_default_prepend_bos(bpe_tokenizer, make_documents):
    docs = make_documents(4)
    with_bos = load_corpus(fake_model(bpe_tokenizer), docs, n_prompts=4, n_tokens=16)
    no_bos = load_corpus(
        fake_model(bpe_tokenizer, prepend_bos=False), docs, n_prompts=4, n_tokens=16
    )
    assert with_bos.bos_token_id == 0 and (with_bos.tokens[:, 0] == 0).all()
    assert no_bos.bos_token_id is None and not (no_bos.tokens == 0).any()


def test_load_corpus_rejects_tokenizer_vocab_mismatch(bpe_tokenizer, make_documents):
    with pytest.raises(CorpusError, match=r"outside the model's vocabulary.*Fix"):
        load_corpus(
            fake_model(bpe_tokenizer, d_vocab=50), make_documents(4), n_prompts=4, n_tokens=16
        )


def test_load_corpus_tokenizerless_hooked_transformer(tmp_path, synthetic_text):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=16,
        n_ctx=32,
        d_head=8,
        n_heads=2,
        d_vocab=61,
        act_fn="relu",
        attn_only=True,
        positional_embedding_type="rotary",
        rotary_dim=8,
    )
    model = HookedTransformer(cfg)
    assert model.tokenizer is None
    model.rope_leak_bos_token_id = 60
    (tmp_path / "t.jsonl").write_text(
        "\n".join(json.dumps({"text": synthetic_text(60, i)}) for i in range(5)), encoding="utf-8"
    )
    corpus = load_corpus(model, tmp_path / "t.jsonl", n_prompts=5, n_tokens=32)
    assert (corpus.tokens[:, 0] == 60).all() and int(corpus.tokens.max()) < 61
    assert corpus.tokenizer.startswith("byte-fallback")
    model(corpus.tokens[:2])  # the tokens are valid model input
    with pytest.raises(CorpusError, match=r"n_ctx=32"):
        load_corpus(model, tmp_path / "t.jsonl", n_prompts=5, n_tokens=33)


# --- Wikipedia -------------------------------------------------------------------------


def test_clean_wikitext_removes_markup():
    wikitext = (
        "'''Foo''' is a {{lang|de|thing}} [[bar|baz]] word.<ref>{{cite web|url=x}}</ref> "
        "More<ref name=a/> text.\n[[File:Foo.jpg|thumb|A caption]]\n"
        '{| class="wikitable"\n|-\n| cell || cell\n|}\n'
        "== History ==\nOld <!-- hidden --> story.\n[[Category:Things]]\n[[de:Foo]]\n"
        "== References ==\n* a reference\n"
    )
    text = clean_wikitext(wikitext)
    assert text.startswith("Foo is a baz word. More text.")
    assert "History" in text and "Old story." in text
    for junk in ("{{", "[[", "<ref", "caption", "cell", "hidden", "Category", "reference", "|"):
        assert junk not in text, junk


@pytest.mark.slow
def test_real_wikipedia_dump(bpe_tokenizer):
    from rope_leak.corpus import wikipedia_documents

    docs = wikipedia_documents()
    assert len(docs) >= 50
    assert len({d.doc_id for d in docs}) == len(docs)
    for doc in docs:
        for junk in ("{{", "[[", "<ref"):
            assert junk not in doc.text, (doc.title, junk)
    assert any(d.title == "Anarchism" for d in docs)
    corpus = load_corpus(fake_model(bpe_tokenizer), "wikipedia", n_prompts=64, n_tokens=256)
    assert corpus.tokens.shape == (64, 256) and corpus.n_documents_used == 64
    assert corpus.attribution == WIKIPEDIA_ATTRIBUTION and "CC BY-SA" in corpus.attribution
    assert corpus.to_dict()["attribution"] == WIKIPEDIA_ATTRIBUTION
