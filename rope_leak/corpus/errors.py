"""The one error type of the corpus package."""

from __future__ import annotations


class CorpusError(ValueError):
    """Text could not be turned into a corpus of token chunks.

    Every message says what is wrong and how to fix it.
    """
