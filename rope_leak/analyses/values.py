"""Value vectors per query head: grouped-query models keep fewer value heads than query
heads, and each value head serves a run of consecutive query heads."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor


def values_per_query_head(
    v: Float[Tensor, "batch pos kv_head d_head"], n_heads: int
) -> Float[Tensor, "batch pos head d_head"]:
    """Repeat each value head for the query heads it serves (a no-op without GQA)."""
    if v.shape[2] == n_heads:
        return v
    if n_heads % v.shape[2]:
        raise ValueError(f"{n_heads} query heads cannot share {v.shape[2]} value heads evenly.")
    return v.repeat_interleave(n_heads // v.shape[2], dim=2)
