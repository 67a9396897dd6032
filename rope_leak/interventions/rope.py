"""RoPE controls: change the rotary embedding of every attention module, then restore it.

TransformerLens 3.9 rotates queries and keys with two buffers per attention module,
``rotary_sin`` / ``rotary_cos`` (``[rows, rotary_dim]``, row ``p`` = position ``p``),
built by ``calculate_sin_cos_rotary`` with the module's own base (``_rotary_base()``:
``cfg.rotary_base_local`` for local layers of Gemma-style models, ``cfg.rotary_base``
otherwise). The tables start at ``min(n_ctx, ROTARY_INITIAL_CACHE_SIZE)`` rows and
TransformerLens *replaces* them by longer ones (recomputed from the config) when a
longer sequence arrives, which would silently undo an intervention. Every context
manager here therefore installs tables of ``cfg.n_ctx`` rows, the longest sequence the
model accepts, so no extension happens inside the context; on exit (also on error) the
original tensor objects are put back, so the model is restored bit-exactly.

- :func:`identity_rope` — no rotation (``sin = 0``, ``cos = 1``).
- :func:`scrambled_rope` — a fixed permutation of position ids (rows permuted).
- :func:`rope_base` — another base (global and local bases separately).
- :func:`rope_scaling` — linear or NTK-by-parts (Llama-3.1 style) scaling at inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from rope_leak.backends.bridge import is_bridge
from rope_leak.backends.requirements import require_rope

SCALING_KINDS = ("linear", "ntk_by_parts")
APPLY_TO = ("global", "all")

Tables = tuple[Float[Tensor, "rows rotary_dim"], Float[Tensor, "rows rotary_dim"]]


def rotary_modules(model: HookedTransformer) -> list:
    """The attention modules of ``model`` that carry rotary tables, in layer order."""
    if is_bridge(model):
        raise ValueError(
            "RoPE controls act on HookedTransformer rotary tables; a TransformerBridge takes "
            "cos/sin from the Hugging Face rotary_emb module. Fix: convert the model with "
            "rope_leak.backends.hooked_from_hf."
        )
    require_rope(model, "RoPE controls")
    attns = [block.attn for block in model.blocks if hasattr(block.attn, "rotary_sin")]
    if not attns:
        raise ValueError("the model has no attention module with rotary tables.")
    return attns


def is_local(attn) -> bool:
    return getattr(attn, "attn_type", "global") == "local"


def _tables(attn, n_rows: int, base: float | None = None) -> Tables:
    """TransformerLens' own tables for ``attn`` (its base unless ``base`` is given)."""
    base = attn._rotary_base() if base is None else base
    sin, cos = attn.calculate_sin_cos_rotary(
        attn.cfg.rotary_dim, n_rows, base=base, dtype=attn.cfg.dtype
    )
    device = attn.rotary_sin.device
    return sin.to(device), cos.to(device)


@contextlib.contextmanager
def _replace_tables(
    model: HookedTransformer, make: Callable[[object, int], Tables | None]
) -> Iterator[HookedTransformer]:
    """Install ``make(attn, n_ctx)`` (``None``: keep that module's table, but at full
    length) in every rotary module; restore the original tensors on exit."""
    attns = rotary_modules(model)
    n_rows = int(model.cfg.n_ctx)
    saved = [(attn.rotary_sin, attn.rotary_cos, attn._ntk_alpha_cached) for attn in attns]
    if model.cfg.use_dynamic_ntk_rope:
        raise ValueError(
            "the model uses dynamic NTK RoPE (Qwen-1), which rebuilds its tables during "
            "the forward pass and would overwrite a RoPE control."
        )
    try:
        for attn in attns:
            tables = make(attn, n_rows)
            if tables is None:
                tables = _tables(attn, n_rows)
            sin, cos = tables
            if sin.shape != (n_rows, attn.cfg.rotary_dim) or cos.shape != sin.shape:
                raise RuntimeError(f"rotary table of shape {tuple(sin.shape)}, expected "
                                   f"{(n_rows, attn.cfg.rotary_dim)}.")
            attn.rotary_sin = sin.to(attn.rotary_sin.dtype)
            attn.rotary_cos = cos.to(attn.rotary_cos.dtype)
        yield model
    finally:
        for attn, (sin, cos, alpha) in zip(attns, saved):
            attn.rotary_sin = sin
            attn.rotary_cos = cos
            attn._ntk_alpha_cached = alpha


@contextlib.contextmanager
def identity_rope(model: HookedTransformer) -> Iterator[HookedTransformer]:
    """No rotation: ``q . k`` becomes the unrotated dot product (position-free logits)."""

    def make(attn, n_rows: int) -> Tables:
        sin, cos = _tables(attn, n_rows)
        return torch.zeros_like(sin), torch.ones_like(cos)

    with _replace_tables(model, make):
        yield model


def permutation(n_positions: int, seed: int, fix_first: bool = False) -> Tensor:
    """The position permutation used by :func:`scrambled_rope` (a deterministic function
    of ``seed``; the global RNG is untouched)."""
    generator = torch.Generator().manual_seed(int(seed))
    if fix_first:
        return torch.cat([torch.zeros(1, dtype=torch.long),
                          1 + torch.randperm(n_positions - 1, generator=generator)])
    return torch.randperm(n_positions, generator=generator)


