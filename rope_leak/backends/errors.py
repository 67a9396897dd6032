"""Errors raised by :mod:`rope_leak.backends`. Each message names the problem and the fix."""

from __future__ import annotations


class UnknownModelError(ValueError):
    """The name given to :func:`rope_leak.backends.load_model` matches nothing it can load."""


class UnsupportedModelError(ValueError):
    """The model exists but rope_leak cannot analyse it.

    Raised for models without rotary position embeddings (e.g. GPT-2: learned absolute
    positions make the question moot) and for architectures TransformerLens 3.x cannot
    convert.
    """


class IncompleteModelFileError(ValueError):
    """A model file (GGUF, safetensors) is truncated or internally inconsistent."""
