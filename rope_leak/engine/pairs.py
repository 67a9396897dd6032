"""Which (query i, key j) pairs are scored, and the position-only design over them.

Every position model is a linear model in one-hot columns of the cell (i, j): ``M_rel``
uses the offset ``i - j``; ``M_abs`` adds the absolute query ``i`` and key ``j``. Since
every prompt contributes one observation per cell, the least-squares fits need only
``X^T y`` (sums of ``y`` by offset, by query and by key: ``3 n`` numbers) and ``X^T X``,
which depends on the pair set alone.

Every pair set used here is, row by row, one contiguous key range ``lo_i <= j <= i``, so
the design is described in ``O(n)`` numbers (:attr:`PairDesign.key_start`). Per-cell
arrays (:attr:`PairDesign.cells`, :meth:`PairDesign.design_matrix`, the dense
:attr:`PairDesign.gram`) are ``O(n^2)``; they exist for per-cell maps, tests and
references, and the fits never build them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import cached_property

import numpy as np
import torch


@dataclass(frozen=True)
class PairSpec:
    """The (query, key) cells a share is computed over.

    Attributes:
        include_sink: include key 0 (the sink column). Excluded by default.
        min_query: smallest query position scored.
        max_query: score only queries ``i < max_query`` ("early queries"); None = all.
        max_offset: score only pairs with ``i - j < max_offset`` (set to the sliding
            window when a model's local layers cannot see further); None = all.
    """

    include_sink: bool = False
    min_query: int = 1
    max_query: int | None = None
    max_offset: int | None = None

    def __post_init__(self) -> None:
        if self.min_query < 0:
            raise ValueError(
                f"min_query (--min-query) must be >= 0, got {self.min_query}. Fix: pass a "
                "query position >= 0 (default 1)."
            )
        if self.max_query is not None and self.max_query <= self.min_query:
            raise ValueError(
                f"max_query (--max-query {self.max_query}) must exceed min_query "
                f"(--min-query {self.min_query}): no query would be scored. Fix: raise "
                "--max-query or lower --min-query."
            )

        if self.max_offset is not None and self.max_offset < 1:
            raise ValueError(f"max_offset must be >= 1, got {self.max_offset}.")

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        upper = "n" if self.max_query is None else str(self.max_query)
        keys = "0" if self.include_sink else "1"
        window = "" if self.max_offset is None else f",i-j<{self.max_offset}"
        return f"{self.min_query}<=i<{upper},{keys}<=j<=i{window}"


def start_cut_spec(spec: PairSpec, window: int, n_tokens: int) -> PairSpec:
    """The start cut's pairs at length ``n_tokens``: ``spec`` with queries ``i < w`` and the
    last query ``i = n - 1`` left out.

    The profile reaches offset ``n - 2`` (its keys are ``j >= 1``), so every query's past is
    completed up to that offset. The last query alone sees a key at offset ``n - 1`` (key 0),
    so its completed row would be one offset longer than the others'; that alone gives a
    relative head a cross term (0.05 x SS for a cosine sum at n = 64)."""
    if spec.max_query is not None and spec.max_query <= max(spec.min_query, window):
        raise ValueError(
            f"the start cut scores queries i >= w = {window}, but the pairs end at query "
            f"{spec.max_query} (--max-query). Fix: use a smaller window (--window "
            f"{max(1, spec.max_query // 4)}) for early queries, or raise --max-query.")
    last = n_tokens - 1
    return replace(spec, min_query=max(spec.min_query, window),
                   max_query=last if spec.max_query is None else min(spec.max_query, last))


@dataclass(frozen=True)
class PairDesign:
    """Cells of a :class:`PairSpec` at sequence length ``n`` and the design over them.

    Columns of the design are ordered ``[offsets | queries | keys]``; only offsets,
    queries and keys that occur in some cell get a column.
    """

    spec: PairSpec
    n_tokens: int

    # -- O(n) description ------------------------------------------------------------
    @cached_property
    def key_start(self) -> np.ndarray:
        """``[n]``: first scored key of each query row; row ``i`` scores keys
        ``key_start[i] <= j <= i``, and is empty when ``key_start[i] > i``."""
        n, spec = self.n_tokens, self.spec
        i = np.arange(n)
        lo = np.full(n, 0 if spec.include_sink else 1)
        if spec.max_offset is not None:
            lo = np.maximum(lo, i - spec.max_offset + 1)
        upper = n if spec.max_query is None else min(n, spec.max_query)
        outside = (i < spec.min_query) | (i >= upper)
        lo[outside] = i[outside] + 1  # empty rows
        if not np.any(lo <= i):
            raise ValueError(
                f"no (query, key) pair satisfies {spec.label()} at n={n} tokens. "
                "Fix: use longer prompts or relax min_query/max_query."
            )
        return lo

    @cached_property
    def row_count(self) -> np.ndarray:
        """``[n]``: scored cells in each query row."""
        return np.clip(np.arange(self.n_tokens) - self.key_start + 1, 0, None)

    @property
    def n_cells(self) -> int:
        return int(self.row_count.sum())

    @cached_property
    def queries(self) -> np.ndarray:
        """Query positions with a column (rows with at least one scored cell)."""
        return np.flatnonzero(self.row_count > 0)

    @cached_property
    def offsets(self) -> np.ndarray:
        """Offsets ``d = i - j`` with a column, ascending (always ``0..max``)."""
        return np.arange(int(self.row_count.max()))

    @cached_property
    def key_count(self) -> np.ndarray:
        """``[n]``: scored cells in each key column."""
        n = self.n_tokens
        rows = self.queries
        change = np.zeros(n + 1)
        np.add.at(change, self.key_start[rows], 1.0)
        np.add.at(change, rows + 1, -1.0)
        return np.cumsum(change[:n])

    @cached_property
    def offset_count(self) -> np.ndarray:
        """``[len(offsets)]``: scored cells on each diagonal ``i - j = d``."""
        counts = self.row_count[self.queries]
        return np.array([(counts > d).sum() for d in self.offsets], dtype=float)

    @cached_property
    def keys(self) -> np.ndarray:
        return np.flatnonzero(self.key_count > 0)

    @property
    def n_columns(self) -> int:
        return len(self.offsets) + len(self.queries) + len(self.keys)

    @property
    def relative_columns(self) -> slice:
        return slice(0, len(self.offsets))

    @property
    def absolute_columns(self) -> slice:
        return slice(len(self.offsets), self.n_columns)

    @cached_property
    def column_count(self) -> np.ndarray:
        """Diagonal of ``X^T X``: cells per offset, per query and per key."""
        return np.concatenate([self.offset_count, self.row_count[self.queries],
                               self.key_count[self.keys]])

    @cached_property
    def offset_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """For every absolute column (queries, then keys), the first and last offset
        whose diagonal passes through it: ``[d_lo, d_hi]``, always contiguous because
        every row's keys are a contiguous range ending at the diagonal and the range's
        start never decreases with the row."""
        q = self.queries
        q_lo, q_hi = np.zeros(len(q), dtype=np.int64), self.row_count[q] - 1
        # rows holding key k: from max(k, first row) to the last row whose range starts
        # at or before k
        rows = self.queries
        first = np.maximum(self.keys, rows[0])
        last = rows[np.searchsorted(self.key_start[rows], self.keys, side="right") - 1]
        return (np.concatenate([q_lo, first - self.keys]),
                np.concatenate([q_hi, last - self.keys]))

    def offset_incidence(self) -> np.ndarray:
        """``C = X_rel^T X_abs`` (``[offset, query | key]``, ``O(n^2)``): 1 where the
        offset's diagonal passes through that query row or key column."""
        lo, hi = self.offset_ranges
        d = self.offsets[:, None]
        return ((d >= lo[None, :]) & (d <= hi[None, :])).astype(float)

    def absolute_gram(self) -> np.ndarray:
        """``X_abs^T X_abs`` (``[query | key]`` square, ``O(n^2)``)."""
        nq = len(self.queries)
        q, k = self.queries, self.keys
        cross = ((k[None, :] >= self.key_start[q][:, None]) & (k[None, :] <= q[:, None])).astype(float)
        out = np.zeros((nq + len(k), nq + len(k)))
        out[:nq, :nq] = np.diag(self.row_count[q].astype(float))
        out[nq:, nq:] = np.diag(self.key_count[k])
        out[:nq, nq:] = cross
        out[nq:, :nq] = cross.T
        return out

    def index(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The design's columns (``offsets``, ``queries``, ``keys``), ``key_start`` (capped
        at ``n``) and ``row_count`` (float64) as tensors on ``device``, made once per device
        (the streaming pass reads them for every layer of every batch)."""
        cache = self.__dict__.setdefault("_index", {})
        key = str(device)
        if key not in cache:
            as_long = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long, device=device)  # noqa: E731
            cache[key] = {"offsets": as_long(self.offsets), "queries": as_long(self.queries),
                          "keys": as_long(self.keys),
                          "key_start": as_long(np.minimum(self.key_start, self.n_tokens)),
                          "row_count": torch.as_tensor(self.row_count, dtype=torch.float64, device=device)}
        return cache[key]

    @cached_property
    def _column_selectors(self) -> tuple[slice | np.ndarray, ...]:
        """``offsets``, ``queries`` and ``keys`` as slices where they are ranges (the usual
        case: a slice is a view, an index a gathered copy), else as index arrays."""
        def selector(index: np.ndarray) -> slice | np.ndarray:
            if len(index) and (np.diff(index) == 1).all():
                return slice(int(index[0]), int(index[-1]) + 1)
            return index
        return tuple(selector(a) for a in (self.offsets, self.queries, self.keys))

    def columns(self, by_offset: torch.Tensor, by_query: torch.Tensor, by_key: torch.Tensor) -> torch.Tensor:
        """``X^T y`` (``[..., column]``) from a response's sums over the scored cells by
        offset ``i - j``, by query ``i`` and by key ``j`` (each ``[..., n]``).

        >>> design = PairDesign(PairSpec(), 4)
        >>> sums = torch.arange(4.0)
        >>> design.columns(sums, sums, sums).tolist() == [0.0, 1.0, 2.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
        True
        """
        parts = []
        for name, sums, select in zip(("offsets", "queries", "keys"), (by_offset, by_query, by_key),
                                      self._column_selectors):
            parts.append(sums[..., select if isinstance(select, slice) else self.index(sums.device)[name]])
        return torch.cat(parts, -1)

    def row_xty(self, row_sum: torch.Tensor) -> torch.Tensor:
        """``X^T y`` (``[..., column]``) of responses constant along each query row, from
        their row sums ``[..., n]`` (float64, on any device): row ``i`` adds ``r_i`` to
        offsets ``0..n_i - 1`` and keys ``lo_i..i``, and ``n_i r_i`` to its query
        (difference arrays, ``O(n)``)."""
        n = self.n_tokens
        device = row_sum.device
        index = self.index(device)
        rows, row_count, key_start = index["queries"], index["row_count"], index["key_start"]
        lead = row_sum.shape[:-1]
        r = row_sum[..., rows]

        def ranges(starts: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:  # sum of r over [start, stop)
            change = torch.zeros(lead + (n + 1,), dtype=row_sum.dtype, device=device)
            change.index_add_(-1, starts, r)
            change.index_add_(-1, stops, -r)
            return change.cumsum(-1)[..., :n]

        counts = row_count[rows].long()
        by_offset = ranges(torch.zeros_like(rows), counts)
        by_key = ranges(key_start[rows], rows + 1)
        return self.columns(by_offset, row_sum * row_count, by_key)

    # -- per-cell arrays (O(n^2): maps, tests and references) ------------------------
    @cached_property
    def cells(self) -> tuple[np.ndarray, np.ndarray]:
        """Query and key index of every scored cell, row-major (i, then j)."""
        rows = self.queries
        queries = np.repeat(rows, self.row_count[rows])
        starts = np.repeat(self.key_start[rows], self.row_count[rows])
        first = np.repeat(np.cumsum(self.row_count[rows]) - self.row_count[rows], self.row_count[rows])
        keys = starts + np.arange(len(queries)) - first
        return queries, keys

    @cached_property
    def flat_index(self) -> np.ndarray:
        """Index of each cell in a flattened ``[n, n]`` matrix."""
        queries, keys = self.cells
        return queries * self.n_tokens + keys

    @cached_property
    def cell_mask(self) -> np.ndarray:
        mask = np.zeros((self.n_tokens, self.n_tokens), dtype=bool)
        mask[self.cells] = True
        return mask

    @cached_property
    def cell_columns(self) -> np.ndarray:
        """``[n_cells, 3]``: the offset, query and key column of each cell."""
        queries, keys = self.cells
        n_off, n_q = len(self.offsets), len(self.queries)
        offset_col = np.searchsorted(self.offsets, queries - keys)
        query_col = n_off + np.searchsorted(self.queries, queries)
        key_col = n_off + n_q + np.searchsorted(self.keys, keys)
        return np.stack([offset_col, query_col, key_col], axis=1)

    @cached_property
    def gram(self) -> np.ndarray:
        """Dense ``X^T X`` (``O(n^2)``; the fits use :class:`AbsoluteProjector`)."""
        n_off = len(self.offsets)
        gram = np.zeros((self.n_columns, self.n_columns))
        gram[:n_off, :n_off] = np.diag(self.offset_count)
        incidence = self.offset_incidence()
        gram[:n_off, n_off:] = incidence
        gram[n_off:, :n_off] = incidence.T
        gram[n_off:, n_off:] = self.absolute_gram()
        return gram

    def design_matrix(self) -> np.ndarray:
        """Dense one-hot ``X`` (``[n_cells, n_columns]``); for tests and small n only."""
        X = np.zeros((self.n_cells, self.n_columns))
        rows = np.arange(self.n_cells)
        for a in range(3):
            X[rows, self.cell_columns[:, a]] = 1.0
        return X
