"""Tiny random-weight RoPE models for unit tests (no download, no tokenizer)."""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rope_leak.backends.loading import parameters_sha256

#: The BOS id that tiny models use (token 0 of their vocabulary).
TINY_BOS_TOKEN_ID = 0


def tiny_rope_model(
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_head: int = 16,
    n_ctx: int = 64,
    d_vocab: int = 50,
    seed: int = 0,
    **cfg_overrides: Any,
) -> HookedTransformer:
    """A small Llama-like ``HookedTransformer`` with random weights.

    RoPE (``positional_embedding_type="rotary"``, non-adjacent pairs as in Llama), RMS
    norm, gated SiLU MLP (``d_mlp = 4 * d_model``), causal attention, float32, CPU.
    Weights are a deterministic function of ``seed`` (the global torch RNG is left
    untouched).

    The model has no tokenizer. Its BOS token is id ``0``: ``cfg.default_prepend_bos``
    is True and ``model.rope_leak_bos_token_id == 0``, which is what
    :func:`rope_leak.backends.bos_token_id` returns for it. Any other
    ``HookedTransformerConfig`` field can be set through ``cfg_overrides`` (e.g.
    ``n_key_value_heads=2``, ``rotary_base=1e5``, ``use_local_attn=True``).
    """
    cfg_dict: dict[str, Any] = {
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "d_head": d_head,
        "d_mlp": 4 * d_model,
        "n_ctx": n_ctx,
        "d_vocab": d_vocab,
        "act_fn": "silu",
        "normalization_type": "RMS",
        "final_rms": True,
        "gated_mlp": True,
        "positional_embedding_type": "rotary",
        "rotary_dim": d_head,
        "rotary_adjacent_pairs": False,
        "rotary_base": 10000,
        "attention_dir": "causal",
        "default_prepend_bos": True,
        "original_architecture": "LlamaForCausalLM",
        "model_name": f"tiny-rope-{n_layers}l-seed{seed}",
        "device": "cpu",
        "dtype": torch.float32,
        "seed": None,
        "init_weights": False,
    }
    cfg_dict.update(cfg_overrides)
    cfg = HookedTransformerConfig.from_dict(cfg_dict)
    model = HookedTransformer(cfg, move_to_device=False)

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in sorted(model.named_parameters()):
            leaf = pname.split(".")[-1]
            if leaf.startswith("w"):  # RMS norm gains
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif leaf.startswith("b"):  # biases
                param.zero_()
            else:  # W_E, W_U, W_Q, ... : fan-in scaled normal
                fan_in = param.shape[-2] if param.ndim >= 2 else param.shape[-1]
                if leaf == "W_E":
                    fan_in = 1
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
    model.eval()
    model.rope_leak_bos_token_id = TINY_BOS_TOKEN_ID  # type: ignore[attr-defined]
    model.rope_leak_source = {  # type: ignore[attr-defined]
        "name": cfg.model_name, "kind": "tiny", "sha256": parameters_sha256(model),
    }
    return model
