"""Record and patch the residual stream at position 0, layer by layer.

Under the causal mask position 0 attends only to itself, so its residual stream at
every layer (``blocks.{l}.hook_resid_pre``) is a function of the token at position 0
alone: the *position-0 trajectory*. These helpers record it and write it into another
run, at one layer (to see which heads read it) or at every layer ("replace all": every
input that later positions derive from position 0 — its keys, values and the stream
itself — comes from another token at once).

Every context manager restores the model on exit (its hooks are removed), also when
the body raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from rope_leak.heads import LayerSpec, normalize_layers
from rope_leak.interventions.hooks import act_name, intervention_hooks


def resid_pre_name(layer: int) -> str:
    """``blocks.{layer}.hook_resid_pre`` (TransformerLens' ``get_act_name``)."""
    return act_name("resid_pre", layer)


def record_position_zero(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "layer_plus_1 batch d_model"]:
    """The residual stream at position 0 of each prompt: ``hook_resid_pre`` of every
    layer, then the final ``hook_resid_post`` (``n_layers + 1`` rows), float32 on CPU.

    Runs under whatever interventions are active on ``model`` (enter them first).
    """
    n_layers = model.cfg.n_layers
    rows: dict[int, Tensor] = {}

    def grab(index: int):
        def hook(resid: Tensor, hook) -> None:
            rows[index] = resid[:, 0].detach().float().cpu()

        return hook

    hooks = [(resid_pre_name(layer), grab(layer)) for layer in range(n_layers)]
    hooks.append((act_name("resid_post", n_layers - 1), grab(n_layers)))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(tokens.to(model.cfg.device), return_type=None)
    return torch.stack([rows[k] for k in range(n_layers + 1)])


def token_trajectory(model: HookedTransformer, token_id: int) -> Float[Tensor, "layer_plus_1 d_model"]:
    """Position-0 trajectory of ``token_id`` from a one-token forward pass.

    With a single position there is nothing else to attend to, so the result is the
    same under the causal and the bidirectional mask; it equals position 0 of any
    causal run starting with ``token_id`` up to float rounding of different shapes.
    """
    if not 0 <= int(token_id) < model.cfg.d_vocab:
        raise ValueError(
            f"token_id={token_id} is outside the vocabulary 0..{model.cfg.d_vocab - 1}. "
            "Fix: pass a valid token id."
        )
    tokens = torch.tensor([[int(token_id)]], device=model.cfg.device)
    return record_position_zero(model, tokens)[:, 0]


@contextlib.contextmanager
def patch_position_zero(
    model: HookedTransformer,
    source: Float[Tensor, "layer ... d_model"],
    layers: LayerSpec = None,
) -> Iterator[HookedTransformer]:
    """Overwrite position 0 of ``blocks.{l}.hook_resid_pre`` with ``source[l]``.

    Args:
        source: ``[n_layers (+1), d_model]`` (one trajectory for every prompt, e.g. from
            :func:`token_trajectory`) or ``[n_layers (+1), batch, d_model]`` (one per
            prompt, e.g. from :func:`record_position_zero`; the batch must then match).
        layers: layers whose input is patched: an int, ``"L3"``, a list of them, or None
            (all layers: "replace all").

    Patching layer ``l`` changes the keys, values and query at position 0 of layer ``l``
    and everything downstream of them; positions ``>= 1`` are untouched at layer ``l``'s
    input.

    The patch is a set of permanent TransformerLens hooks for the duration of the
    context (``model.reset_hooks()`` inside it leaves them; see
    :mod:`rope_leak.interventions.hooks`).
    """
    chosen = normalize_layers(layers, model)
    if source.ndim not in (2, 3) or source.shape[0] < model.cfg.n_layers or (
        source.shape[-1] != model.cfg.d_model
    ):
        raise ValueError(
            f"source has shape {tuple(source.shape)}; expected [n_layers(+1)={model.cfg.n_layers}, "
            f"(batch,) d_model={model.cfg.d_model}]. Fix: pass the output of record_position_zero "
            "or token_trajectory for this model."
        )

    def hook_for(layer: int):
        def hook(resid: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
            value = source[layer].to(device=resid.device, dtype=resid.dtype)
            if value.ndim == 2 and value.shape[0] != resid.shape[0]:
                raise ValueError(
                    f"source holds {value.shape[0]} prompts but the batch has {resid.shape[0]}. "
                    "Fix: record the source on the same batch, or pass one trajectory [layer, d_model]."
                )
            resid = resid.clone()
            resid[:, 0] = value
            return resid

        return hook

    with intervention_hooks(model, [(resid_pre_name(layer), hook_for(layer)) for layer in chosen]):
        yield model


@contextlib.contextmanager
def replace_all_position_zero(
    model: HookedTransformer, token_id: int, layers: LayerSpec = None
) -> Iterator[HookedTransformer]:
    """"Replace all": pin position 0's residual stream at the input of every layer to the
    causal trajectory of ``token_id`` (:func:`token_trajectory`).

    Under the causal mask this equals replacing the token at position 0 (up to float
    rounding); under the bidirectional ablation it differs: position 0 can no longer
    absorb information from later positions, so every position-0-derived input of every
    layer (key 0, value 0, and position 0's own stream) is the replacement token's, at
    once. Enter this before other hook-installing contexts (the trajectory is computed
    on entry with whatever hooks are active).
    """
    trajectory = token_trajectory(model, token_id)
    with patch_position_zero(model, trajectory, layers):
        yield model
