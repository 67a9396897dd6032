"""Text for the measurements: documents -> BOS-prefixed token chunks, stratified, deterministic.

Sources: the bundled English Wikipedia sample (``source="wikipedia"``, CC BY-SA, see
``rope_leak.corpus.wikipedia``) or the user's ``.txt`` / ``.jsonl`` files
(``rope_leak.corpus.files``). ``load_corpus(model)`` is the usual entry point;
``make_random_corpus`` serves unit tests with tiny models.
"""

from rope_leak.corpus.chunking import MIN_PROMPTS, Corpus, make_chunks
from rope_leak.corpus.document import Document
from rope_leak.corpus.errors import CorpusError
from rope_leak.corpus.files import read_documents
from rope_leak.corpus.load import load_corpus, model_bos_token_id, model_tokenizer
from rope_leak.corpus.random_tokens import make_random_corpus
from rope_leak.corpus.tokenize import ByteTokenizer, encode_text
from rope_leak.corpus.wikipedia import WIKIPEDIA_ATTRIBUTION, wikipedia_documents

__all__ = [
    "MIN_PROMPTS",
    "WIKIPEDIA_ATTRIBUTION",
    "ByteTokenizer",
    "Corpus",
    "CorpusError",
    "Document",
    "encode_text",
    "load_corpus",
    "make_chunks",
    "make_random_corpus",
    "model_bos_token_id",
    "model_tokenizer",
    "read_documents",
    "wikipedia_documents",
]
