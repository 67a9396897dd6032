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
  full-attention layers, causal sliding window for sliding layers). :func:`bridge_bidirectional`
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

import contextlib
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor


def is_bridge(model: Any) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - transformer-lens without the bridge
        return False
    return isinstance(model, TransformerBridge)


def _offline_tokenizer(vocab_size: int, bos_token_id: int | None):
    """A word-level tokenizer ``t0 .. t{V-1}`` (loaded back from a folder, as the bridge
    re-loads tokenizers by ``name_or_path``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = f"t{bos_token_id if bos_token_id is not None else 0}"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=bos,
                                   pad_token=bos, unk_token="t0")
    folder = tempfile.mkdtemp(prefix="rl-tok-")
    fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def bridge_from_hf(hf_model: Any, tokenizer: Any = None, *, name: str = "rope-leak-bridge"):
    """A ``TransformerBridge`` around ``hf_model`` (same weights, no copy), offline.

    Without a ``tokenizer`` a placeholder word-level one over the model's vocabulary is
    made (enough for token-id input). The BOS id is recorded as
    ``bridge.rope_leak_bos_token_id``, as :func:`rope_leak.models.load_model` does.
    """
    from transformer_lens.model_bridge import TransformerBridge

    config = hf_model.config
    if not getattr(config, "architectures", None):
        # a freshly built (or GGUF-loaded) model has none; the bridge picks its adapter by it
        config.architectures = [type(hf_model).__name__]
    bos = getattr(config, "bos_token_id", None)
    if tokenizer is None:
        tokenizer = _offline_tokenizer(int(config.vocab_size), bos)
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer,
                                                 dtype=hf_model.dtype)
    bridge.eval()
    bridge.rope_leak_bos_token_id = bos  # type: ignore[attr-defined]
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


def _open_mask(like: Tensor | None, hidden: Tensor, window: int | None) -> Tensor:
    """Additive 4D mask ``[batch, 1, q, k]``: 0 where visible, ``finfo.min`` elsewhere."""
    dtype = like.dtype if isinstance(like, Tensor) and like.is_floating_point() else hidden.dtype
    batch, n = hidden.shape[0], hidden.shape[1]
    mask = torch.zeros(batch, 1, n, n, dtype=dtype, device=hidden.device)
    if window is not None:
        pos = torch.arange(n, device=hidden.device)
        outside = (pos[:, None] - pos[None, :]).abs() >= window
        mask = mask.masked_fill(outside, torch.finfo(dtype).min)
    return mask


def _replace_mask_hook(module, args, kwargs, window: int | None):
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if hidden is None:
        raise RuntimeError("cannot find hidden_states to size the bidirectional mask.")
    if kwargs.get("past_key_values") is not None and getattr(kwargs["past_key_values"], "get_seq_length", lambda: 0)():
        raise RuntimeError("bidirectional swap on a bridge does not support a KV cache.")
    kwargs = dict(kwargs)
    kwargs["attention_mask"] = _open_mask(kwargs.get("attention_mask"), hidden, window)
    return args, kwargs


@contextlib.contextmanager
def bridge_bidirectional(
    bridge: Any,
    layers: Iterable[int] | None = None,
    heads: Mapping[int, Iterable[int]] | None = None,
    window: str = "symmetric",
) -> Iterator[Any]:
    """The bridge counterpart of :func:`rope_leak.interventions.mask.bidirectional`
    (same arguments and semantics; restores the bridge on exit, also on error)."""
    from rope_leak.heads import heads_by_layer, normalize_heads, normalize_layers
    from rope_leak.interventions.hooks import act_name, intervention_hooks
    from rope_leak.interventions.mask import WINDOW_MODES, _mask_keys

    if window not in WINDOW_MODES:
        raise ValueError(f"window={window!r} is not one of {WINDOW_MODES}.")
    n_heads = int(bridge.cfg.n_heads)
    if heads is not None:
        layer_heads = heads_by_layer(normalize_heads(heads, bridge))
    else:
        layer_heads = {l: list(range(n_heads)) for l in normalize_layers(layers, bridge)}
    kinds = layer_kinds(bridge)
    w = window_size(bridge)
    handles = []
    mask_hooks = []
    for layer, hs in layer_heads.items():
        causal_heads = [h for h in range(n_heads) if h not in hs]
        if causal_heads:
            fn = partial(_mask_keys, window=None, causal_heads=causal_heads)
            mask_hooks.append((act_name("attn_scores", layer), lambda scores, hook, fn=fn: fn(scores)))
    try:
        for layer in layer_heads:
            attn = bridge.blocks[layer].attn
            kept = w if kinds[layer] == "local" and window == "symmetric" else None
            # The mask is a keyword argument of the HF attention module, not an activation:
            # it can only be replaced by a plain torch pre-hook (not listed by list_hooks()).
            handles.append(attn.register_forward_pre_hook(
                partial(_replace_mask_hook, window=kept), with_kwargs=True, prepend=True))
        with intervention_hooks(bridge, mask_hooks, prepend=True):
            yield bridge
    finally:
        for handle in handles:
            handle.remove()
