"""Run rope_leak on a TransformerLens ``TransformerBridge`` (the successor of
``HookedTransformer``) instead of a ``HookedTransformer``.

What the engine needs and what the bridge offers (transformer-lens 3.9):

* hook names: ``blocks.{l}.attn.hook_attn_scores`` (pre-softmax, after the mask, like
  ``HookedTransformer``), ``blocks.{l}.hook_resid_pre`` / ``hook_resid_post`` (aliases of
  ``blocks.{l}.hook_in`` / ``hook_out``), ``hook_embed``; ``model.hooks(fwd_hooks=...)`` and
  ``model(tokens, return_type=None)`` work unchanged, and ``cfg`` has ``n_layers``,
  ``n_heads``, ``n_ctx``, ``d_vocab``, ``device``. So the engine runs as is.
* masked scores: the bridge fills masked keys with ``finfo.min`` (``-inf`` only in
  compatibility mode), which softmax and ``logsumexp`` treat as ``-inf``.
* the mask swap is what differs: the bridge has no ``_attention_dir_override``; each
  attention bridge adds the 4D mask Hugging Face built for its layer kind (causal for
  full-attention layers, causal sliding window for sliding layers). :func:`rope_leak.interventions.mask.bridge_bidirectional`
  replaces that ``attention_mask`` keyword argument with a forward pre-hook on each
  chosen attention module: all zeros (every key visible) for global layers, and for
  sliding-window layers the symmetric window ``|i - j| < w`` (``window="symmetric"``)
  or nothing (``"none"``), the same semantics as :func:`rope_leak.interventions.mask.bidirectional`,
  which dispatches here for bridges. Per-head swaps re-impose the causal mask on the
  other heads with the same scores hook as the HookedTransformer path.
* RoPE controls (:mod:`rope_leak.interventions.rope`) act on HookedTransformer rotary
  tables; the bridge takes cos/sin from the Hugging Face ``rotary_emb`` module, so they
  are not supported on bridges (they raise).

:func:`bridge_from_hf` builds a bridge from an in-memory Hugging Face model with no hub
access (``TransformerBridge.boot_transformers`` otherwise downloads a tokenizer).
"""

from __future__ import annotations

import tempfile
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

try:
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:  # pragma: no cover - transformer-lens without the bridge
    TransformerBridge = None


def is_bridge(model: Any) -> bool:
    return TransformerBridge is not None and isinstance(model, TransformerBridge)


def _offline_tokenizer(vocab_size: int, bos_token_id: int | None):
    """A word-level tokenizer ``t0 .. t{V-1}`` (loaded back from a folder, as the bridge
    re-loads tokenizers by ``name_or_path``)."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos_token = f"t{bos_token_id if bos_token_id is not None else 0}"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos_token, eos_token=bos_token,
                                   pad_token=bos_token, unk_token="t0")
    folder = tempfile.mkdtemp(prefix="rl-tok-")
    fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def bridge_from_hf(hf_model: Any, tokenizer: Any = None, *, name: str = "rope-leak-bridge"):
    """A ``TransformerBridge`` around ``hf_model`` (same weights, no copy), offline.

    Without a ``tokenizer`` a placeholder word-level one over the model's vocabulary is
    made (enough for token-id input). The BOS id is recorded as
    ``bridge.rope_leak_bos_token_id``, as :func:`rope_leak.backends.load_model` does.
    """
    if TransformerBridge is None:  # pragma: no cover - transformer-lens without the bridge
        raise ImportError("transformer_lens.model_bridge is missing: bridges need transformer-lens 3.9.")
    config = hf_model.config
    if not getattr(config, "architectures", None):
        # a freshly built (or GGUF-loaded) model has none; the bridge picks its adapter by it
        config.architectures = [type(hf_model).__name__]
    bos_id = getattr(config, "bos_token_id", None)
    if tokenizer is None:
        tokenizer = _offline_tokenizer(int(config.vocab_size), bos_id)
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer,
                                                 dtype=hf_model.dtype)
    bridge.eval()
    bridge.rope_leak_bos_token_id = bos_id  # type: ignore[attr-defined]
    bridge.cfg.default_prepend_bos = True
    return bridge


def hf_config(bridge: Any) -> Any:
    config = bridge.original_model.config
    return getattr(config, "text_config", config)


def layer_kinds(bridge: Any) -> list[str]:
    """``"local"`` (sliding-window) or ``"global"`` for every layer, from the HF config."""
    config = hf_config(bridge)
    n_layers = int(bridge.cfg.n_layers)
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is None:
        kind = "local" if window else "global"
        return [kind] * n_layers
    return ["local" if t in ("sliding_attention", "local") else "global" for t in types][:n_layers]


def window_size(bridge: Any) -> int | None:
    window = getattr(hf_config(bridge), "sliding_window", None)
    return int(window) if window else None