@contextlib.contextmanager
def scrambled_rope(
    model: HookedTransformer,
    seed: int = 0,
    n_positions: int | None = None,
    fix_first: bool = False,
) -> Iterator[HookedTransformer]:
    """Rotate position ``p`` as if it were position ``perm[p]``.

    Args:
        seed: fixes the permutation (:func:`permutation`).
        n_positions: permute positions ``0..n_positions-1`` among themselves (default:
            the whole context ``cfg.n_ctx``). Pass the prompt length to keep every
            rotation within the positions the prompts actually use.
        fix_first: keep position 0 in place (permute the others only).

    The same permutation applies to every layer (local and global tables alike).
    """
    n_ctx = int(model.cfg.n_ctx)
    n_positions = n_ctx if n_positions is None else int(n_positions)
    if not 2 <= n_positions <= n_ctx:
        raise ValueError(f"n_positions must lie in 2..{n_ctx}, got {n_positions}.")
    perm = permutation(n_positions, seed, fix_first)
    rows = torch.cat([perm, torch.arange(n_positions, n_ctx)])

    def make(attn, n_rows: int) -> Tables:
        sin, cos = _tables(attn, n_rows)
        index = rows.to(sin.device)
        return sin[index], cos[index]

    with _replace_tables(model, make):
        yield model


@contextlib.contextmanager
def rope_base(
    model: HookedTransformer, base: float, local_base: float | None = None
) -> Iterator[HookedTransformer]:
    """Rebuild the tables with another base (TransformerLens' own formula).

    ``base`` replaces the global base (``cfg.rotary_base``; every layer of a model with a
    single base). ``local_base`` replaces the base of local (sliding-window) layers of
    models with two bases (Gemma 2/3: ``cfg.rotary_base_local``); ``None`` keeps it, except
    for a model with a single base, where local layers take ``base`` too.
    """
    if base <= 1 or (local_base is not None and local_base <= 1):
        raise ValueError(f"RoPE bases must exceed 1, got base={base}, local_base={local_base}.")
    two_bases = model.cfg.rotary_base_local is not None

    def make(attn, n_rows: int) -> Tables | None:
        if is_local(attn) and two_bases:
            return None if local_base is None else _tables(attn, n_rows, base=local_base)
        return _tables(attn, n_rows, base=base)

    with _replace_tables(model, make):
        yield model


@contextlib.contextmanager
def _patched_cfg(cfg, **fields) -> Iterator[None]:
    old = {name: getattr(cfg, name) for name in fields}
    try:
        for name, value in fields.items():
            setattr(cfg, name, value)
        yield
    finally:
        for name, value in old.items():
            setattr(cfg, name, value)


@contextlib.contextmanager
def rope_scaling(
    model: HookedTransformer,
    kind: str = "ntk_by_parts",
    factor: float = 4.0,
    *,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_ctx_len: int | None = None,
    apply_to: str = "global",
) -> Iterator[HookedTransformer]:
    """RoPE scaling applied at inference, as a long-context extension would.

    Args:
        kind: ``"linear"`` (position interpolation: every frequency divided by ``factor``;
            TransformerLens' ``rotary_scaling_factor`` path) or ``"ntk_by_parts"`` (Llama-3.1:
            wavelengths above ``original_ctx_len / low_freq_factor`` are divided by
            ``factor``, those below ``original_ctx_len / high_freq_factor`` kept, smooth in
            between; TransformerLens' ``use_NTK_by_parts_rope`` path, the same formula as
            ``transformers``' ``llama3`` rope type).
        factor: scaling factor (> 0; 1 changes nothing).
        original_ctx_len: the "pre-extension" context of NTK-by-parts (default:
            ``cfg.n_ctx``, i.e. 2048 for zoo models as :func:`load_model` caps them).
        apply_to: ``"global"`` scales global layers only and leaves local (sliding-window)
            layers alone, as Gemma 3 and ``transformers`` do; ``"all"`` scales every layer.

    The tables are computed by TransformerLens' ``calculate_sin_cos_rotary`` under a
    temporarily patched config (restored before the forward pass runs).
    """
    if kind not in SCALING_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {SCALING_KINDS}.")
    if apply_to not in APPLY_TO:
        raise ValueError(f"apply_to={apply_to!r} is not one of {APPLY_TO}.")
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}.")
    if kind == "ntk_by_parts" and not high_freq_factor > low_freq_factor > 0:
        raise ValueError("NTK-by-parts needs high_freq_factor > low_freq_factor > 0.")
    cfg = model.cfg
    if kind == "linear":
        fields = dict(use_NTK_by_parts_rope=False, use_yarn_rope=False,
                      rotary_scaling_factor=float(factor))
    else:
        fields = dict(
            use_NTK_by_parts_rope=True,
            NTK_by_parts_factor=float(factor),
            NTK_by_parts_low_freq_factor=float(low_freq_factor),
            NTK_by_parts_high_freq_factor=float(high_freq_factor),
            NTK_original_ctx_len=int(original_ctx_len or cfg.n_ctx),
        )

    def make(attn, n_rows: int) -> Tables | None:
        if is_local(attn) and apply_to == "global":
            return None
        with _patched_cfg(cfg, **fields):
            if kind == "linear":
                return _linear_tables(attn, n_rows)
            return _tables(attn, n_rows)

    with _replace_tables(model, make):
        yield model


def _linear_tables(attn, n_rows: int) -> Tables:
    """Linear scaling: the table at position ``p`` is the original one at ``p / factor``.

    TransformerLens' ``rotary_scaling_factor`` multiplies the wavelengths by ``factor``
    but only for non-local modules; to scale local ones too (``apply_to="all"``) the
    module is computed as if it were global.
    """
    old_type = attn.attn_type
    base = attn._rotary_base()  # the module's own base (local or global)
    try:
        attn.attn_type = "global"
        return _tables(attn, n_rows, base=base)
    finally:
        attn.attn_type = old_type
