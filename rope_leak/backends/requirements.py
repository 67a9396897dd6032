"""What a model must be for rope_leak to analyse it, checked in one place.

Every entry point that runs a model (``analyze``, ``run_statistics``, the patching
helpers, the explorer helpers, the sink measurements, the RoPE controls) calls
:func:`require_rope` first, so a model without rotary position embeddings fails
before any work with the same message, instead of being analysed silently.
"""

from __future__ import annotations

from typing import Any

from rope_leak.backends.errors import UnsupportedModelError


class NotRoPEModelError(UnsupportedModelError):
    """The model has no rotary position embeddings."""


def require_rope(model: Any, what: str = "rope_leak") -> None:
    """Raise :class:`NotRoPEModelError` unless ``model`` uses rotary position embeddings.

    ``what`` names the caller in the message (e.g. ``"analyze"``). Works for a
    ``HookedTransformer`` and a ``TransformerBridge`` (both expose
    ``cfg.positional_embedding_type``).
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise TypeError(
            f"{what} needs a TransformerLens model (HookedTransformer or TransformerBridge), got "
            f"{type(model).__name__}. Fix: load one with rope_leak.load_model(...)."
        )
    kind = getattr(cfg, "positional_embedding_type", None)
    if kind != "rotary":
        raise NotRoPEModelError(
            f"{what}: the model {getattr(cfg, 'model_name', '')!r} uses {kind!r} position "
            "embeddings, not rotary ones (cfg.positional_embedding_type must be 'rotary'). "
            "rope_leak measures how much absolute position a RoPE model's attention carries; "
            "with learned, sinusoidal or ALiBi positions the relative/absolute split it "
            "computes has no meaning. Fix: use a RoPE model (Llama, Mistral, Qwen2/3, Gemma, "
            "SmolLM2, or rope_leak.tiny_rope_model)."
        )
