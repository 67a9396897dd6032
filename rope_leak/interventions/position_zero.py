"""Replace what enters the model at position 0 (the BOS token's embedding).

Position 0 only ever attends to itself under the causal mask, so its residual stream
is a closed system driven by this one embedding. Replacing it before the forward pass
tests how much of the residual-stream position signal it supplies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rope_leak.interventions.hooks import act_name, intervention_hooks

REPLACEMENTS = ("token", "mean", "zeros", "noise")


def _embed_rows(model: HookedTransformer, token_ids: Tensor) -> Float[Tensor, "n d_model"]:
    """What ``hook_embed`` receives for these tokens (includes any embedding scale)."""
    with torch.no_grad():
        return model.embed(token_ids[None, :])[0]


def mean_embedding(model: HookedTransformer, chunk: int = 8192) -> Float[Tensor, " d_model"]:
    total = None
    with torch.no_grad():
        for start in range(0, model.cfg.d_vocab, chunk):
            ids = torch.arange(start, min(start + chunk, model.cfg.d_vocab), device=model.cfg.device)
            part = _embed_rows(model, ids).double().sum(0)
            total = part if total is None else total + part
    return (total / model.cfg.d_vocab).to(model.cfg.dtype)


@contextlib.contextmanager
def replace_position_zero(
    model: HookedTransformer,
    replacement: str = "mean",
    *,
    token_id: int | None = None,
    norm_matched: bool = False,
    seed: int = 0,
) -> Iterator[HookedTransformer]:
    """Replace the embedding at position 0 before the forward pass.

    Args:
        replacement: ``"token"`` (embedding of ``token_id``), ``"mean"`` (mean token
            embedding), ``"zeros"``, or ``"noise"`` (Gaussian, rescaled to the norm of
            the embedding it replaces).
        norm_matched: rescale ``"token"``/``"mean"`` replacements to the norm of the
            original position-0 embedding, so only the direction changes.
        seed: seed of the ``"noise"`` replacement (the same vector for every prompt).

    The replacement is a permanent TransformerLens hook on ``hook_embed`` for the duration
    of the context: ``model.reset_hooks()`` inside it leaves the replacement in place, and
    ``model.list_hooks()`` shows it (see :mod:`rope_leak.interventions.hooks`). On exit
    (also on error) exactly that hook is removed.
    """
    if replacement not in REPLACEMENTS:
        raise ValueError(f"replacement={replacement!r} is not one of {REPLACEMENTS}.")
    if replacement == "token":
        if token_id is None or not 0 <= int(token_id) < model.cfg.d_vocab:
            raise ValueError(
                f"replacement='token' needs token_id in 0..{model.cfg.d_vocab - 1}, got {token_id!r}."
            )
    d_model = model.cfg.d_model
    device = model.cfg.device
    if replacement == "token":
        vector = _embed_rows(model, torch.tensor([int(token_id)], device=device))[0]
    elif replacement == "mean":
        vector = mean_embedding(model)
    elif replacement == "zeros":
        vector = torch.zeros(d_model, dtype=model.cfg.dtype, device=device)
    else:
        generator = torch.Generator().manual_seed(seed)
        vector = torch.randn(d_model, generator=generator, dtype=torch.float32).to(device)
    rescale = replacement == "noise" or norm_matched

    def hook(embed: Float[Tensor, "batch pos d_model"], hook) -> Float[Tensor, "batch pos d_model"]:
        new = vector.to(embed.dtype).expand(embed.shape[0], d_model)
        if rescale:
            original_norm = embed[:, 0].norm(dim=-1, keepdim=True)
            new = new / new.norm(dim=-1, keepdim=True).clamp_min(1e-12) * original_norm
        embed = embed.clone()
        embed[:, 0] = new
        return embed

    with intervention_hooks(model, [(act_name("embed"), hook)]):
        yield model
