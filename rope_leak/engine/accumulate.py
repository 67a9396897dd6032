"""Turn one layer's attention scores into sufficient statistics, in place, on device.

Called from a ``hook_attn_scores`` hook: the batch's patterns are reduced to sums by
offset / query / key (``X^T y``), sums of squares and per-fold cell sums, and then
dropped. All three targets come from the scores (``log A = s - logsumexp(s)``) in
float32, whatever the model's dtype, and accumulate in float64.

Two implementations give the same statistics (to float32 rounding of the per-element
values; tests compare both with a float64 reference):

* on CPU, the fused C kernel of :mod:`rope_leak.engine.kernel` reads each score row
  once and updates every sum of every target in that pass (parallel over row ranges);
* elsewhere (GPU, or no C compiler), a pure-torch path: one masked tensor per target,
  diagonal sums through a contiguous skewed view (no padded copy), fold sums over the
  batch before the float64 scatter.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from rope_leak.engine.kernel import load_kernel, thread_pool
from rope_leak.engine.pairs import PairDesign
from rope_leak.engine.statistics import TARGETS, CellStatistics

DENSE_TARGETS = ("pattern", "log_pattern", "scores")
"""Targets with a value per cell, in the kernel's order."""


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
        # The scored cells are rows qlo <= i < qhi, keys jlo <= j <= i (PairDesign.cells).
        spec = design.spec
        self._rows = (max(spec.min_query, 0), n if spec.max_query is None else min(n, spec.max_query),
                      0 if spec.include_sink else 1)
        cell_rows = np.asarray(design.cells[0])
        self._row_start = torch.as_tensor(np.searchsorted(cell_rows, np.arange(n)), dtype=torch.long)
        self._tasks: list[tuple[int, int]] | None = None
        self._buffers: dict = {}
        self.use_kernel = True  # set False to force the pure-torch path

    def _row_ranges(self, n: int, workers: int) -> list[tuple[int, int]]:
        """Contiguous query-row ranges of about equal work (logsumexp + scored cells)."""
        qlo, qhi, jlo = self._rows
        i = np.arange(n)
        scored = np.where((i >= qlo) & (i < qhi), np.clip(i - jlo + 1, 0, None), 0)
        cost = np.cumsum(n + 4.0 * scored)
        parts = max(1, min(n, 2 * workers))
        bounds = np.searchsorted(cost, cost[-1] * np.arange(1, parts) / parts)
        edges = np.unique(np.concatenate([[0], bounds, [n]]))
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]

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
        # The kernel assumes every scored row is the contiguous key range [jlo, i]; a
        # window (max_offset) breaks that, so those runs take the torch path.
        contiguous_rows = self.design.spec.max_offset is None
        kernel = (load_kernel() if self.use_kernel and contiguous_rows and scores.device.type == "cpu"
                  else None)
        if kernel is not None and self.count.device.type == "cpu":
            self._add_layer_kernel(kernel, layer, scores, prompt_ids)
        else:
            self._add_layer_torch(layer, scores, prompt_ids)

    @staticmethod
    def _non_finite(layer: int, bad: list[int], prompt_ids: Tensor) -> NonFiniteAttentionError:
        return NonFiniteAttentionError(
            f"NaN or inf attention scores in layer {layer}, head {bad[1]} (query {bad[2]}, "
            f"prompt {int(prompt_ids[bad[0]])}). Often float16 overflow. Fix: run in "
            "float32 or bfloat16 (--dtype float32)."
        )

    def _add_layer_kernel(self, kernel, layer: int, scores: Tensor, prompt_ids: Tensor) -> None:
        scores = scores.contiguous()
        B, H, n, _ = scores.shape
        workers = max(1, torch.get_num_threads())
        if self._tasks is None or self._tasks[-1][1] != n:
            self._tasks, self._buffers = self._row_ranges(n, workers), {}
        f64 = dict(dtype=torch.float64)
        row = torch.zeros(B, H, 3, n, **f64)
        log_z = torch.empty(B, H, n, dtype=torch.float32)
        folds = (prompt_ids.cpu() % 2).long().contiguous()
        qlo, qhi, jlo = self._rows
        cells = [self.cell_sum[t].data_ptr() if t in self.cell_sum else None for t in DENSE_TARGETS]
        n_cells = self.design.n_cells

        key = (B, H, n)
        if key not in self._buffers:  # reused: fresh large allocations cost page faults
            self._buffers = {key: [
                (torch.empty(B, H, 3, n, **f64), torch.empty(B, H, 3, n, **f64),
                 torch.empty(B, H, 3, **f64), torch.empty(B, H, **f64), torch.zeros(3, dtype=torch.long))
                for _ in self._tasks
            ]}
        buffers = self._buffers[key]

        def task(index: int):
            rows = self._tasks[index]
            diag, col, sumsq, sink, bad = buffers[index]
            for buffer in (diag, col, sumsq, sink):
                buffer.zero_()
            rc = kernel(scores.data_ptr(), B, H, n, rows[0], rows[1], qlo, qhi, jlo,
                        folds.data_ptr(), diag.data_ptr(), col.data_ptr(), sumsq.data_ptr(),
                        sink.data_ptr(), row.data_ptr(), log_z.data_ptr(), *cells,
                        layer, self.n_layers, n_cells, self._row_start.data_ptr(), bad.data_ptr())
            return rc, bad, diag, col, sumsq, sink

        if len(self._tasks) == 1:
            results = [task(0)]
        else:
            results = list(thread_pool(workers).map(task, range(len(self._tasks))))
        for rc, bad, *_ in results:
            if rc:
                raise self._non_finite(layer, bad.tolist(), prompt_ids)
        diag, col, sumsq, sink = (
            torch.stack([r[k] for r in results]).sum(0) if len(results) > 1 else results[0][k]
            for k in range(2, 6)
        )
        buckets = (prompt_ids % self.n_buckets).cpu()
        for k, target in enumerate(DENSE_TARGETS):
            if target not in self.xty:
                continue
            parts = (diag[:, :, k, self.offsets], row[:, :, k, self.queries], col[:, :, k, self.keys])
            self._scatter(self.xty[target], layer, torch.cat(parts, -1), buckets)
            self._scatter(self.sumsq[target], layer, sumsq[:, :, k], buckets)
        self._scatter(self.sink_sum, layer, sink, buckets)
        if "neg_log_z" in self.targets:
            self._add_row_constant("neg_log_z", layer, -log_z, buckets, folds)

    def _add_layer_torch(self, layer: int, scores: Tensor, prompt_ids: Tensor) -> None:
        log_z = torch.logsumexp(scores, dim=-1)  # [batch, head, q]
        if not torch.isfinite(log_z).all():
            bad = (~torch.isfinite(log_z)).nonzero()[0].tolist()
            raise self._non_finite(layer, bad, prompt_ids)
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
            lower_diagonal_sums(y)[..., self.offsets],  # cells lie on or below the diagonal
            y.sum(-1)[..., self.queries],
            y.sum(-2)[..., self.keys],
        )
        self._scatter(self.xty[target], layer, torch.cat(parts, -1), buckets)
        flat = y.flatten(-2)
        self._scatter(self.sumsq[target], layer, torch.linalg.vecdot(flat, flat), buckets)
        # Per-prompt values enter float64 before any sum over prompts, so the statistics
        # do not depend on how prompts are batched or sharded.
        self._scatter(self.cell_sum[target], layer, flat[..., self.flat_index], folds)

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
        onehot = torch.nn.functional.one_hot(folds.long(), 2).T.double()  # [2, batch]
        fold_z = torch.einsum("fb,bhq->fhq", onehot, z.double())  # float64 sum per fold
        self.cell_sum[target][:, layer] += fold_z[..., self.cell_query]

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
