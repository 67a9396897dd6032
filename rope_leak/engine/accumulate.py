"""Turn one layer's attention scores into sufficient statistics, in place, on device.

Called from a ``hook_attn_scores`` hook: the batch's scores are reduced to sums by
offset / query / key (``X^T y``, ``3 n`` numbers per head) and sums of squares, and then
dropped. Only ``pattern`` and ``scores`` are summed element by element (float32 or
float64 values, float64 sums). Every other target is the scores plus a part constant
along each query row, so its statistics come from per-row sums:

* ``neg_log_z = -log Z_i`` and ``log_pattern = s - log Z_i`` from the row sums of
  ``-log Z_i``;

A row part's sums of squares are ``sum s^2 + 2 sum_i r_i (sum_j s_ij) + sum_i n_i r_i^2``
per prompt; its ``X^T y`` is derived from the row sums whenever it is read
(:class:`~rope_leak.engine.statistics.RowPartXty`), so it is never stored.
Per-cell sums (``O(n^2)``) are kept only with ``cell_maps=True``.

Two implementations give the same statistics (to float32 rounding of the per-element
values; tests compare both with a float64 reference):

* on CPU, for float32 scores, the fused C kernel of :mod:`rope_leak.engine.kernel` reads
  each score row once and updates every sum of every dense target in that pass;
* elsewhere (GPU, float64, no C compiler), a pure-torch path whose accumulators stay on
  the model's device: nothing is copied to the host until :meth:`to_statistics`.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from rope_leak.engine.diagonals import lower_diagonal_sums
from rope_leak.engine.kernel import load_kernel
from rope_leak.engine.pairs import PairDesign
from rope_leak.engine.statistics import (
    TARGETS,
    RowPartXty,
    TargetStatistics,
    required_targets,
)

DENSE_TARGETS = ("pattern", "scores")
"""Targets summed element by element, in the kernel's order (bit ``k`` of its ``want``)."""
MASKED_ROW_TARGETS = ("log_pattern", "neg_log_z")
"""Targets that need the per-row sums of ``-log Z_i``."""


