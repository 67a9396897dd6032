"""The algebra of the position models over a :class:`PairDesign`, from ``X^T y`` alone.

``M_rel: y ~ a[i - j]`` has a diagonal Gram (cells per offset), so its fit is the offset
means. ``M_abs: y ~ a[i - j] + b[i] + c[j]`` nests it. Eliminating the offsets (a Schur
complement), what ``M_abs`` adds to ``M_rel`` is the projection of ``y`` onto the
query and key columns *after* their offset part is removed:

    u = X_A^T y - C^T N^{-1} X_R^T y        S = X_A^T X_A - C^T N^{-1} C

(``X_R``/``X_A``: offset / query-and-key columns, ``N`` = cells per offset, ``C =
X_R^T X_A``), and ``||(H_abs - H_rel) y||^2 = u^T S^+ u``. ``S`` is ``2n x 2n`` and
depends on the pair set only; ``u`` needs only the ``3 n`` sums of ``X^T y``, because
each query row and key column meets a contiguous range of diagonals (a prefix sum).

``S`` is singular along three known directions (a constant on the queries, a constant
on the keys, and ``b[i] = i, c[j] = -j``, which are functions of ``i - j``), and every
``u`` is orthogonal to them. So ``(S + s V V^T)^{-1}`` (``V`` an orthonormal basis of
those directions) acts as ``S^+`` on every ``u``, and its Cholesky factor ``L`` gives
coordinates ``z = L^{-1} u`` with ``z.z' = ||(H_abs - H_rel) y||``-inner products. For
designs with further singular directions (e.g. a single scored row) the factor is
replaced by an eigendecomposition of ``S``. Memory is one ``m x m`` array (``m ~ 2 n``;
0.5 GB at n = 4096): ``S`` is filled in row blocks from prefix sums and factored in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from jaxtyping import Float
from scipy.linalg.lapack import dpotrf

from rope_leak.engine.pairs import PairDesign


def offset_means(design: PairDesign, xty: Float[np.ndarray, "... column"]) -> np.ndarray:
    """``M_rel``'s coefficients ``a[d]`` from ``X^T y`` (one observation per cell)."""
    return xty[..., design.relative_columns] / design.offset_count


@dataclass(frozen=True)
class AbsoluteProjector:
    """Coordinates of the part of ``y`` that needs absolute position (``M_abs`` beyond
    ``M_rel``), from ``X^T y``: ``project(xty) . project(xty') = <D y, D y'>`` with
    ``D = H_abs - H_rel``."""

    design: PairDesign
    factor: np.ndarray  # [m, m] lower Cholesky factor, or [m, rank] eigen basis (V Λ^-1/2)
    method: str  # "cholesky" or "eigh"

    @property
    def rank(self) -> int:
        return self.factor.shape[1]

    def residual_columns(self, xty: Float[np.ndarray, "... column"]) -> np.ndarray:
        """``u = X_A^T y - C^T N^{-1} X_R^T y``: the query and key sums left after the
        offsets' fit (``[..., m]``), through prefix sums over the diagonals."""
        design = self.design
        means = offset_means(design, xty)
        prefix = np.concatenate([np.zeros(means.shape[:-1] + (1,)), np.cumsum(means, -1)], -1)
        lo, hi = design.offset_ranges
        return xty[..., design.absolute_columns] - (prefix[..., hi + 1] - prefix[..., lo])

    def project(self, xty: Float[np.ndarray, "... column"], chunk: int = 4096) -> np.ndarray:
        """``[..., rank]`` absolute-position coordinates of each ``X^T y``."""
        lead = xty.shape[:-1]
        flat = xty.reshape(-1, xty.shape[-1])
        out = np.empty((flat.shape[0], self.rank))
        factor = torch.from_numpy(self.factor)
        for start in range(0, len(flat), chunk):
            u = torch.from_numpy(np.ascontiguousarray(self.residual_columns(flat[start:start + chunk])))
            if self.method == "cholesky":
                z = torch.linalg.solve_triangular(factor, u.T, upper=False).T
            else:
                z = u @ factor
            out[start:start + chunk] = z.numpy()
        return out.reshape(lead + (self.rank,))

    def coefficients(self, xty_mean: Float[np.ndarray, "... column"]) -> np.ndarray:
        """``M_abs``'s coefficients ``[a | b | c]`` (``[..., column]``) for per-prompt
        sums ``X^T y`` (fitted values are unique; the coefficients are the solution
        orthogonal to the three singular directions)."""
        design = self.design
        u = torch.from_numpy(np.ascontiguousarray(self.residual_columns(xty_mean).reshape(-1, self._m)))
        factor = torch.from_numpy(self.factor)
        if self.method == "cholesky":
            bc = torch.cholesky_solve(u.T, factor, upper=False).T.numpy()
        else:
            bc = ((u @ factor) @ factor.T).numpy()
        bc = bc.reshape(xty_mean.shape[:-1] + (self._m,))
        # offsets: a[d] = (X_R^T y - C [b; c])[d] / N_d, C through difference arrays
        lo, hi = design.offset_ranges
        n_off = len(design.offsets)
        change = np.zeros(bc.shape[:-1] + (n_off + 1,))
        for k in range(self._m):  # a loop over columns, each a vectorised update
            change[..., lo[k]] += bc[..., k]
            change[..., hi[k] + 1] -= bc[..., k]
        c_bc = np.cumsum(change, -1)[..., :n_off]
        a = (xty_mean[..., design.relative_columns] - c_bc) / design.offset_count
        return np.concatenate([a, bc], -1)

    @property
    def _m(self) -> int:
        return self.factor.shape[0]


