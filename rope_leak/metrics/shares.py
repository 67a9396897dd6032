"""Absolute-position share of every head, fitted exactly from sufficient statistics.

Models (DESIGN.md §2), all least squares over the scored cells:

* ``M_rel``:  ``y ~ a[i - j]``            (saturated relative baseline)
* ``M_abs``:  ``y ~ a[i - j] + b[i] + c[j]``
* ``M_cell``: ``y ~ mean of cell (i, j)``  (ceiling of any position-only model)

Cross-fitting: fit on the even prompts, score on the odd ones, and the reverse; R² of
each direction uses the scored fold's own total sum of squares; the two are averaged.
``share = R²(M_abs) - R²(M_rel)``. Since every prompt contributes one observation per
cell, a fit on fold ``a`` needs only ``m_a = X^T y_a / N_a`` and the shared Gram
``G = X^T X``; its error on fold ``b`` is
``SSE_b = sum y_b^2 - 2 beta_a . X^T y_b + N_b beta_a^T G beta_a``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from rope_leak.engine.pairs import PairDesign
from rope_leak.engine.statistics import CellStatistics


@dataclass
class ShareFit:
    """R² of each position model and the absolute-position share, ``[layer, head]``."""

    r2_rel: np.ndarray
    r2_abs: np.ndarray
    r2_cell: np.ndarray | None
    r2_rel_in: np.ndarray  # in-sample, all prompts
    r2_abs_in: np.ndarray
    n_prompts: int

    @property
    def share(self) -> np.ndarray:
        return self.r2_abs - self.r2_rel

    @property
    def share_in_sample(self) -> np.ndarray:
        return self.r2_abs_in - self.r2_rel_in


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` in float64 through torch: a 3-operand einsum does not use BLAS, and numpy's
    BLAS thread pool contends with torch's on a busy CPU (measured 0.2-1.4 s vs 0.09 s for
    [30, 9, 766] @ [766, 766] on 2 shared cores)."""
    import torch

    return (torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(np.ascontiguousarray(b))).numpy()


@lru_cache(maxsize=16)
def _gram_pinv(design: PairDesign) -> np.ndarray:
    """Moore–Penrose inverse of ``X^T X`` (rank-deficient: offsets, queries and keys
    share the intercept and ``i - j = d``); fitted values are unique regardless."""
    import torch

    eigval, eigvec = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(design.gram)))
    keep = eigval > eigval.max() * 1e-10
    return (eigvec[:, keep] / eigval[keep]) @ eigvec[:, keep].T


def _fold_sums(stats: CellStatistics, weights: np.ndarray | None):
    """Weighted per-fold ``X^T y``, ``sum y^2`` and prompt counts (fold = bucket parity)."""
    out = []
    for fold in (0, 1):
        if weights is None:
            out.append((stats.xty[fold::2].sum(0), stats.sumsq[fold::2].sum(0),
                        float(stats.count[fold::2].sum())))
            continue
        wf = np.asarray(weights, dtype=float)[fold::2]
        out.append((
            np.tensordot(wf, stats.xty[fold::2], axes=1),
            np.tensordot(wf, stats.sumsq[fold::2], axes=1),
            float(wf @ stats.count[fold::2]),
        ))
    return out


def _relative_beta(design: PairDesign, xty_mean: np.ndarray) -> np.ndarray:
    """Offset means, as a coefficient vector over all columns (zeros elsewhere)."""
    rel = design.relative_columns
    beta = np.zeros_like(xty_mean)
    beta[..., rel] = xty_mean[..., rel] / np.diag(design.gram)[rel]
    return beta


def _sse(beta, mean_fit, xty, sumsq, n):
    """Error on a fold of the fit ``beta`` made from the mean ``mean_fit = X^T y_a / N_a``.

    ``beta^T G beta = beta . mean_fit`` for both models: ``G^+ G G^+ = G^+`` for
    ``M_abs``, and ``G`` is the diagonal of offset counts on ``M_rel``'s columns."""
    quad = np.einsum("lhc,lhc->lh", beta, mean_fit)
    return sumsq - 2 * np.einsum("lhc,lhc->lh", beta, xty) + n * quad


def _sst(design: PairDesign, xty, sumsq, n):
    total = xty[..., design.relative_columns].sum(-1)
    return sumsq - total**2 / (n * design.n_cells)


def _r2(sse, sst):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - sse / sst, np.nan)