class NonFiniteAttentionError(FloatingPointError):
    """NaN or inf in the attention scores (e.g. float16 overflow)."""


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
        cell_maps: bool = False,
        start_cut: tuple[int, PairDesign] | None = None,
    ) -> None:
        self.design, self.targets = design, required_targets(targets)
        #: the start cut's ``(window, pairs)``, whose rows the kernel makes in its pass
        self.start_cut = start_cut
        self._start_cut_range = None if start_cut is None else self._start_cut_rows(design, start_cut[1])
        self.dense = tuple(t for t in DENSE_TARGETS if t in self.targets)
        self.n_layers, self.n_heads, self.n_buckets = n_layers, n_heads, n_buckets
        self.cell_maps = cell_maps
        n = design.n_tokens
        as_long = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long, device=device)  # noqa: E731
        self.mask = torch.as_tensor(design.cell_mask if cell_maps else self._mask(design), device=device)
        self.row_count = torch.as_tensor(design.row_count, dtype=torch.float64, device=device)
        shape = (n_buckets, n_layers, n_heads)
        f64 = dict(dtype=torch.float64, device=device)
        self.xty = {t: torch.zeros(shape + (design.n_columns,), **f64) for t in self.dense}
        self.sumsq = {t: torch.zeros(shape, **f64) for t in self.targets}
        self.cell_sum = ({t: torch.zeros((2, n_layers, n_heads, design.n_cells), **f64) for t in self.dense}
                         if cell_maps else {})
        self.flat_index = as_long(design.flat_index) if cell_maps else None
        # per bucket, sums over prompts of -log Z_i on scored rows
        needs_z = bool(set(MASKED_ROW_TARGETS) & set(self.targets))
        self.row_sum = torch.zeros(shape + (n,), **f64) if needs_z else None
        self.sink_sum = torch.zeros(shape, **f64)
        self.count = torch.zeros(n_buckets, dtype=torch.long, device=device)
        self.nonfinite = torch.zeros((n_layers, n_heads), dtype=torch.long, device=device)
        # The scored cells are rows qlo <= i < qhi, keys jlo <= j <= i (PairDesign).
        spec = design.spec
        self._rows = (max(spec.min_query, 0), n if spec.max_query is None else min(n, spec.max_query),
                      0 if spec.include_sink else 1)
        self._row_start = torch.as_tensor(np.concatenate([[0], np.cumsum(design.row_count)[:-1]]),
                                          dtype=torch.long)
        self._buffers: dict = {}
        self.use_kernel = True  # set False to force the pure-torch path
        #: the last layer's ``log Z_i`` ``[batch, head, q]`` (valid until the next add_layer)
        self.last_log_z: Tensor | None = None
        #: the last layer's start-cut rows, as :func:`~rope_leak.engine.start_cut.start_cut_rows`
        #: returns them, when the kernel made them, else None (valid until the next add_layer)
        self.last_start_cut_rows: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @staticmethod
    def _mask(design: PairDesign) -> np.ndarray:
        """``[n, n]`` bool mask of the scored cells, from the row ranges."""
        j = np.arange(design.n_tokens)
        i = j[:, None]
        return (j[None, :] >= design.key_start[:, None]) & (j[None, :] <= i)

    def add_prompts(self, prompt_ids: Int[Tensor, " batch"]) -> None:
        buckets = prompt_ids.to(self.count.device) % self.n_buckets
        self.count.index_add_(0, buckets, torch.ones_like(buckets))

    def _scatter(self, store: Tensor, layer: int, values: Tensor, index: Tensor) -> None:
        """``store[index[b], layer] += values[b]``, summing over the batch in float64."""
        store[:, layer].index_add_(0, index, values.double())

    def add_layer(
        self, layer: int, scores: Float[Tensor, "batch head q k"], prompt_ids: Int[Tensor, " batch"],
    ) -> None:
        """Add one layer's (causally masked) scores."""
        if scores.dtype != torch.float64:
            scores = scores.float()
        self.last_start_cut_rows = None
        kernel = self._kernel_for(scores)
        if kernel is not None:
            self._add_layer_kernel(kernel, layer, scores, prompt_ids)
        else:
            self._add_layer_torch(layer, scores, prompt_ids)

    def _kernel_for(self, scores: Tensor):
        """The C kernel when it serves these scores (CPU float32, CPU accumulators, every
        scored row one contiguous key range), else None."""
        # A window (max_offset) breaks the contiguous key ranges the kernel assumes.
        if (not self.use_kernel or self.design.spec.max_offset is not None
                or scores.device.type != "cpu" or scores.dtype != torch.float32
                or self.count.device.type != "cpu"):
            return None
        return load_kernel()

    def check_finite(self, prompt_ids: Tensor | None = None) -> None:
        """Raise if any score row so far was NaN or inf (a host read of one flag)."""
        if bool(self.nonfinite.any()):
            layer, head = (int(x) for x in self.nonfinite.nonzero()[0])
            raise self._non_finite(layer, [None, head, None], prompt_ids)

    @staticmethod
    def _non_finite(layer: int, bad: list, prompt_ids: Tensor | None) -> NonFiniteAttentionError:
        where = "" if bad[2] is None else f" (query {bad[2]}, prompt {int(prompt_ids[bad[0]])})"
        return NonFiniteAttentionError(
            f"NaN or inf attention scores in layer {layer}, head {bad[1]}{where}. Often float16 "
            "overflow. Fix: run in float32 or bfloat16 (--dtype float32)."
        )

    def _add_layer_kernel(self, kernel, layer: int, scores: Tensor, prompt_ids: Tensor) -> None:
        """The fused C kernel's pass."""
        scores = scores.contiguous()
        B, H, n, _ = scores.shape
        f64 = dict(dtype=torch.float64)
        folds = (prompt_ids.cpu() % 2).long().contiguous()
        qlo, qhi, jlo = self._rows
        want = sum(1 << k for k, t in enumerate(DENSE_TARGETS) if t in self.dense)
        cells = [self.cell_sum[t].data_ptr() if t in self.cell_sum else None for t in DENSE_TARGETS]
        start_cut = self.start_cut
        if start_cut:  # it needs the scores' sums (log A = s - log Z), a target or not
            want |= 1 << DENSE_TARGETS.index("scores")
        window, sc_rows = (0, (0, 0)) if start_cut is None else (start_cut[0], self._start_cut_range)
        key = (B, H, n, start_cut is not None)
        if key not in self._buffers:  # reused: fresh large allocations cost page faults
            zeroed = [torch.empty(B, H, 2, n, **f64), torch.empty(B, H, 2, n, **f64), torch.empty(B, H, 2, **f64),
                      torch.empty(B, H, **f64), torch.empty(B, H, 2, n, **f64)]  # diag, col, sumsq, sink, row
            if start_cut:  # its profile, and its rows' diagonal, column, squared and row sums of log A
                zeroed += [torch.empty(B, H, n, **f64), torch.empty(B, H, n, **f64), torch.empty(B, H, n, **f64),
                           torch.empty(B, H, **f64), torch.empty(B, H, n, **f64)]
            self._buffers = {key: (zeroed, torch.empty(B, H, n, dtype=torch.float32),
                                   torch.empty(B, H, n, **f64) if start_cut else None)}
        zeroed, log_z, log_rho = self._buffers[key]
        for buffer in zeroed:
            buffer.zero_()
        diag, col, sumsq, sink, row, *sc_sums = zeroed
        self.last_log_z = log_z  # filled by the kernel below (read by the start cut's hook)
        pointer = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        sc_pointers = [pointer(log_rho)] + [t.data_ptr() for t in sc_sums] if start_cut else [None] * 6

        bad = torch.zeros(3, dtype=torch.long)
        rc = kernel(scores.data_ptr(), B, H, n, torch.get_num_threads(), qlo, qhi, jlo, want,
                    folds.data_ptr(), diag.data_ptr(), col.data_ptr(), sumsq.data_ptr(),
                    sink.data_ptr(), row.data_ptr(), log_z.data_ptr(), *cells,
                    layer, self.n_layers, self.design.n_cells, self._row_start.data_ptr(), bad.data_ptr(),
                    window, *sc_rows, *sc_pointers)
        if rc == 2:
            raise MemoryError(f"the accumulation kernel could not allocate its scratch rows of {n} keys.")
        if rc:
            raise self._non_finite(layer, bad.tolist(), prompt_ids)
        if start_cut:  # the kernel made log A's sums over the start cut's cells
            profile, sc_diag, sc_col, sc_sumsq, sc_row = sc_sums
            self.last_start_cut_rows = (log_rho, profile, start_cut[1].columns(sc_diag, sc_row, sc_col), sc_sumsq)
        buckets = (prompt_ids % self.n_buckets).cpu()
        for k, target in enumerate(DENSE_TARGETS):
            if target not in self.dense:
                continue
            self._scatter(self.xty[target], layer, self.design.columns(diag[:, :, k], row[:, :, k], col[:, :, k]),
                          buckets)
            self._scatter(self.sumsq[target], layer, sumsq[:, :, k], buckets)
        self._scatter(self.sink_sum, layer, sink, buckets)
        k = DENSE_TARGETS.index("scores")
        dense_scores = "scores" in self.dense
        self._add_row_parts(layer, log_z, row[:, :, k] if dense_scores else None,
                            sumsq[:, :, k] if dense_scores else None, buckets)

    @staticmethod
    def _start_cut_rows(ours: PairDesign, cut: PairDesign) -> tuple[int, int]:
        """The start cut's query rows ``[lo, hi)``: one range, all of them scored rows of
        the run's own pairs with the same keys (the kernel relies on both)."""
        rows = np.flatnonzero(cut.row_count)
        if len(rows) == 0:
            return 0, 0
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if (len(rows) != hi - lo or (ours.row_count[lo:hi] != cut.row_count[lo:hi]).any()
                or (ours.key_start[lo:hi] != cut.key_start[lo:hi]).any()):
            raise ValueError("the start cut's pairs must be a range of the run's query rows.")
        return lo, hi

    def _add_layer_torch(self, layer: int, scores: Tensor, prompt_ids: Tensor) -> None:
        log_z = torch.logsumexp(scores, dim=-1)  # [batch, head, q]
        self.last_log_z = log_z
        self.nonfinite[layer] += (~torch.isfinite(log_z)).sum((0, 2))
        device = self.count.device
        buckets = prompt_ids.to(device) % self.n_buckets
        folds = prompt_ids.to(device) % 2
        pattern = (scores - log_z[..., None]).exp()
        if "pattern" in self.dense:
            self._add_dense("pattern", layer, pattern, buckets, folds)
        self._scatter(self.sink_sum, layer, pattern[:, :, 1:, 0].mean(-1), buckets)  # mean over i >= 1 of A[i, 0]
        row = sumsq = None
        if "scores" in self.dense:
            row, sumsq = self._add_dense("scores", layer, scores, buckets, folds)
        self._add_row_parts(layer, log_z, row, sumsq, buckets)

    def _add_row_parts(
        self, layer: int, log_z: Float[Tensor, "batch head q"],
        scores_row: Float[Tensor, "batch head q"] | None, scores_sumsq: Float[Tensor, "batch head"] | None,
        buckets: Tensor,
    ) -> None:
        """Statistics of the targets that are the scores plus a row part (see the module
        docstring). ``scores_row``: per-prompt sums of ``s`` over each row's scored keys."""
        count = self.row_count.to(log_z.device)
        scored = count > 0  # unscored rows enter nothing

        def with_scores(target: str, r: Tensor, r_sumsq: Tensor) -> None:
            if target in self.targets:
                cross = (r * scores_row.double()).sum(-1)
                self._scatter(self.sumsq[target], layer, scores_sumsq.double() + 2 * cross + r_sumsq,
                              buckets)

        z = None
        if self.row_sum is not None:
            z = -log_z.double() * scored
            z_sumsq = (z * z * count).sum(-1)
            self._scatter(self.row_sum, layer, z, buckets)
            if "neg_log_z" in self.targets:
                self._scatter(self.sumsq["neg_log_z"], layer, z_sumsq, buckets)
            with_scores("log_pattern", z, z_sumsq)

    def _add_dense(
        self, target: str, layer: int, y: Float[Tensor, "batch head q k"],
        buckets: Tensor, folds: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Sums of one dense target; returns its per-prompt row sums and sums of squares."""
        y = torch.where(self.mask, y, 0.0)  # masked (-inf) keys never enter a sum
        # Row sums and sums of squares in float64 (derived sums of squares cancel large
        # terms), one prompt at a time so that no float64 copy of the whole batch is made.
        row = torch.empty(y.shape[:-1], dtype=torch.float64, device=y.device)
        sumsq = torch.empty(y.shape[:-2], dtype=torch.float64, device=y.device)
        for b in range(len(y)):
            prompt = y[b].double()
            row[b] = prompt.sum(-1)
            sumsq[b] = (prompt * prompt).sum((-2, -1))
        # cells lie on or below the diagonal
        xty = self.design.columns(lower_diagonal_sums(y), row, y.sum(-2))
        self._scatter(self.xty[target], layer, xty, buckets)
        self._scatter(self.sumsq[target], layer, sumsq, buckets)
        if self.cell_maps:
            # Per-prompt values enter float64 before any sum over prompts, so the statistics
            # do not depend on how prompts are batched or sharded.
            self._scatter(self.cell_sum[target], layer, y.flatten(-2)[..., self.flat_index], folds)
        return row, sumsq

    def row_xty(self, row_sum: Float[Tensor, "... q"]) -> Float[Tensor, "... column"]:
        """``X^T y`` of responses constant along each query row (:meth:`PairDesign.row_xty`)."""
        return self.design.row_xty(row_sum)

    def to_statistics(self) -> dict[str, TargetStatistics]:
        """Every target's statistics (the one transfer to the host)."""
        self.check_finite()
        count = self.count.cpu().numpy()
        numpy = lambda t: t.cpu().numpy()  # noqa: E731

        def fold_rows(rows: Tensor) -> Tensor:  # [fold, layer, head, cell] of a row part
            folds = torch.stack([rows[0::2].sum(0), rows[1::2].sum(0)])
            return folds[..., torch.as_tensor(self.design.cells[0], device=rows.device)]

        def stats(target: str, xty: Tensor, cells: Tensor | None) -> TargetStatistics:
            return TargetStatistics(
                self.design, self.n_layers, self.n_heads, self.n_buckets, count=count.copy(),
                xty=numpy(xty), sumsq=numpy(self.sumsq[target]),
                cell_sum=None if cells is None or not self.cell_maps else numpy(cells))

        out = {t: stats(t, self.xty[t], self.cell_sum.get(t)) for t in self.dense}
        scores_cells = self.cell_sum.get("scores")
        host = {}  # each row-sum accumulator copied to the host once, shared by its targets
        derived = {}  # target: (row sums, subtracted row sums, scores added)
        if self.row_sum is not None:
            derived["neg_log_z"] = (self.row_sum, None, False)
            derived["log_pattern"] = (self.row_sum, None, True)
        for target, (rows, minus, with_scores) in derived.items():
            if target not in self.targets:
                continue
            base = out["scores"] if with_scores else None
            cells = None
            if self.cell_maps:
                cells = fold_rows(rows if minus is None else rows - minus)
                cells = numpy(cells if base is None else cells + scores_cells)
            rows_host, minus_host = (None if t is None else host.setdefault(id(t), numpy(t))
                                     for t in (rows, minus))
            # X^T y is derived on access from the row sums (RowPartXty), never stored
            out[target] = TargetStatistics(
                self.design, self.n_layers, self.n_heads, self.n_buckets, count=count.copy(),
                sumsq=numpy(self.sumsq[target]), cell_sum=cells,
                derived=RowPartXty(self.design, rows_host, minus_host, base))
        return {t: out[t] for t in TARGETS if t in self.targets}

    def state(self) -> dict[str, Tensor]:
        """Every accumulator, by name (for checkpoints: the exact running sums)."""
        out = {f"xty/{t}": v for t, v in self.xty.items()}
        out.update({f"sumsq/{t}": v for t, v in self.sumsq.items()})
        out.update({f"cell_sum/{t}": v for t, v in self.cell_sum.items()})
        for name in ("row_sum", "sink_sum", "count"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Continue from :meth:`state` saved by an earlier (interrupted) run."""
        mine = self.state()
        if set(mine) != set(state):
            raise ValueError("the checkpoint holds other accumulators than this run needs.")
        for name, tensor in mine.items():
            tensor.copy_(torch.from_numpy(np.asarray(state[name])))
