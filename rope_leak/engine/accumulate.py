"""Turn one layer's attention scores into sufficient statistics, in place, on device.

Called from a ``hook_attn_scores`` hook: the batch's patterns are reduced to sums by
offset / query / key (``X^T y``), sums of squares and per-fold cell sums, and then
dropped. All three targets come from the scores (``log A = s - logsumexp(s)``) in
float32, whatever the model's dtype, and accumulate in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from rope_leak.engine.pairs import PairDesign
from rope_leak.engine.statistics import TARGETS, CellStatistics


class NonFiniteAttentionError(FloatingPointError):
    """NaN or inf in the attention scores (e.g. float16 overflow)."""


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


class LayerAccumulator:
    """Accumulates the statistics of every target for one condition, layer by layer."""

    def __init__(
        self,
        design: PairDesign,
        n_layers: int,
        n_heads: int,
        n_buckets: int,
        targets: tuple[str, ...],
        device: torch.device | str = "cpu",
    ) -> None:
        unknown = set(targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown targets {sorted(unknown)}; choose from {TARGETS}.")
        self.design, self.targets = design, tuple(targets)
        self.n_layers, self.n_heads, self.n_buckets = n_layers, n_heads, n_buckets
        n = design.n_tokens
        as_long = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long, device=device)  # noqa: E731
        self.mask = torch.as_tensor(design.cell_mask, device=device)
        self.mask_f = self.mask.float()
        self.offsets, self.queries, self.keys = (
            as_long(design.offsets), as_long(design.queries), as_long(design.keys)
        )
        self.flat_index = as_long(design.flat_index)
        self.cell_query = as_long(design.cells[0])
        rows = torch.arange(n, device=device)
        # offset_of[i, d] = 1 where (i, i - d) is a scored cell: -log Z_i's diagonal sums.
        j = rows[:, None] - rows[None, :]
        self.row_offset_mask = torch.zeros(n, n, device=device)
        valid = j >= 0
        self.row_offset_mask[valid] = self.mask_f[rows[:, None].expand(n, n)[valid], j[valid]]
        self.row_count = self.mask_f.sum(-1)
        shape = (n_buckets, n_layers, n_heads)
        f64 = dict(dtype=torch.float64, device=device)
        self.xty = {t: torch.zeros(shape + (design.n_columns,), **f64) for t in targets}
        self.sumsq = {t: torch.zeros(shape, **f64) for t in targets}
        self.cell_sum = {t: torch.zeros((2, n_layers, n_heads, design.n_cells), **f64) for t in targets}
        self.sink_sum = torch.zeros(shape, **f64)
        self.count = torch.zeros(n_buckets, dtype=torch.long, device=device)

    def add_prompts(self, prompt_ids: Int[Tensor, " batch"]) -> None:
        buckets = prompt_ids % self.n_buckets
        self.count.index_add_(0, buckets.to(self.count.device), torch.ones_like(buckets))

    def _scatter(self, store: Tensor, layer: int, values: Tensor, index: Tensor) -> None:
        """``store[index[b], layer] += values[b]``, summing over the batch in float64."""
        store[:, layer].index_add_(0, index, values.double())

    def add_layer(
        self, layer: int, scores: Float[Tensor, "batch head q k"], prompt_ids: Int[Tensor, " batch"]
    ) -> None:
        scores = scores.float()
        log_z = torch.logsumexp(scores, dim=-1)  # [batch, head, q]
        if not torch.isfinite(log_z).all():
            bad = (~torch.isfinite(log_z)).nonzero()[0].tolist()
            raise NonFiniteAttentionError(
                f"NaN or inf attention scores in layer {layer}, head {bad[1]} (query {bad[2]}, "
                f"prompt {int(prompt_ids[bad[0]])}). Often float16 overflow. Fix: run in "
                "float32 or bfloat16 (--dtype float32)."
            )
        device = self.count.device
        buckets = (prompt_ids % self.n_buckets).to(device)
        folds = (prompt_ids % 2).to(device)
        log_pattern = None
        if "log_pattern" in self.targets or "pattern" in self.targets:
            log_pattern = scores - log_z[..., None]
        if "pattern" in self.targets:
            pattern = log_pattern.exp()
            self._add_dense("pattern", layer, pattern, buckets, folds)
            sink = pattern[:, :, 1:, 0].mean(-1)  # mean over queries i >= 1 of A[i, 0]
        else:
            sink = torch.softmax(scores, -1)[:, :, 1:, 0].mean(-1)
        self._scatter(self.sink_sum, layer, sink, buckets)
        if "log_pattern" in self.targets:
            self._add_dense("log_pattern", layer, log_pattern, buckets, folds)
        if "scores" in self.targets:
            self._add_dense("scores", layer, scores, buckets, folds)
        if "neg_log_z" in self.targets:
            self._add_row_constant("neg_log_z", layer, -log_z, buckets, folds)

    def _add_dense(
        self, target: str, layer: int, y: Float[Tensor, "batch head q k"],
        buckets: Tensor, folds: Tensor,
    ) -> None:
        y = torch.where(self.mask, y, 0.0)  # masked (-inf) keys never enter a sum
        parts = (
            diagonal_sums(y)[..., self.offsets],
            y.sum(-1)[..., self.queries],
            y.sum(-2)[..., self.keys],
        )
        self._scatter(self.xty[target], layer, torch.cat(parts, -1), buckets)
        self._scatter(self.sumsq[target], layer, (y * y).sum((-1, -2)), buckets)
        cells = y.flatten(-2)[..., self.flat_index]
        self._scatter(self.cell_sum[target], layer, cells, folds)

    def _add_row_constant(
        self, target: str, layer: int, z: Float[Tensor, "batch head q"],
        buckets: Tensor, folds: Tensor,
    ) -> None:
        """A response constant along each query row (``y[i, j] = z[i]``), without ``n x n``."""
        parts = (
            (z @ self.row_offset_mask)[..., self.offsets],
            (z * self.row_count)[..., self.queries],
            (z @ self.mask_f)[..., self.keys],
        )
        self._scatter(self.xty[target], layer, torch.cat(parts, -1), buckets)
        self._scatter(self.sumsq[target], layer, (z * z * self.row_count).sum(-1), buckets)
        self._scatter(self.cell_sum[target], layer, z[..., self.cell_query], folds)

    def to_statistics(self) -> dict[str, CellStatistics]:
        count = self.count.cpu().numpy()
        return {
            t: CellStatistics(
                self.design, self.n_layers, self.n_heads, self.n_buckets,
                xty=self.xty[t].cpu().numpy(), sumsq=self.sumsq[t].cpu().numpy(),
                count=count.copy(), cell_sum=self.cell_sum[t].cpu().numpy(),
            )
            for t in self.targets
        }
