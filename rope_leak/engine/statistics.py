"""Sufficient statistics of a streaming run: everything the fits need, nothing more.

Per condition and target, and per prompt *bucket* (prompt ``k`` goes to bucket
``k % n_buckets``; fold = bucket parity, so the two folds are the even and odd
prompts):

* ``xty[g, l, h, :]`` = ``X^T y`` summed over the bucket's prompts (sums of ``y`` by
  offset, by query and by key over the scored cells);
* ``sumsq[g, l, h]`` = sum of ``y^2`` over the scored cells;
* ``count[g]`` = number of prompts.

Per fold, the sums of ``y`` at every cell (for the cell-mean ceiling ``M_cell``, the
nulls and residual maps), stored in two parts: ``cell_sum[f, l, h, c]`` (dense) and, for
a response with a part constant along each query row, ``row_sum[g, l, h, i]`` (per
bucket). ``neg_log_z = -log Z_i`` is all row part and ``log_pattern = scores - log Z_i``
is the scores' dense part plus that row part, so both are derived from the scores and
``log Z`` (:mod:`rope_leak.engine.accumulate`): the engine never sums them cell by cell,
and the arrays they share with ``scores`` are the same objects in memory and stored once
in a file. Memory is independent of the number of prompts; runs over disjoint prompts
merge by addition, exactly.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rope_leak.cache import atomic_path
from rope_leak.engine.pairs import PairDesign, PairSpec

TARGETS = ("pattern", "log_pattern", "scores", "neg_log_z")
"""Responses the engine can accumulate. ``neg_log_z`` is ``-log Z_i`` broadcast over
the row's keys, the causal denominator's part of ``log_pattern = scores - log Z_i``."""



def required_targets(targets) -> tuple[str, ...]:
    """``targets`` in :data:`TARGETS` order, with ``scores`` added when ``log_pattern`` is
    asked for (its statistics are the scores' plus a per-row part)."""
    targets = set(targets)
    if "log_pattern" in targets:
        targets.add("scores")
    return tuple(t for t in TARGETS if t in targets)


FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: every target's cell sums stored densely
ARRAY_FIELDS = ("xty", "sumsq", "count", "cell_sum", "row_sum")


@dataclass
class CellStatistics:
    """Sufficient statistics of one target under one condition."""

    design: PairDesign
    n_layers: int
    n_heads: int
    n_buckets: int
    xty: np.ndarray = field(default=None)  # [bucket, layer, head, column]
    sumsq: np.ndarray = field(default=None)  # [bucket, layer, head]
    count: np.ndarray = field(default=None)  # [bucket]
    cell_sum: np.ndarray | None = field(default=None)  # [fold, layer, head, cell] dense part
    row_sum: np.ndarray | None = field(default=None)  # [bucket, layer, head, query] row part

    def __post_init__(self) -> None:
        if self.n_buckets < 2 or self.n_buckets % 2:
            raise ValueError(f"n_buckets must be even and >= 2, got {self.n_buckets}.")
        shape = (self.n_buckets, self.n_layers, self.n_heads)
        if self.xty is None:
            self.xty = np.zeros(shape + (self.design.n_columns,))
            self.sumsq = np.zeros(shape)
            self.count = np.zeros(self.n_buckets, dtype=np.int64)
            self.cell_sum = np.zeros((2, self.n_layers, self.n_heads, self.design.n_cells))
        if self.row_sum is not None and self.row_sum.shape != shape + (self.design.n_tokens,):
            raise ValueError(f"row_sum has shape {self.row_sum.shape}, expected "
                             f"{shape + (self.design.n_tokens,)}.")

    def fold_row_sums(self) -> np.ndarray | None:
        """``[fold, layer, head, query]`` sums of the row part (fold = bucket parity)."""
        if self.row_sum is None:
            return None
        return np.stack([self.row_sum[0::2].sum(0), self.row_sum[1::2].sum(0)])

    def fold_cell_sums(self) -> np.ndarray:
        """``[fold, layer, head, cell]``: sum of ``y`` at every scored cell over each fold's
        prompts (dense part plus row part)."""
        rows = self.fold_row_sums()
        if rows is None:
            return self.cell_sum
        cells = rows[..., self.design.cells[0]]
        return cells if self.cell_sum is None else cells + self.cell_sum

    def fold_cell_products(self) -> np.ndarray:
        """``[fold a, fold b, layer, head]``: ``sum_c S_a[c] S_b[c]`` of the fold cell sums
        ``S``, without materialising ``S`` when it has a row part:
        ``(C + R[q(c)]).(C' + R'[q(c)]) = C.C' + R.rowsum(C') + R'.rowsum(C) + sum_i n_i R_i R'_i``.
        """
        rows = self.fold_row_sums()
        out = np.zeros((2, 2, self.n_layers, self.n_heads))
        dense = self.cell_sum
        if dense is not None:
            out += np.einsum("alhc,blhc->ablh", dense, dense, optimize=True)
        if rows is not None:
            queries = self.design.cells[0]
            per_row = np.bincount(queries, minlength=self.design.n_tokens).astype(float)
            out += np.einsum("alhi,blhi,i->ablh", rows, rows, per_row, optimize=True)
            if dense is not None:
                starts = np.searchsorted(queries, np.unique(queries))
                dense_rows = np.zeros(rows.shape)
                dense_rows[..., np.unique(queries)] = np.add.reduceat(dense, starts, axis=-1)
                cross = np.einsum("alhi,blhi->ablh", rows, dense_rows)
                out += cross + cross.transpose(1, 0, 2, 3)
        return out

    @property
    def n_prompts(self) -> int:
        return int(self.count.sum())

    @property
    def fold_count(self) -> np.ndarray:
        return np.array([self.count[0::2].sum(), self.count[1::2].sum()])

    def compatible(self, other: CellStatistics) -> bool:
        return (
            self.design.spec == other.design.spec
            and self.design.n_tokens == other.design.n_tokens
            and (self.n_layers, self.n_heads, self.n_buckets)
            == (other.n_layers, other.n_heads, other.n_buckets)
        )

    def merge(self, other: CellStatistics, memo: dict | None = None) -> CellStatistics:
        """Sum of two runs over disjoint prompts. ``memo`` maps ``(id(a), id(b))`` to
        ``a + b``, so arrays shared between targets stay shared in the result."""
        if not self.compatible(other):
            raise ValueError(
                "cannot merge statistics of different settings (pairs, sequence length, "
                "model shape or bucket count). Fix: merge only runs made with the same settings."
            )
        memo = {} if memo is None else memo

        def add(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            if (a is None) != (b is None):
                raise ValueError("cannot merge statistics stored in different layouts. Fix: merge "
                                 "statistics written by the same rope_leak version.")
            if a is None:
                return None
            key = (id(a), id(b))
            if key not in memo:
                memo[key] = (a, b, a + b)  # keeps a and b alive, so their ids stay unique
            return memo[key][2]

        if (self.row_sum is None) != (other.row_sum is None):
            # one side from format 1 (dense cell sums only): merge the dense fold sums
            cell_sum, row_sum = self.fold_cell_sums() + other.fold_cell_sums(), None
        else:
            cell_sum, row_sum = add(self.cell_sum, other.cell_sum), add(self.row_sum, other.row_sum)
        return CellStatistics(
            self.design, self.n_layers, self.n_heads, self.n_buckets,
            xty=add(self.xty, other.xty), sumsq=add(self.sumsq, other.sumsq),
            count=self.count + other.count, cell_sum=cell_sum, row_sum=row_sum,
        )


@dataclass
class PositionZeroStatistics:
    """Cross-prompt spread of the residual stream at position 0, layer by layer.

    Deviations are taken from a reference (the first prompt seen), so prompts with an
    identical position-0 stream give a spread of exactly 0 (no cancellation error).
    """

    reference: np.ndarray | None = None  # [layer + 1, d_model]
    dev_sum: np.ndarray | None = None
    dev_sumsq: np.ndarray | None = None
    max_abs_dev: np.ndarray | None = None  # [layer + 1]
    norm_sum: np.ndarray | None = None  # [layer + 1] sum of |resid_0|
    other_norm_sum: np.ndarray | None = None  # [layer + 1] sum of mean |resid_i|, i >= 1
    count: int = 0
    value_min: np.ndarray | None = None  # [layer + 1, d_model] elementwise extremes of resid_0:
    value_max: np.ndarray | None = None  # max_abs_dev from any reference, so merges stay exact

    def add(self, resid0: np.ndarray, other_norm: np.ndarray) -> None:
        """``resid0``: ``[prompt, layer + 1, d_model]``; ``other_norm``: ``[prompt, layer + 1]``."""
        resid0 = resid0.astype(np.float64)
        if self.reference is None:
            self.reference = resid0[0].copy()
            self.dev_sum = np.zeros_like(self.reference)
            self.dev_sumsq = np.zeros_like(self.reference)
            self.max_abs_dev = np.zeros(resid0.shape[1])
            self.norm_sum = np.zeros(resid0.shape[1])
            self.other_norm_sum = np.zeros(resid0.shape[1])
            self.value_min, self.value_max = resid0.min(0), resid0.max(0)
        if self.value_min is not None:
            self.value_min = np.minimum(self.value_min, resid0.min(0))
            self.value_max = np.maximum(self.value_max, resid0.max(0))
        dev = resid0 - self.reference
        self.dev_sum += dev.sum(0)
        self.dev_sumsq += (dev**2).sum(0)
        self.max_abs_dev = np.maximum(self.max_abs_dev, np.abs(dev).max(axis=(0, 2)))
        self.norm_sum += np.linalg.norm(resid0, axis=-1).sum(0)
        self.other_norm_sum += other_norm.astype(np.float64).sum(0)
        self.count += resid0.shape[0]

    def merge(self, other: PositionZeroStatistics) -> PositionZeroStatistics:
        if other.reference is None:
            return self
        if self.reference is None:
            return other
        shift = self.reference - other.reference  # re-express other's deviations
        out = PositionZeroStatistics(
            reference=self.reference.copy(),
            dev_sum=self.dev_sum + other.dev_sum - other.count * shift,
            dev_sumsq=self.dev_sumsq + other.dev_sumsq - 2 * shift * other.dev_sum
            + other.count * shift**2,
            max_abs_dev=np.maximum(
                self.max_abs_dev,
                other.max_abs_dev + np.abs(shift).max(axis=-1),  # an upper bound
            ),
            norm_sum=self.norm_sum + other.norm_sum,
            other_norm_sum=self.other_norm_sum + other.other_norm_sum,
            count=self.count + other.count,
        )
        if not np.any(shift):
            out.max_abs_dev = np.maximum(self.max_abs_dev, other.max_abs_dev)
        if self.value_min is not None and other.value_min is not None:
            out.value_min = np.minimum(self.value_min, other.value_min)
            out.value_max = np.maximum(self.value_max, other.value_max)
            # exact: the largest |x - reference| is at an elementwise extreme
            out.max_abs_dev = np.maximum(np.abs(out.value_max - out.reference),
                                         np.abs(out.value_min - out.reference)).max(-1)
        return out

    def std(self) -> np.ndarray:
        """Cross-prompt std per layer, root-mean over the model dimension: ``[layer + 1]``."""
        if self.count < 2:
            return np.full(0 if self.reference is None else len(self.reference), np.nan)
        mean = self.dev_sum / self.count
        var = np.clip(self.dev_sumsq / self.count - mean**2, 0.0, None)
        var[self.dev_sumsq == 0] = 0.0  # exactly identical streams: exactly zero
        return np.sqrt(var.mean(-1) * self.count / (self.count - 1))


@dataclass
class ConditionStatistics:
    """Everything one condition (e.g. ``causal``, ``bidirectional``) accumulated."""

    condition: str
    targets: dict[str, CellStatistics]
    sink_sum: np.ndarray  # [bucket, layer, head]: sum over prompts of mean_{i>=1} A[i, 0]
    position_zero: PositionZeroStatistics

    def merge(self, other: ConditionStatistics) -> ConditionStatistics:
        if self.condition != other.condition or set(self.targets) != set(other.targets):
            raise ValueError("cannot merge statistics of different conditions or targets.")
        memo: dict = {}
        return ConditionStatistics(
            self.condition,
            {t: s.merge(other.targets[t], memo) for t, s in self.targets.items()},
            self.sink_sum + other.sink_sum,
            self.position_zero.merge(other.position_zero),
        )

    @property
    def n_prompts(self) -> int:
        return next(iter(self.targets.values())).n_prompts


@dataclass
class RunStatistics:
    """All conditions of one run, with the metadata needed to merge and trace it."""

    conditions: dict[str, ConditionStatistics]
    metadata: dict = field(default_factory=dict)
    prompts_done: list[int] = field(default_factory=list)

    def merge(self, other: RunStatistics) -> RunStatistics:
        overlap = set(self.prompts_done) & set(other.prompts_done)
        if overlap:
            raise ValueError(
                f"the two runs share {len(overlap)} prompts (e.g. {sorted(overlap)[:5]}): "
                "merging would count them twice. Fix: merge shards of disjoint prompts."
            )
        if set(self.conditions) != set(other.conditions):
            raise ValueError("cannot merge runs with different conditions.")
        return RunStatistics(
            {c: s.merge(other.conditions[c]) for c, s in self.conditions.items()},
            dict(self.metadata),
            sorted(self.prompts_done + other.prompts_done),
        )

    # -- persistence ---------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write to one ``.npz`` file, atomically."""
        arrays: dict[str, np.ndarray] = {}
        stored: dict[int, str] = {}
        aliases: dict[str, str] = {}
        header = {
            "format_version": FORMAT_VERSION,
            "metadata": self.metadata,
            "prompts_done": self.prompts_done,
            "conditions": {},
        }
        for cname, cond in self.conditions.items():
            first = next(iter(cond.targets.values()))
            header["conditions"][cname] = {
                "targets": list(cond.targets),
                "spec": first.design.spec.to_dict(),
                "n_tokens": first.design.n_tokens,
                "shape": [first.n_layers, first.n_heads, first.n_buckets],
                "position_zero_count": cond.position_zero.count,
            }
            for tname, st in cond.targets.items():
                for key in ARRAY_FIELDS:
                    array = getattr(st, key)
                    if array is None:
                        continue
                    name = f"{cname}/{tname}/{key}"
                    if id(array) in stored:  # shared with another target: written once
                        aliases[name] = stored[id(array)]
                    else:
                        stored[id(array)] = name
                        arrays[name] = array
            arrays[f"{cname}/sink_sum"] = cond.sink_sum
            pz = cond.position_zero
            if pz.reference is not None:
                for key in ("reference", "dev_sum", "dev_sumsq", "max_abs_dev", "norm_sum",
                            "other_norm_sum"):
                    arrays[f"{cname}/position_zero/{key}"] = getattr(pz, key)
                if pz.value_min is not None:  # optional (files of older versions lack them)
                    arrays[f"{cname}/position_zero/value_min"] = pz.value_min
                    arrays[f"{cname}/position_zero/value_max"] = pz.value_max
        header["aliases"] = aliases
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with atomic_path(path) as tmp:
            with zipfile.ZipFile(tmp, "w") as archive:
                archive.writestr("header.json", json.dumps(header, sort_keys=True))
                archive.writestr("arrays.npz", buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> RunStatistics:
        path = Path(path)
        try:
            with zipfile.ZipFile(path) as archive:
                header = json.loads(archive.read("header.json"))
                arrays = np.load(io.BytesIO(archive.read("arrays.npz")))
                arrays = {k: arrays[k] for k in arrays.files}
        except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, FileNotFoundError) as err:
            raise ValueError(
                f"{path} is not a rope_leak statistics file ({err}). Fix: pass a file written "
                "by `rope-leak analyze --shard` or RunStatistics.save."
            ) from err
        if header.get("format_version") not in READABLE_FORMATS:
            raise ValueError(f"{path} has format {header.get('format_version')}; this rope_leak reads "
                             f"formats {READABLE_FORMATS}. Fix: rerun the analysis with this version.")
        for alias, name in header.get("aliases", {}).items():
            arrays[alias] = arrays[name]  # the same object, as when saved
        conditions = {}
        for cname, info in header["conditions"].items():
            design = PairDesign(PairSpec(**info["spec"]), info["n_tokens"])
            n_layers, n_heads, n_buckets = info["shape"]
            targets = {
                t: CellStatistics(
                    design, n_layers, n_heads, n_buckets,
                    **{k: arrays.get(f"{cname}/{t}/{k}") for k in ARRAY_FIELDS},
                )
                for t in info["targets"]
            }
            pz = PositionZeroStatistics(count=info["position_zero_count"])
            if f"{cname}/position_zero/reference" in arrays:
                for key in ("reference", "dev_sum", "dev_sumsq", "max_abs_dev", "norm_sum",
                            "other_norm_sum"):
                    setattr(pz, key, arrays[f"{cname}/position_zero/{key}"])
                for key in ("value_min", "value_max"):
                    setattr(pz, key, arrays.get(f"{cname}/position_zero/{key}"))
            conditions[cname] = ConditionStatistics(cname, targets, arrays[f"{cname}/sink_sum"], pz)
        return cls(conditions, header["metadata"], header["prompts_done"])
