"""Which (query i, key j) pairs are scored, and the position-only design over them.

Every position model of DESIGN.md §2 is a linear model in one-hot columns of the cell
(i, j): ``M_rel`` uses the offset ``i - j``; ``M_abs`` adds the absolute query ``i`` and
key ``j``. Since every prompt contributes one observation per cell, the least-squares
fits need only ``X^T y`` (sums by offset, by query and by key) and ``X^T X`` (shared
by all heads and prompts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np


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


@dataclass(frozen=True)
class PairDesign:
    """Cells of a :class:`PairSpec` at sequence length ``n`` and the design over them.

    Columns of the design are ordered ``[offsets | queries | keys]``; only offsets,
    queries and keys that occur in some cell get a column.
    """

    spec: PairSpec
    n_tokens: int

    @cached_property
    def cells(self) -> tuple[np.ndarray, np.ndarray]:
        """Query and key index of every scored cell, row-major (i, then j)."""
        n = self.n_tokens
        upper = n if self.spec.max_query is None else min(n, self.spec.max_query)
        first_key = 0 if self.spec.include_sink else 1
        queries, keys = [], []
        for i in range(max(self.spec.min_query, 0), upper):
            lowest = first_key if self.spec.max_offset is None else max(first_key, i - self.spec.max_offset + 1)
            js = np.arange(lowest, i + 1)
            queries.append(np.full(js.shape, i))
            keys.append(js)
        if not queries or sum(len(k) for k in keys) == 0:
            raise ValueError(
                f"no (query, key) pair satisfies {self.spec.label()} at n={n} tokens. "
                "Fix: use longer prompts or relax min_query/max_query."
            )
        return np.concatenate(queries), np.concatenate(keys)

    @property
    def n_cells(self) -> int:
        return len(self.cells[0])

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
    def offsets(self) -> np.ndarray:
        """Offsets ``d = i - j`` with a column, ascending."""
        queries, keys = self.cells
        return np.unique(queries - keys)

    @cached_property
    def queries(self) -> np.ndarray:
        return np.unique(self.cells[0])

    @cached_property
    def keys(self) -> np.ndarray:
        return np.unique(self.cells[1])

    @property
    def n_columns(self) -> int:
        return len(self.offsets) + len(self.queries) + len(self.keys)

    @property
    def relative_columns(self) -> slice:
        return slice(0, len(self.offsets))

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
        """``X^T X`` over the cells (one observation per cell)."""
        cols = self.cell_columns
        gram = np.zeros((self.n_columns, self.n_columns))
        for a in range(3):
            for b in range(3):
                np.add.at(gram, (cols[:, a], cols[:, b]), 1.0)
        return gram

    def design_matrix(self) -> np.ndarray:
        """Dense one-hot ``X`` (``[n_cells, n_columns]``); for tests and small n only."""
        X = np.zeros((self.n_cells, self.n_columns))
        rows = np.arange(self.n_cells)
        for a in range(3):
            X[rows, self.cell_columns[:, a]] = 1.0
        return X
