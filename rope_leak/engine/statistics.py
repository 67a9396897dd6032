"""Sufficient statistics of a streaming run: everything the fits need, nothing more.

Per condition and target, and per prompt *bucket* (prompt ``k`` goes to bucket
``k % n_buckets``; fold = bucket parity, so the two folds are the even and odd
prompts):

* ``xty[g, l, h, :]`` = ``X^T y`` summed over the bucket's prompts (sums of ``y`` by
  offset, by query and by key over the scored cells: ``3 n`` numbers);
* ``sumsq[g, l, h]`` = sum of ``y^2`` over the scored cells;
* ``count[g]`` = number of prompts.

That is ``O(n)`` per head and bucket, and every fit, share, bootstrap and null works
from it (:mod:`rope_leak.fits.position_models`). Optionally (``cell_maps=True``), per
fold, the sums of ``y`` at every scored cell, ``cell_sum[f, l, h, c]``: ``O(n^2)``, for
the cell-mean ceiling ``M_cell``, the within-diagonal permutation null and per-cell maps.
Memory is independent of the number of prompts; runs over disjoint prompts merge by
addition, exactly.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rope_leak.display import Displayable
from rope_leak.download_cache import atomic_path
from rope_leak.engine.pairs import PairDesign, PairSpec, start_cut_spec

TARGETS = ("pattern", "log_pattern", "scores", "neg_log_z")
"""Responses the engine can accumulate. ``neg_log_z`` is ``-log Z_i`` broadcast over
the row's keys, the causal denominator's part of ``log_pattern = scores - log Z_i``.
The start cut's statistics (:mod:`rope_leak.engine.start_cut`) are kept beside them."""


def required_targets(targets) -> tuple[str, ...]:
    """``targets`` in :data:`TARGETS` order, with ``scores`` added when a target derived
    from the scores' sums is asked for."""
    targets = set(targets)
    unknown = targets - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown targets {sorted(unknown)}; choose from {TARGETS}.")
    if "log_pattern" in targets:
        targets.add("scores")
    return tuple(t for t in TARGETS if t in targets)


DEFAULT_BUCKETS = 32


def default_buckets(n_prompts: int) -> int:
    """``min(32, P)`` rounded up to even: per-bucket sums cost memory (``3 n`` per head
    each), and more buckets than prompts would only hold zeros. The one bucket rule."""
    return int(min(DEFAULT_BUCKETS, max(2, n_prompts + n_prompts % 2)))


FORMAT_VERSION = 5
ARRAY_FIELDS = ("xty", "sumsq", "count", "cell_sum")


class StatisticsFileError(ValueError):
    """A statistics, shard or checkpoint file that cannot be read."""


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB"


