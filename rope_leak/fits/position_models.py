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
replaced by an eigendecomposition of ``S``. Memory is ``O(n^2)`` for ``S`` alone, so long
prompts (n = 4096: 0.5 GB) fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from jaxtyping import Float

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


def _schur_complement(design: PairDesign, block: int = 1024) -> np.ndarray:
    """``S = X_A^T X_A - C^T N^{-1} C`` built in row blocks (no second ``m x m`` array)."""
    s = design.absolute_gram()
    c = design.offset_incidence()
    c_scaled = torch.from_numpy(c / design.offset_count[:, None])
    c_t = torch.from_numpy(c)
    s_t = torch.from_numpy(s)
    for start in range(0, s.shape[0], block):
        s_t[start:start + block] -= c_scaled[:, start:start + block].T @ c_t
    return s


def _singular_directions(design: PairDesign) -> np.ndarray:
    """Orthonormal ``[m, 3]`` basis of ``b[i] = α + t i``, ``c[j] = β - t j``."""
    nq, nk = len(design.queries), len(design.keys)
    ones_q = np.concatenate([np.ones(nq), np.zeros(nk)])
    ones_k = np.concatenate([np.zeros(nq), np.ones(nk)])
    trend = np.concatenate([design.queries, -design.keys]).astype(float)
    basis, singular, _ = np.linalg.svd(np.stack([ones_q, ones_k, trend], 1), full_matrices=False)
    return basis[:, singular > singular.max() * 1e-12]


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
            factor, info = torch.linalg.cholesky_ex(s_t)
            pivots = torch.diagonal(factor) ** 2
            if int(info) == 0 and float(pivots.min()) > 1e-10 * float(pivots.max()):
                return AbsoluteProjector(design, factor.numpy(), "cholesky")
            s = _schur_complement(design)  # s was modified in place
        if method == "cholesky":
            raise np.linalg.LinAlgError(
                "this pair set has singular directions beyond the three of every design; "
                "use method='eigh'.")
    eigval, eigvec = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(s)))
    keep = eigval > design.column_count.max() * 1e-10  # S's scale is a cell count
    return AbsoluteProjector(design, eigvec[:, keep] / np.sqrt(eigval[keep]), "eigh")
