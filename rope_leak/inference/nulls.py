"""Per-head p-values for "absolute-position share > 0" against nulls with the same design
(same ``M_rel`` / ``M_abs`` parameters) and the same prompts.

Two nulls, both for ``H0: the cell means are purely relative`` (``μ = a[i - j]``, i.e.
``Dμ = 0`` with ``D = H_abs - H_rel``):

* :func:`signflip_null` (recommended default). Prompts are independent; under H0 the
  absolute-position part of a bucket sum, ``D S_g = Σ_{p in g} D ε_p``, has mean zero,
  and if its law is symmetric (exact for symmetric noise, a CLT approximation otherwise)
  flipping the signs of the ``D S_g`` independently leaves the joint law unchanged. The
  statistic is the debiased share's numerator ``||Σ_g D S_g||² - Σ_g ||D S_g||²``
  (:mod:`rope_leak.fits.debias`), whose flipped versions are ``||Σ_g e_g D S_g||² - ...``.
  Because whole buckets are flipped, any correlation of the noise *within* a prompt (token
  content shared across cells, key-specific effects) is kept: the null is cluster-robust,
  like the bootstrap. Resolution: ``2^(G-1)`` distinct flips for ``G`` non-empty buckets.
* :func:`permutation_null` (within offset diagonals). Under H0
  with noise exchangeable across the cells of each diagonal ``i - j = d``, permuting those
  cells leaves the law of the fold-level cell sums unchanged; the same permutation is
  applied to both folds' ``cell_sum`` (so each cell keeps its pair of fold sums), which
  keeps the relative structure and every fold's sum of squares and total (hence SST) and
  destroys any absolute one. The statistic is the cross-fitted share itself, recomputed
  from the permuted cell sums. Exact only when the noise is exchangeable within diagonals:
  heteroscedastic noise (``pattern`` at small ``i``) or noise correlated within a prompt
  (shared key content) breaks that, in either direction; prefer the sign-flip null on real
  models and use this one as a cross-check.

p-values are ``(1 + #{null >= observed}) / (1 + R)`` (never 0, valid for finite R).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from rope_leak.engine.statistics import TargetStatistics
from rope_leak.fits.projection import BucketProjection, absolute_basis, safe_ratio


@dataclass
class NullResult:
    """``observed`` and ``pvalues``: ``[layer, head]``; ``null`` (if kept): ``[R, layer, head]``,
    in the same units as ``observed``."""

    observed: np.ndarray
    pvalues: np.ndarray
    n_resamples: int
    method: str
    null: np.ndarray | None = None


def _pvalues(observed: np.ndarray, exceed: np.ndarray, n: int) -> np.ndarray:
    p = (1.0 + exceed) / (1.0 + n)
    return np.where(np.isfinite(observed), p, np.nan)


def _exceeds(null: np.ndarray, observed: np.ndarray) -> np.ndarray:
    tol = 1e-10 * np.abs(observed)
    return (null >= observed - tol).sum(0)


def signflip_null(
    stats: TargetStatistics, n_flips: int = 2000, seed: int = 0, keep_null: bool = False,
    batch_size: int = 500,
) -> NullResult:
    """Sign-flip p-values of the debiased share, per head (``observed`` = debiased share)."""
    bp = BucketProjection.from_statistics(stats)
    nonempty = bp.count > 0
    z = bp.z[nonempty]  # [G', layer, head, rank]
    if len(z) < 2:
        raise ValueError("the sign-flip null needs prompts in at least two buckets.")
    gram = np.einsum("glhr,klhr->lhgk", z, z)  # [layer, head, G', G']
    diag = np.einsum("lhgg->lh", gram)
    stat_obs = gram.sum((-1, -2)) - diag
    observed = bp.debiased_share()[0]
    scale = safe_ratio(observed, np.abs(stat_obs)) * np.sign(stat_obs)  # share per unit
    rng = np.random.default_rng(seed)
    exceed = np.zeros(observed.shape)
    kept = []
    for start in range(0, n_flips, batch_size):
        b = min(batch_size, n_flips - start)
        e = rng.choice([-1.0, 1.0], size=(b, len(z)))
        stat = np.einsum("bg,lhgk,bk->blh", e, gram, e, optimize=True) - diag
        exceed += _exceeds(stat, stat_obs)
        if keep_null:
            kept.append(stat * scale)
    return NullResult(
        observed, _pvalues(observed, exceed, n_flips), n_flips, "signflip",
        np.concatenate(kept) if keep_null else None,
    )


def diagonal_permutations(stats_or_design, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_perm, cell]`` permutations of the scored cells, each within offset diagonals:
    ``perm[r, k]`` is a cell with the same ``i - j`` as cell ``k``."""
    design = getattr(stats_or_design, "design", stats_or_design)
    queries, keys = design.cells
    offset = queries - keys
    order = np.argsort(offset, kind="stable")
    perms = np.empty((n_perm, design.n_cells), dtype=np.int64)
    for r in range(n_perm):
        perms[r, order] = np.lexsort((rng.random(design.n_cells), offset))
    return perms