@dataclass(eq=False)
class RowPartXty:
    """``X^T y`` of a target that is a part constant along each query row (``rows``,
    minus ``minus`` when given), plus the ``X^T y`` of ``base`` (the scores) when given.

    Derived on each access (:meth:`xty`, ``O(n)`` per head and bucket) from the per-row
    sums, so the targets that are the scores plus a row part (``log_pattern``,
    ``unmasked_log_pattern``, ...) hold no ``3 n`` sums of their own."""

    design: PairDesign
    rows: np.ndarray  # [bucket, layer, head, n] per-bucket sums over prompts of r_i
    minus: np.ndarray | None = None  # [bucket, layer, head, n], subtracted from rows
    base: TargetStatistics | None = None

    #: at most this many numbers of ``X^T y`` derived per step (bounds the temporaries)
    chunk_elements: int = 1 << 22

    def xty(self) -> np.ndarray:
        """``[bucket, layer, head, column]``, computed a few buckets at a time."""
        out = np.empty(self.rows.shape[:-1] + (self.design.n_columns,))
        per_bucket = max(1, out[0].size)
        step = max(1, self.chunk_elements // per_bucket)
        for g in range(0, len(self.rows), step):
            rows = torch.from_numpy(self.rows[g:g + step])
            if self.minus is not None:
                rows = rows - torch.from_numpy(self.minus[g:g + step])
            xty = self.design.row_xty(rows)
            if self.base is not None:
                xty += torch.from_numpy(self.base.xty[g:g + step])
            out[g:g + step] = xty.numpy()
        return out

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The arrays the derivation reads (to test whether a cached result is current)."""
        base = () if self.base is None else self.base.arrays()
        return (self.rows,) + (() if self.minus is None else (self.minus,)) + base


@dataclass(repr=False)
class TargetStatistics(Displayable):
    """Sufficient statistics of one target under one condition.

    ``xty`` is stored, or, with ``derived`` given, computed from it on each access (see
    :class:`RowPartXty`)."""

    design: PairDesign
    n_layers: int
    n_heads: int
    n_buckets: int
    xty: np.ndarray = field(default=None)  # [bucket, layer, head, column]
    sumsq: np.ndarray = field(default=None)  # [bucket, layer, head]
    count: np.ndarray = field(default=None)  # [bucket]
    cell_sum: np.ndarray | None = field(default=None)  # [fold, layer, head, cell], optional
    derived: RowPartXty | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.n_buckets < 2 or self.n_buckets % 2:
            raise ValueError(f"n_buckets must be even and >= 2, got {self.n_buckets}.")
        shape = (self.n_buckets, self.n_layers, self.n_heads)
        if self.derived is not None:
            if self.__dict__["_xty"] is not None:
                raise ValueError("give xty or derived, not both.")
            if self.derived.rows.shape != shape + (self.design.n_tokens,):
                raise ValueError(f"derived row sums have shape {self.derived.rows.shape}, "
                                 f"expected {shape + (self.design.n_tokens,)}.")
            return
        if self.xty is None:
            self.xty = np.zeros(shape + (self.design.n_columns,))
            self.sumsq = np.zeros(shape)
            self.count = np.zeros(self.n_buckets, dtype=np.int64)
        if self.xty.shape != shape + (self.design.n_columns,):
            raise ValueError(f"xty has shape {self.xty.shape}, expected "
                             f"{shape + (self.design.n_columns,)}.")

    def _display_items(self):
        return [("prompts", self.n_prompts), ("n_tokens", self.design.n_tokens),
                ("heads", f"{self.n_layers} layers x {self.n_heads} heads"),
                ("scored_cells", self.design.n_cells), ("buckets", self.n_buckets),
                ("cell_maps", self.has_cells), ("size", _megabytes(self.nbytes))]

    @property
    def has_cells(self) -> bool:
        return self.cell_sum is not None

    def _require_cells(self) -> np.ndarray:
        if self.cell_sum is None:
            raise ValueError(
                "these statistics hold no per-cell sums (only the O(n) sums every fit needs). "
                "Fix: rerun with cell_maps=True (--cell-maps) for M_cell, the permutation "
                "null or per-cell maps.")
        return self.cell_sum

    def fold_cell_sums(self) -> np.ndarray:
        """``[fold, layer, head, cell]``: sum of ``y`` at every scored cell over each fold."""
        return self._require_cells()

    def fold_cell_products(self) -> np.ndarray:
        """``[fold a, fold b, layer, head]``: ``sum_c S_a[c] S_b[c]`` of the fold cell sums."""
        cells = self._require_cells()
        return np.einsum("alhc,blhc->ablh", cells, cells, optimize=True)

    @property
    def n_prompts(self) -> int:
        return int(self.count.sum())

    @property
    def fold_count(self) -> np.ndarray:
        return np.array([self.count[0::2].sum(), self.count[1::2].sum()])

    @property
    def is_derived(self) -> bool:
        """Whether ``xty`` is computed on access rather than stored."""
        return self.derived is not None

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The arrays ``xty`` is read from (stored, or those of its derivation)."""
        return (self.__dict__["_xty"],) if self.derived is None else self.derived.arrays()

    @property
    def nbytes(self) -> int:
        """Bytes this object holds itself (a derived target: its row sums, which other
        targets of the same condition may share)."""
        own = (self.derived.rows, self.derived.minus) if self.derived is not None else (self.xty,)
        return sum(a.nbytes for a in (*own, self.sumsq, self.count, self.cell_sum)
                   if a is not None)

    def compatible(self, other: TargetStatistics) -> bool:
        return (
            self.design.spec == other.design.spec
            and self.design.n_tokens == other.design.n_tokens
            and (self.n_layers, self.n_heads, self.n_buckets)
            == (other.n_layers, other.n_heads, other.n_buckets)
        )

    def merge(self, other: TargetStatistics) -> TargetStatistics:
        """Sum of two runs over disjoint prompts."""
        if not self.compatible(other):
            raise ValueError(
                "cannot merge statistics of different settings (pairs, sequence length, "
                "model shape or bucket count). Fix: merge only runs made with the same settings."
            )
        if self.has_cells != other.has_cells:
            raise ValueError("cannot merge statistics with and without per-cell sums. Fix: "
                             "run every shard with the same --cell-maps setting.")
        return TargetStatistics(
            self.design, self.n_layers, self.n_heads, self.n_buckets,
            xty=self.xty + other.xty, sumsq=self.sumsq + other.sumsq,
            count=self.count + other.count,
            cell_sum=None if self.cell_sum is None else self.cell_sum + other.cell_sum,
        )


def _get_xty(self: TargetStatistics) -> np.ndarray:
    stored = self.__dict__.get("_xty")
    if stored is None and self.__dict__.get("derived") is not None:
        return self.derived.xty()
    return stored


def _set_xty(self: TargetStatistics, value: np.ndarray | None) -> None:
    self.__dict__["_xty"] = value


# ``xty[g, l, h, :]``: stored, or derived on access (set after the dataclass is built, so
# that ``xty`` stays an ordinary constructor argument)
TargetStatistics.xty = property(_get_xty, _set_xty)


@dataclass(repr=False)
class PositionZeroStatistics(Displayable):
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

    def _max_std(self) -> float:
        std = self.std()
        return float(np.nanmax(std)) if std.size and np.isfinite(std).any() else float("nan")

    def _display_items(self):
        return [("prompts", self.count), ("depths", 0 if self.reference is None else len(self.reference)),
                ("max_std", self._max_std()),
                ("max_abs_dev", float(self.max_abs_dev.max()) if self.max_abs_dev is not None else float("nan"))]

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


@dataclass(repr=False)
class StartCutStatistics:
    """What one condition accumulated for the start cut.

    Attributes:
        window: the reference window ``w``.
        n_buckets: prompt buckets (bucket of prompt ``k``: ``k % n_buckets``).
        profile_sum: ``[bucket, layer, head, n]`` sums over the bucket's prompts of the
            count-free pattern by offset (see the module docstring).
        log_rho: ``[prompt, layer, head, n]`` log visible window mass, per prompt.
        prompt_ids: ``[prompt]`` global index of each row of ``log_rho``.
        log_pattern: ``log A``'s statistics on the start cut's pairs (queries ``w <= i <= n - 2``).
    """

    window: int
    n_buckets: int
    profile_sum: np.ndarray
    log_rho: np.ndarray
    prompt_ids: np.ndarray
    log_pattern: TargetStatistics

    def __repr__(self) -> str:
        _, n_layers, n_heads, n = self.profile_sum.shape
        return (f"StartCutStatistics(window={self.window}, prompts={len(self.prompt_ids)}, "
                f"n_tokens={n}, heads={n_layers}x{n_heads})")

    @property
    def n_tokens(self) -> int:
        return self.profile_sum.shape[-1]

    @property
    def buckets(self) -> np.ndarray:
        return np.asarray(self.prompt_ids) % self.n_buckets

    @property
    def nbytes(self) -> int:
        return self.profile_sum.nbytes + self.log_rho.nbytes + np.asarray(self.prompt_ids).nbytes

    @property
    def design(self) -> PairDesign:
        return self.log_pattern.design

    def arrays(self) -> dict[str, np.ndarray]:
        return {"profile_sum": self.profile_sum, "log_rho": self.log_rho,
                "prompt_ids": np.asarray(self.prompt_ids, dtype=np.int64),
                "log_pattern_xty": self.log_pattern.xty, "log_pattern_sumsq": self.log_pattern.sumsq,
                "log_pattern_count": self.log_pattern.count}

    @classmethod
    def from_arrays(cls, window: int, n_buckets: int, spec: PairSpec,
                    arrays: dict[str, np.ndarray]) -> StartCutStatistics:
        """From :meth:`arrays`; ``spec``: the run's pairs (the start cut's are derived)."""
        window, n_buckets = int(window), int(n_buckets)
        _, n_layers, n_heads, n = arrays["profile_sum"].shape
        log_pattern = TargetStatistics(
            PairDesign(start_cut_spec(spec, window, n), n), n_layers, n_heads, n_buckets,
            xty=arrays["log_pattern_xty"], sumsq=arrays["log_pattern_sumsq"],
            count=arrays["log_pattern_count"])
        return cls(window, n_buckets, arrays["profile_sum"], arrays["log_rho"],
                   np.asarray(arrays["prompt_ids"], dtype=np.int64), log_pattern)

    def merge(self, other: StartCutStatistics) -> StartCutStatistics:
        """Two runs over disjoint prompts (rows sorted by prompt id)."""
        if (self.window, self.n_buckets, self.profile_sum.shape) != (
                other.window, other.n_buckets, other.profile_sum.shape):
            raise ValueError("cannot merge start-cut statistics of different windows, bucket "
                             "counts or shapes. Fix: run every shard with the same --window.")
        ids = np.concatenate([self.prompt_ids, other.prompt_ids])
        order = np.argsort(ids, kind="stable")
        return StartCutStatistics(self.window, self.n_buckets, self.profile_sum + other.profile_sum,
                                  np.concatenate([self.log_rho, other.log_rho])[order], ids[order],
                                  self.log_pattern.merge(other.log_pattern))


@dataclass(repr=False)
class ConditionStatistics(Displayable):
    """Everything one condition (e.g. ``causal``, ``bidirectional``) accumulated."""

    condition: str
    targets: dict[str, TargetStatistics]
    sink_sum: np.ndarray  # [bucket, layer, head]: sum over prompts of mean_{i>=1} A[i, 0]
    position_zero: PositionZeroStatistics
    #: the start cut's window masses and profile (conditions under the model's own mask)
    start_cut: StartCutStatistics | None = None

    def _display_items(self):
        first = next(iter(self.targets.values()))
        with np.errstate(invalid="ignore", divide="ignore"):  # mean over prompts, per head
            scores = self.sink_sum.sum(0) / first.n_prompts
        return [("condition", self.condition), ("targets", len(self.targets)),
                ("prompts", first.n_prompts), ("n_tokens", first.design.n_tokens),
                ("heads", f"{first.n_layers} layers x {first.n_heads} heads"),
                ("max_sink_score", float(np.nanmax(scores)) if np.isfinite(scores).any() else float("nan")),
                ("position_zero_max_std", self.position_zero._max_std())]

    def merge(self, other: ConditionStatistics) -> ConditionStatistics:
        if self.condition != other.condition or set(self.targets) != set(other.targets):
            raise ValueError("cannot merge statistics of different conditions or targets.")
        if (self.start_cut is None) != (other.start_cut is None):
            raise ValueError("cannot merge statistics with and without the start cut's. Fix: "
                             "run every shard with the same settings.")
        return ConditionStatistics(
            self.condition,
            {t: s.merge(other.targets[t]) for t, s in self.targets.items()},
            self.sink_sum + other.sink_sum,
            self.position_zero.merge(other.position_zero),
            None if self.start_cut is None else self.start_cut.merge(other.start_cut),
        )

    @property
    def n_prompts(self) -> int:
        return next(iter(self.targets.values())).n_prompts


@dataclass(repr=False)
class RunStatistics(Displayable):
    """All conditions of one run, with the metadata needed to merge and trace it."""

    conditions: dict[str, ConditionStatistics]
    metadata: dict = field(default_factory=dict)
    prompts_done: list[int] = field(default_factory=list)
    #: the accumulators' running sums (checkpoints only; not merged)
    state: dict[str, np.ndarray] = field(default_factory=dict)

    def _display_items(self):
        first = next(iter(self.conditions.values()), None)
        items = [("prompts", len(self.prompts_done)), ("conditions", sorted(self.conditions))]
        if first is not None:
            stats = next(iter(first.targets.values()))
            nbytes = sum(t.nbytes for c in self.conditions.values() for t in c.targets.values())
            items += [("targets", len(first.targets)), ("n_tokens", stats.design.n_tokens),
                      ("heads", f"{stats.n_layers} layers x {stats.n_heads} heads"),
                      ("cell_maps", stats.has_cells), ("size", _megabytes(nbytes))]
        return items

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
                "start_cut_window": None if cond.start_cut is None else cond.start_cut.window,
            }
            if cond.start_cut is not None:
                for key, array in cond.start_cut.arrays().items():
                    arrays[f"{cname}/start_cut/{key}"] = array
            for tname, st in cond.targets.items():
                for key in ARRAY_FIELDS:
                    array = getattr(st, key)
                    if array is None:
                        continue
                    arrays[f"{cname}/{tname}/{key}"] = array
            arrays[f"{cname}/sink_sum"] = cond.sink_sum
            pz = cond.position_zero
            if pz.reference is not None:
                for key in ("reference", "dev_sum", "dev_sumsq", "max_abs_dev", "norm_sum",
                            "other_norm_sum"):
                    arrays[f"{cname}/position_zero/{key}"] = getattr(pz, key)
                arrays[f"{cname}/position_zero/value_min"] = pz.value_min
                arrays[f"{cname}/position_zero/value_max"] = pz.value_max
        for key, value in self.state.items():
            arrays[f"state/{key}"] = value
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as inner:  # np.savez's layout, readable by np.load
            for key, array in arrays.items():
                entry = io.BytesIO()
                np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)
                _write_entry(inner, f"{key}.npy", entry.getvalue())
        with atomic_path(path) as tmp:
            with zipfile.ZipFile(tmp, "w") as archive:
                _write_entry(archive, "header.json", json.dumps(header, sort_keys=True).encode())
                _write_entry(archive, "arrays.npz", buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, kind: str = "statistics file") -> RunStatistics:
        """Read a file written by :meth:`save`. ``kind`` names the file in errors
        (``"checkpoint"``, ``"shard"``): a file that is truncated or not ours raises
        :class:`StatisticsFileError` saying which, and what to do."""
        path = Path(path)
        if not path.is_file():
            raise StatisticsFileError(f"the {kind} {path} does not exist. Fix: check the path.")
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
                if "header.json" not in names or "arrays.npz" not in names:
                    raise StatisticsFileError(
                        f"{path} is a zip file but not a rope_leak {kind} (no header.json / "
                        "arrays.npz). Fix: pass a file written by rope_leak "
                        "(`rope-leak analyze --save-statistics`, shards, checkpoints).")
                header = json.loads(archive.read("header.json"))
                arrays = np.load(io.BytesIO(archive.read("arrays.npz")))
                arrays = {k: arrays[k] for k in arrays.files}
        except StatisticsFileError:
            raise
        except zipfile.BadZipFile as err:
            raise StatisticsFileError(
                f"the {kind} {path} is corrupt or incomplete ({err}; e.g. truncated by a "
                "crash or a full disk). Fix: delete it and rerun the run that wrote it.") from err
        except (OSError, ValueError, KeyError, EOFError, zipfile.LargeZipFile) as err:
            raise StatisticsFileError(
                f"the {kind} {path} is corrupt ({type(err).__name__}: {err}). Fix: delete it "
                "and rerun.") from err
        version = header.get("format_version") if isinstance(header, dict) else None
        if version != FORMAT_VERSION:
            raise StatisticsFileError(
                f"{path} has statistics format {version}; this rope_leak reads format "
                f"{FORMAT_VERSION}. Fix: rerun the analysis with this version.")
        try:
            conditions = {}
            for cname, info in header["conditions"].items():
                design = PairDesign(PairSpec(**info["spec"]), info["n_tokens"])
                n_layers, n_heads, n_buckets = info["shape"]
                targets = {
                    t: TargetStatistics(
                        design, n_layers, n_heads, n_buckets,
                        **{k: arrays.get(f"{cname}/{t}/{k}") for k in ARRAY_FIELDS},
                    )
                    for t in info["targets"]
                }
                pz = PositionZeroStatistics(count=info["position_zero_count"])
                if f"{cname}/position_zero/reference" in arrays:
                    for key in ("reference", "dev_sum", "dev_sumsq", "max_abs_dev", "norm_sum",
                                "other_norm_sum", "value_min", "value_max"):
                        setattr(pz, key, arrays[f"{cname}/position_zero/{key}"])
                start_cut = None
                if info.get("start_cut_window") is not None:
                    prefix = f"{cname}/start_cut/"
                    start_cut = StartCutStatistics.from_arrays(
                        info["start_cut_window"], n_buckets, design.spec,
                        {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
                conditions[cname] = ConditionStatistics(cname, targets, arrays[f"{cname}/sink_sum"], pz,
                                                        start_cut)
            state = {k[len("state/"):]: v for k, v in arrays.items() if k.startswith("state/")}
            return cls(conditions, header["metadata"], header["prompts_done"], state)
        except (KeyError, TypeError, ValueError) as err:
            raise StatisticsFileError(
                f"the {kind} {path} is inconsistent ({type(err).__name__}: {err}). Fix: delete "
                "it and rerun.") from err


#: Every zip entry's timestamp: fixed, so the same statistics give a byte-identical file.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _write_entry(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)
