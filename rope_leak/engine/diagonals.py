"""Sums of a ``[..., n, n]`` matrix along its sub-diagonals ``i - j = d`` (by offset)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def diagonal_sums(y: Float[Tensor, "... n n"]) -> Float[Tensor, "... n"]:
    """``out[..., d] = sum_j y[..., j + d, j]``: sums along the sub-diagonals ``i - j = d``.

    A strided view over a zero-padded copy: element ``(j + d, j)`` sits at flat index
    ``d * n + j * (n + 1)``; indices past ``n * n`` land in the zero padding.
    """
    n = y.shape[-1]
    lead = y.shape[:-2]
    flat = y.reshape(-1, n * n)
    padded = torch.nn.functional.pad(flat, (0, n * n))
    view = padded.as_strided((flat.shape[0], n, n), (2 * n * n, n, n + 1))
    return view.sum(-1).reshape(*lead, n)


def lower_diagonal_sums(y: Float[Tensor, "... n n"]) -> Float[Tensor, "... n"]:
    """:func:`diagonal_sums` for a contiguous ``y`` that is zero above the diagonal.

    Row ``i`` of the view ``V[i, k] = flat[i * (n + 1) + k - (n - 1)]`` holds
    ``y[i, i - d]`` at ``k = n - 1 - d`` for ``d <= i``, and entries of the upper
    triangle (zero) of row ``i - 1`` for ``d > i``. So the column sums of ``V`` over
    rows ``1..n-1`` (a reduction with a contiguous inner dimension, no padded copy) are
    the diagonal sums, up to ``y[0, 0]`` on ``d = 0``.
    """
    n = y.shape[-1]
    lead = y.shape[:-2]
    flat = y.reshape(-1, n, n)
    if n == 1:
        return flat[:, 0, :].reshape(*lead, 1).clone()
    view = flat.as_strided((flat.shape[0], n - 1, n), (n * n, n + 1, 1), flat.storage_offset() + 2)
    out = view.sum(-2).flip(-1)
    out[:, 0] += flat[:, 0, 0]
    return out.reshape(*lead, n)