def fit_shares(stats: CellStatistics, weights: np.ndarray | None = None) -> ShareFit:
    """Fit ``M_rel``, ``M_abs`` (and ``M_cell``) for every head of one target and condition.

    Args:
        weights: multiplicity of each prompt bucket (bootstrap resampling); ``M_cell``
            is only computed without weights.
    """
    design = stats.design
    folds = _fold_sums(stats, weights)
    if min(n for _, _, n in folds) < 1:
        raise ValueError(
            "cross-fitting needs prompts in both folds (even and odd prompt indices); "
            f"got {stats.n_prompts} prompt(s). Fix: use at least 4 prompts (64 recommended)."
        )
    gram_pinv = _gram_pinv(design)
    r2_rel, r2_abs = [], []
    for fit_fold, score_fold in ((0, 1), (1, 0)):
        xty_fit, _, n_fit = folds[fit_fold]
        xty, sumsq, n = folds[score_fold]
        mean = xty_fit / n_fit
        sst = _sst(design, xty, sumsq, n)
        for beta, r2 in ((_matmul(mean, gram_pinv), r2_abs), (_relative_beta(design, mean), r2_rel)):
            r2.append(_r2(_sse(beta, mean, xty, sumsq, n), sst))

    xty_all = folds[0][0] + folds[1][0]
    sumsq_all = folds[0][1] + folds[1][1]
    n_all = folds[0][2] + folds[1][2]
    mean_all = xty_all / n_all
    sst_all = _sst(design, xty_all, sumsq_all, n_all)
    r2_abs_in, r2_rel_in = (
        _r2(_sse(beta, mean_all, xty_all, sumsq_all, n_all), sst_all)
        for beta in (_matmul(mean_all, gram_pinv), _relative_beta(design, mean_all))
    )

    r2_cell = None if weights is not None else _cell_r2(stats, folds)
    return ShareFit(
        r2_rel=np.mean(r2_rel, 0), r2_abs=np.mean(r2_abs, 0), r2_cell=r2_cell,
        r2_rel_in=r2_rel_in, r2_abs_in=r2_abs_in, n_prompts=int(round(n_all)),
    )


def _cell_r2(stats: CellStatistics, folds) -> np.ndarray:
    """Cross-fitted R² of the cell-mean model ``M_cell``."""
    products = stats.fold_cell_products()  # [a, b]: sum over cells of S_a * S_b
    r2 = []
    for fit_fold, score_fold in ((0, 1), (1, 0)):
        n_fit = folds[fit_fold][2]
        xty, sumsq, n = folds[score_fold]
        # mean = S_fit / n_fit: SSE = sum y^2 - 2 mean . S_score + n ||mean||^2
        sse = (sumsq - 2 * products[fit_fold, score_fold] / n_fit
               + n * products[fit_fold, fit_fold] / n_fit**2)
        r2.append(_r2(sse, _sst(stats.design, xty, sumsq, n)))
    return np.mean(r2, 0)


def cell_means(stats: CellStatistics) -> np.ndarray:
    """Mean response of every scored cell over all prompts, ``[layer, head, cell]``."""
    return stats.fold_cell_sums().sum(0) / stats.n_prompts


def fitted_cells(stats: CellStatistics, model: str = "abs") -> np.ndarray:
    """In-sample fitted value of ``M_rel`` or ``M_abs`` at every cell, ``[layer, head, cell]``."""
    design = stats.design
    mean = stats.xty.sum(0) / stats.n_prompts
    if model == "abs":
        beta = mean @ _gram_pinv(design)
    elif model == "rel":
        beta = _relative_beta(design, mean)
    else:
        raise ValueError(f"model must be 'abs' or 'rel', got {model!r}.")
    cols = design.cell_columns
    return beta[..., cols[:, 0]] + beta[..., cols[:, 1]] + beta[..., cols[:, 2]]


def absolute_sum_of_squares(design: PairDesign, cell_values: np.ndarray) -> np.ndarray:
    """Sum of squares of cell values that ``M_abs`` explains beyond ``M_rel``:
    ``||(H_abs - H_rel) y||^2`` over the cells (``[..., cell] -> [...]``)."""
    return (absolute_projection(design, cell_values) ** 2).sum(-1)


def absolute_projection(design: PairDesign, cell_values: np.ndarray) -> np.ndarray:
    """``(H_abs - H_rel) y``: the part of cell values that needs absolute position."""
    cols = design.cell_columns
    flat = cell_values.reshape(-1, design.n_cells)
    xty = np.zeros((flat.shape[0], design.n_columns))
    for k in range(3):
        for row in range(flat.shape[0]):
            xty[row] += np.bincount(cols[:, k], weights=flat[row], minlength=design.n_columns)
    beta_abs = xty @ _gram_pinv(design)
    beta_rel = _relative_beta(design, xty)
    fit = lambda b: b[:, cols[:, 0]] + b[:, cols[:, 1]] + b[:, cols[:, 2]]  # noqa: E731
    return (fit(beta_abs) - fit(beta_rel)).reshape(cell_values.shape)
