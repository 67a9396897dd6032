"""Turn one layer's attention scores into sufficient statistics, in place, on device.

Called from a ``hook_attn_scores`` hook: the batch's patterns are reduced to sums by
offset / query / key (``X^T y``), sums of squares and per-fold cell sums, and then
dropped. Only ``pattern`` and ``scores`` are summed cell by cell (in float32 values,
float64 sums, whatever the model's dtype). ``neg_log_z = -log Z_i`` is constant along
each query row, and ``log_pattern = scores - log Z_i``, so both come from per-row sums:
per prompt and row, ``-log Z_i`` enters per-bucket row sums, and ``log_pattern``'s sum
of squares is ``sum s^2 + 2 sum_i z_i (sum_j s_ij) + sum_i n_i z_i^2``. Their ``X^T y``
and cell sums are derived in :meth:`LayerAccumulator.to_statistics` (exact algebra,
no cell loop), which is a third of the per-cell work and half the memory.

Two implementations give the same statistics (to float32 rounding of the per-element
values; tests compare both with a float64 reference):

* on CPU, the fused C kernel of :mod:`rope_leak.engine.kernel` reads each score row
  once and updates every sum of every dense target in that pass (parallel over row
  ranges);
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
from rope_leak.engine.statistics import TARGETS, CellStatistics, required_targets

DENSE_TARGETS = ("pattern", "scores")
"""Targets summed cell by cell, in the kernel's order (bit ``k`` of its ``want``)."""
ROW_TARGETS = ("log_pattern", "neg_log_z")
"""Targets derived from the scores' sums and per-row sums of ``-log Z_i``."""


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
        self.design, self.targets = design, required_targets(targets)
        self.dense = tuple(t for t in DENSE_TARGETS if t in self.targets)
        self.n_layers, self.n_heads, self.n_buckets = n_layers, n_heads, n_buckets
        n = design.n_tokens
        as_long = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long, device=device)  # noqa: E731
        self.mask = torch.as_tensor(design.cell_mask, device=device)
        self.mask_f = self.mask.float()
        self.offsets, self.queries, self.keys = (
            as_long(design.offsets), as_long(design.queries), as_long(design.keys)
        )
        self.flat_index = as_long(design.flat_index)
        rows = torch.arange(n, device=device)
        # row_offset_mask[i, d] = 1 where (i, i - d) is a scored cell: a row constant's
        # diagonal sums.
        j = rows[:, None] - rows[None, :]
        self.row_offset_mask = torch.zeros(n, n, device=device)
        valid = j >= 0
        self.row_offset_mask[valid] = self.mask_f[rows[:, None].expand(n, n)[valid], j[valid]]
        self.row_count = self.mask_f.sum(-1).double()  # scored cells per query row
        shape = (n_buckets, n_layers, n_heads)
        f64 = dict(dtype=torch.float64, device=device)
        self.xty = {t: torch.zeros(shape + (design.n_columns,), **f64) for t in self.dense}
        self.sumsq = {t: torch.zeros(shape, **f64) for t in self.targets}
        self.cell_sum = {t: torch.zeros((2, n_layers, n_heads, design.n_cells), **f64) for t in self.dense}
        # sum over a bucket's prompts of -log Z_i on scored rows (0 elsewhere)
        self.row_sum = torch.zeros(shape + (n,), **f64) if set(ROW_TARGETS) & set(self.targets) else None
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
        folds = (prompt_ids.cpu() % 2).long().contiguous()
        qlo, qhi, jlo = self._rows
        want = sum(1 << k for k, t in enumerate(DENSE_TARGETS) if t in self.dense)
        cells = [self.cell_sum[t].data_ptr() if t in self.cell_sum else None for t in DENSE_TARGETS]
        n_cells = self.design.n_cells

        key = (B, H, n)
        if key not in self._buffers:  # reused: fresh large allocations cost page faults
            self._buffers = {key: (
                torch.empty(B, H, 2, n, **f64), torch.empty(B, H, n, dtype=torch.float32),
                [(torch.empty(B, H, 2, n, **f64), torch.empty(B, H, 2, n, **f64),
                  torch.empty(B, H, 2, **f64), torch.empty(B, H, **f64), torch.zeros(3, dtype=torch.long))
                 for _ in self._tasks],
            )}
        row, log_z, buffers = self._buffers[key]
        row.zero_()

        def task(index: int):
            rows = self._tasks[index]
            diag, col, sumsq, sink, bad = buffers[index]
            for buffer in (diag, col, sumsq, sink):
                buffer.zero_()
            rc = kernel(scores.data_ptr(), B, H, n, rows[0], rows[1], qlo, qhi, jlo, want,
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
            if target not in self.dense:
                continue
            parts = (diag[:, :, k, self.offsets], row[:, :, k, self.queries], col[:, :, k, self.keys])
            self._scatter(self.xty[target], layer, torch.cat(parts, -1), buckets)
            self._scatter(self.sumsq[target], layer, sumsq[:, :, k], buckets)
        self._scatter(self.sink_sum, layer, sink, buckets)
        if self.row_sum is not None:
            k = DENSE_TARGETS.index("scores")
            dense_scores = "scores" in self.dense
            self._add_row_part(layer, log_z, row[:, :, k] if dense_scores else None,
                               sumsq[:, :, k] if dense_scores else None, buckets)

    def _add_layer_torch(self, layer: int, scores: Tensor, prompt_ids: Tensor) -> None:
        log_z = torch.logsumexp(scores, dim=-1)  # [batch, head, q]
        if not torch.isfinite(log_z).all():
            bad = (~torch.isfinite(log_z)).nonzero()[0].tolist()
            raise self._non_finite(layer, bad, prompt_ids)
        device = self.count.device
        buckets = (prompt_ids % self.n_buckets).to(device)
        folds = (prompt_ids % 2).to(device)
        pattern = (scores - log_z[..., None]).exp()
        if "pattern" in self.dense:
            self._add_dense("pattern", layer, pattern, buckets, folds)
        self._scatter(self.sink_sum, layer, pattern[:, :, 1:, 0].mean(-1), buckets)  # mean over i >= 1 of A[i, 0]
        row = sumsq = None
        if "scores" in self.dense:
            row, sumsq = self._add_dense("scores", layer, scores, buckets, folds)
        if self.row_sum is not None:
            self._add_row_part(layer, log_z, row, sumsq, buckets)

    def _add_row_part(
        self, layer: int, log_z: Float[Tensor, "batch head q"],
        scores_row: Float[Tensor, "batch head q"] | None, scores_sumsq: Float[Tensor, "batch head"] | None,
        buckets: Tensor,
    ) -> None:
        """The statistics of ``-log Z_i`` and of ``log_pattern = s - log Z_i`` that need
        more than the scores' sums: per-row sums of ``z = -log Z_i`` and the sums of
        squares (``scores_row``: per-prompt sums of ``s`` over each row's scored keys;
        needed, with ``scores_sumsq``, only for ``log_pattern``)."""
        count = self.row_count.to(log_z.device)
        z = -log_z.double() * (count > 0)  # unscored rows enter nothing
        z_sumsq = (z * z * count).sum(-1)
        self._scatter(self.row_sum, layer, z, buckets)
        if "neg_log_z" in self.targets:
            self._scatter(self.sumsq["neg_log_z"], layer, z_sumsq, buckets)
        if "log_pattern" in self.targets:
            cross = (z * scores_row.double()).sum(-1)
            self._scatter(self.sumsq["log_pattern"], layer, scores_sumsq.double() + 2 * cross + z_sumsq,
                          buckets)

    def _add_dense(
        self, target: str, layer: int, y: Float[Tensor, "batch head q k"],
        buckets: Tensor, folds: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Sums of one dense target; returns its per-prompt row sums and sums of squares."""
        y = torch.where(self.mask, y, 0.0)  # masked (-inf) keys never enter a sum
        # Row sums and sums of squares in float64 (log_pattern's sum of squares is
        # derived from them and cancels large terms), one prompt at a time so that no
        # float64 copy of the whole batch is made.
        row = torch.empty(y.shape[:-1], dtype=torch.float64, device=y.device)
        sumsq = torch.empty(y.shape[:-2], dtype=torch.float64, device=y.device)
        for b in range(len(y)):
            prompt = y[b].double()
            row[b] = prompt.sum(-1)
            sumsq[b] = (prompt * prompt).sum((-2, -1))
        parts = (
            lower_diagonal_sums(y)[..., self.offsets],  # cells lie on or below the diagonal
            row[..., self.queries],
            y.sum(-2)[..., self.keys],
        )
        self._scatter(self.xty[target], layer, torch.cat(parts, -1), buckets)
        flat = y.flatten(-2)
        self._scatter(self.sumsq[target], layer, sumsq, buckets)
        # Per-prompt values enter float64 before any sum over prompts, so the statistics
        # do not depend on how prompts are batched or sharded.
        self._scatter(self.cell_sum[target], layer, flat[..., self.flat_index], folds)
        return row, sumsq

    def row_xty(self, row_sum: Float[Tensor, "... q"]) -> Float[Tensor, "... column"]:
        """``X^T y`` of responses constant along each query row, from their row sums."""
        parts = (
            (row_sum @ self.row_offset_mask.double())[..., self.offsets],
            (row_sum * self.row_count)[..., self.queries],
            (row_sum @ self.mask_f.double())[..., self.keys],
        )
        return torch.cat(parts, -1)

    def to_statistics(self) -> dict[str, CellStatistics]:
        """Every target's statistics. ``log_pattern`` shares its cell sums with ``scores``
        and its row sums with ``neg_log_z`` (the same numpy arrays)."""
        count = self.count.cpu().numpy()

        def stats(**arrays) -> CellStatistics:
            return CellStatistics(self.design, self.n_layers, self.n_heads, self.n_buckets,
                                  count=count.copy(), **arrays)

        out = {t: stats(xty=self.xty[t].cpu().numpy(), sumsq=self.sumsq[t].cpu().numpy(),
                        cell_sum=self.cell_sum[t].cpu().numpy()) for t in self.dense}
        if self.row_sum is not None:
            row_sum, row_xty = self.row_sum.cpu().numpy(), self.row_xty(self.row_sum).cpu().numpy()
            if "neg_log_z" in self.targets:
                out["neg_log_z"] = stats(xty=row_xty, sumsq=self.sumsq["neg_log_z"].cpu().numpy(),
                                         row_sum=row_sum)
            if "log_pattern" in self.targets:
                scores = out["scores"]
                out["log_pattern"] = stats(
                    xty=scores.xty + row_xty, sumsq=self.sumsq["log_pattern"].cpu().numpy(),
                    cell_sum=scores.cell_sum, row_sum=row_sum)
        return {t: out[t] for t in TARGETS if t in self.targets}

    def restore(self, saved: dict[str, CellStatistics]) -> None:
        """Continue from the statistics of an earlier (interrupted) run of the same targets."""
        for target in self.dense:
            for key in ("xty", "sumsq", "cell_sum"):
                getattr(self, key)[target].copy_(torch.from_numpy(getattr(saved[target], key)))
        for target in ROW_TARGETS:
            if target in self.targets:
                if saved[target].row_sum is None:
                    raise ValueError("the checkpoint was written by an older rope_leak (format 1). "
                                     "Fix: delete it and start the run over.")
                self.sumsq[target].copy_(torch.from_numpy(saved[target].sumsq))
                self.row_sum.copy_(torch.from_numpy(saved[target].row_sum))
        self.count.copy_(torch.from_numpy(next(iter(saved.values())).count))
