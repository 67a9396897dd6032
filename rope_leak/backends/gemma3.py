"""TransformerLens configs for Gemma 3 checkpoints of any size (tiny test models included).

TransformerLens 3.9 builds Gemma configs only from official names (a local folder raises
``NotImplementedError``). :func:`gemma3_cfg_dict` starts from the official
``google/gemma-3-270m`` config (built offline from the name: architecture flags such as
QK-norm, sandwich norms, gelu-tanh gated MLP) and overwrites every size, base, window
and layer-kind field from the Hugging Face config, so a randomly initialised tiny
``Gemma3ForCausalLM`` converts into a ``HookedTransformer`` that computes what it computes.
"""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens import loading_from_pretrained as tl_loading

TEMPLATE = "google/gemma-3-270m"
_LAYER_KINDS = {"sliding_attention": "local", "full_attention": "global"}


def _rope_theta(hf_config: Any, layer_type: str, default: float) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    entry = params.get(layer_type, params) if isinstance(params, dict) else {}
    if isinstance(entry, dict) and "rope_theta" in entry:
        return float(entry["rope_theta"])
    return float(default)


def gemma3_cfg_dict(hf_config: Any) -> dict:
    """TransformerLens config dict for a Hugging Face ``Gemma3TextConfig``."""
    cfg = dict(tl_loading.convert_hf_model_config(TEMPLATE))
    params = getattr(hf_config, "rope_parameters", None) or {}
    for layer_type in ("full_attention", "sliding_attention"):
        rope_type = (params.get(layer_type) or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(
                f"Gemma 3 {layer_type} RoPE of type {rope_type!r} is not converted; only "
                "'default' (use rope_leak.interventions.rope.rope_scaling at inference)."
            )
    layer_types = list(hf_config.layer_types)
    head_dim = int(hf_config.head_dim)
    cfg.update(
        d_model=int(hf_config.hidden_size),
        d_head=head_dim,
        n_heads=int(hf_config.num_attention_heads),
        n_key_value_heads=int(hf_config.num_key_value_heads),
        d_mlp=int(hf_config.intermediate_size),
        n_layers=int(hf_config.num_hidden_layers),
        n_ctx=int(hf_config.max_position_embeddings),
        eps=float(hf_config.rms_norm_eps),
        d_vocab=int(hf_config.vocab_size),
        act_fn=str(hf_config.hidden_activation),
        rotary_dim=head_dim,
        rotary_base=_rope_theta(hf_config, "full_attention", cfg["rotary_base"]),
        rotary_base_local=_rope_theta(hf_config, "sliding_attention", cfg["rotary_base_local"]),
        window_size=int(hf_config.sliding_window),
        use_local_attn=True,
        attn_types=[_LAYER_KINDS[t] for t in layer_types],
        attn_scale=float(hf_config.query_pre_attn_scalar) ** 0.5,
        tokenizer_name=None,
    )
    if getattr(hf_config, "attn_logit_softcapping", None) or getattr(
        hf_config, "final_logit_softcapping", None
    ):
        cfg["attn_scores_soft_cap"] = float(hf_config.attn_logit_softcapping or -1.0)
        cfg["output_logits_soft_cap"] = float(hf_config.final_logit_softcapping or -1.0)
    return cfg


def tiny_gemma3_hf(
    n_layers: int = 4,
    sliding_window: int = 4,
    layer_types: list[str] | None = None,
    d_vocab: int = 50,
    n_ctx: int = 64,
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A random-weight Hugging Face ``Gemma3ForCausalLM`` for tests: 64-d, 4 query / 2 kv
    heads of 16 dims, local (sliding-window) and global layers alternating by default,
    bases 1e3 (local) and 1e5 (global), BOS id 0. Norm weights are random too (Gemma
    adds 1 to them), so QK-norm and sandwich norms are exercised."""
    # deferred: transformers loads its Gemma 3 model code on first use (only test models need it)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    if layer_types is None:
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    config = Gemma3TextConfig(
        vocab_size=d_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=sliding_window,
        layer_types=layer_types, max_position_embeddings=n_ctx, query_pre_attn_scalar=16,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e3},
        },
        attn_implementation=attn_implementation, pad_token_id=1, bos_token_id=0, eos_token_id=1,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.copy_(0.3 * torch.randn_like(param))
    finally:
        torch.random.set_rng_state(state)
    return model