def permutation_null(
    stats: TargetStatistics, n_perm: int = 200, seed: int = 0, keep_null: bool = False,
) -> NullResult:
    """Within-diagonal permutation p-values of the cross-fitted share, per head."""
    design = stats.design
    w = absolute_basis(design)
    n_l, n_h = stats.n_layers, stats.n_heads
    n_fold = stats.fold_count.astype(float)
    if np.any(n_fold <= 0):
        raise ValueError("cross-fitting needs prompts in both folds.")
    # fold totals for SST (invariant under the permutation)
    sst = []
    for f in (0, 1):
        total = stats.xty[f::2][..., design.relative_columns].sum((0, -1))
        sumsq = stats.sumsq[f::2].sum(0)
        sst.append(sumsq - total**2 / (n_fold[f] * design.n_cells))
    cells_t = np.ascontiguousarray(stats.fold_cell_sums().reshape(2 * n_l * n_h, design.n_cells).T)
    # Offset sums are invariant under within-diagonal permutations: only the query and
    # key columns of X^T c need recomputing.
    n_off = len(design.offsets)
    qk_rows = (design.cell_columns[:, 1:] - n_off).T.ravel()  # [2 * cell]
    all_cols = np.arange(design.n_cells)
    z_off = w[:n_off].T @ sp.csr_matrix(
        (np.ones(design.n_cells), (design.cell_columns[:, 0], all_cols)),
        shape=(n_off, design.n_cells),
    ).dot(cells_t)  # [rank, 2 * layer * head]
    w_qk_t = np.ascontiguousarray(w[n_off:].T)

    def share(perm: np.ndarray) -> np.ndarray:
        # (X^T c')[col] = sum_k X[k, col] * S[perm[k]], query and key columns only
        a = sp.csr_matrix(
            (np.ones(2 * design.n_cells), (qk_rows, np.tile(perm, 2))),
            shape=(design.n_columns - n_off, design.n_cells),
        )
        z = (z_off + w_qk_t @ (a @ cells_t)).T.reshape(2, n_l, n_h, -1)
        out = 0.0
        for fa, fb in ((0, 1), (1, 0)):
            na, nb = n_fold[fa], n_fold[fb]
            num = 2 * (z[fa] * z[fb]).sum(-1) / na - nb * (z[fa] ** 2).sum(-1) / na**2
            out = out + safe_ratio(num, sst[fb])
        return out / 2

    observed = share(np.arange(design.n_cells))
    rng = np.random.default_rng(seed)
    exceed = np.zeros(observed.shape)
    kept = []
    for perm in diagonal_permutations(design, n_perm, rng):
        null = share(perm)
        exceed += _exceeds(null[None], observed)
        if keep_null:
            kept.append(null)
    return NullResult(
        observed, _pvalues(observed, exceed, n_perm), n_perm, "permutation",
        np.stack(kept) if keep_null else None,
    )