def _schur_complement(design: PairDesign, block: int = 128) -> np.ndarray:
    """``S = X_A^T X_A - C^T N^{-1} C``, the only ``m x m`` array built.

    Each query row and key column meets a contiguous range of diagonals
    (:attr:`PairDesign.offset_ranges`), so ``(C^T N^{-1} C)[p, q]`` is the sum of
    ``1 / N_d`` over the overlap of two ranges: a difference of prefix sums, accumulated
    in extended precision (so the difference of two sums near ``log n`` keeps float64
    accuracy even for one-diagonal overlaps). Filled in row blocks: no ``n x m``
    incidence matrix and no matrix product."""
    q, k = design.queries, design.keys
    nq, m = len(q), len(q) + len(k)
    lo, hi = design.offset_ranges
    prefix = np.concatenate([[0.0], np.cumsum(1.0 / design.offset_count.astype(np.longdouble))])
    counts = design.column_count[len(design.offsets):]
    key_start = design.key_start[q]
    s = np.empty((m, m))
    for start in range(0, m, block):
        stop = min(start + block, m)
        first = np.maximum(lo[start:stop, None], lo[None, :])
        last = np.minimum(hi[start:stop, None], hi[None, :])
        out = s[start:stop]
        np.subtract(prefix[first], prefix[np.maximum(last + 1, first)], out=out, casting="same_kind")
        del first, last
        # X_A^T X_A: cells per query / key on the diagonal, 1 where query row i holds key j
        r = np.arange(start, stop)
        out[r - start, r] += counts[r]
        rq, rk = r[r < nq], r[r >= nq] - nq
        if len(rq):
            out[:len(rq), nq:] += (k[None, :] >= key_start[rq, None]) & (k[None, :] <= q[rq, None])
        if len(rk):
            out[len(rq):, :nq] += (key_start[None, :] <= k[rk, None]) & (q[None, :] >= k[rk, None])
    return s


def _singular_directions(design: PairDesign) -> np.ndarray:
    """Orthonormal ``[m, 3]`` basis of ``b[i] = α + t i``, ``c[j] = β - t j``."""
    nq, nk = len(design.queries), len(design.keys)
    ones_q = np.concatenate([np.ones(nq), np.zeros(nk)])
    ones_k = np.concatenate([np.zeros(nq), np.ones(nk)])
    trend = np.concatenate([design.queries, -design.keys]).astype(float)
    basis, singular, _ = np.linalg.svd(np.stack([ones_q, ones_k, trend], 1), full_matrices=False)
    return basis[:, singular > singular.max() * 1e-12]


def _cholesky_in_place(s: np.ndarray) -> tuple[np.ndarray, int]:
    """Lower Cholesky factor of the symmetric C-ordered ``s``, written over ``s`` (LAPACK
    ``potrf`` on the column-major view ``s.T``: its upper factor is ``s``'s lower one), so
    that no second ``m x m`` array exists. Returns the factor (upper triangle zeroed; a
    view of ``s``) and LAPACK's ``info`` (0: positive definite)."""
    upper, info = dpotrf(s.T, lower=0, clean=1, overwrite_a=1)
    if not np.shares_memory(upper, s):  # the wrapper copied: keep one array alive
        s[...] = upper.T
        del upper
        return s, int(info)
    return upper.T, int(info)


@lru_cache(maxsize=8)
def absolute_projector(design: PairDesign, method: str = "auto") -> AbsoluteProjector:
    """The projector of ``design`` (cached: it depends on the pair set only).

    ``method``: ``"cholesky"`` (fast, ``m^2`` memory), ``"eigh"`` (any design), or
    ``"auto"`` (Cholesky, checked, falling back to eigh)."""
    s = _schur_complement(design)
    if method in ("auto", "cholesky"):
        v = _singular_directions(design)
        scale = float(np.mean(np.diag(s)))
        residual = np.abs(s @ v).max() if v.size else 0.0
        if residual <= 1e-9 * scale:
            s_t = torch.from_numpy(s)
            s_t.addmm_(torch.from_numpy(v), torch.from_numpy(v.T), alpha=scale)  # in place
            factor, info = _cholesky_in_place(s)
            pivots = np.diagonal(factor) ** 2
            if info == 0 and float(pivots.min()) > 1e-10 * float(pivots.max()):
                return AbsoluteProjector(design, factor, "cholesky")
            del factor
            s = _schur_complement(design)  # s was overwritten by the factor
        if method == "cholesky":
            raise np.linalg.LinAlgError(
                "this pair set has singular directions beyond the three of every design; "
                "use method='eigh'.")
    eigval, eigvec = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(s)))
    keep = eigval > design.column_count.max() * 1e-10  # S's scale is a cell count
    return AbsoluteProjector(design, eigvec[:, keep] / np.sqrt(eigval[keep]), "eigh")
