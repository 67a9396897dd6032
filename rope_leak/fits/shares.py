"""Absolute-position share of every head, fitted exactly from sufficient statistics.

Models (docs/method.md), all least squares over the scored cells:

* ``M_rel``:  ``y ~ a[i - j]``            (saturated relative baseline)
* ``M_abs``:  ``y ~ a[i - j] + b[i] + c[j]``
* ``M_cell``: ``y ~ mean of cell (i, j)``  (ceiling of any position-only model)

Cross-fitting: fit on the even prompts, score on the odd ones, and the reverse; R² of
each direction uses the scored fold's own total sum of squares; the two are averaged.
``share = R²(M_abs) - R²(M_rel)``. Since every prompt contributes one observation per
cell, a fit on fold ``a`` needs only ``X^T y_a / N_a``: ``M_rel``'s error on fold ``b`` is
``sum y_b^2 - 2 a . X_R^T y_b + N_b sum_d N_d a_d^2`` (``a`` the offset means), and
``M_abs`` gains on it what :mod:`rope_leak.fits.position_models` computes from the same
sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rope_leak.engine.pairs import PairDesign
from rope_leak.engine.statistics import TargetStatistics
from rope_leak.fits.position_models import absolute_projector, offset_means


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


def _fold_sums(stats: TargetStatistics, weights: np.ndarray | None):
    """Weighted per-fold ``X^T y``, ``sum y^2`` and prompt counts (fold = bucket parity)."""
    out = []
    xty = stats.xty  # read once: a derived target's is computed on each read
    for fold in (0, 1):
        if weights is None:
            out.append((xty[fold::2].sum(0), stats.sumsq[fold::2].sum(0),
                        float(stats.count[fold::2].sum())))
            continue
        wf = np.asarray(weights, dtype=float)[fold::2]
        out.append((
            np.tensordot(wf, xty[fold::2], axes=1),
            np.tensordot(wf, stats.sumsq[fold::2], axes=1),
            float(wf @ stats.count[fold::2]),
        ))
    return out


def _sse_relative(design: PairDesign, xty_fit, n_fit, xty, sumsq, n):
    """Error on a fold of ``M_rel`` fitted on another: ``sum y^2 - 2 a . X_R^T y +
    n sum_d N_d a_d^2`` with ``a`` the fitting fold's offset means."""
    a = offset_means(design, xty_fit) / n_fit
    rel = design.relative_columns
    return sumsq - 2 * (a * xty[..., rel]).sum(-1) + n * (a * a * design.offset_count).sum(-1)


def _sst(design: PairDesign, xty, sumsq, n):
    total = xty[..., design.relative_columns].sum(-1)
    return sumsq - total**2 / (n * design.n_cells)


def _r2(sse, sst):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - sse / sst, np.nan)


def fit_shares(stats: TargetStatistics, weights: np.ndarray | None = None) -> ShareFit:
    """Fit ``M_rel``, ``M_abs`` (and ``M_cell`` when per-cell sums were kept) for every
    head of one target and condition, from marginal sums only.

    ``M_abs``'s error is ``M_rel``'s minus its absolute-position gain: fitted on fold
    ``a`` and scored on ``b``, ``SSE_rel - SSE_abs = N_b (2 <D c_a, D c_b> - ||D c_a||^2)``
    with ``c`` the folds' cell means and ``D = H_abs - H_rel``, whose inner products come
    from :class:`~rope_leak.fits.position_models.AbsoluteProjector`.

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
    projector = absolute_projector(design)
    z = [projector.project(xty) for xty, _, _ in folds]  # [layer, head, rank] per fold
    r2_rel, r2_abs = [], []
    for a, b in ((0, 1), (1, 0)):
        xty_a, _, n_a = folds[a]
        xty, sumsq, n = folds[b]
        sst = _sst(design, xty, sumsq, n)
        sse_rel = _sse_relative(design, xty_a, n_a, xty, sumsq, n)
        gain = 2 * (z[a] * z[b]).sum(-1) / n_a - n * (z[a] * z[a]).sum(-1) / n_a**2
        r2_rel.append(_r2(sse_rel, sst))
        r2_abs.append(_r2(sse_rel - gain, sst))

    xty_all = folds[0][0] + folds[1][0]
    sumsq_all = folds[0][1] + folds[1][1]
    n_all = folds[0][2] + folds[1][2]
    z_all = z[0] + z[1]
    sst_all = _sst(design, xty_all, sumsq_all, n_all)
    sse_rel_all = _sse_relative(design, xty_all, n_all, xty_all, sumsq_all, n_all)
    r2_rel_in = _r2(sse_rel_all, sst_all)
    r2_abs_in = _r2(sse_rel_all - (z_all * z_all).sum(-1) / n_all, sst_all)

    r2_cell = None if weights is not None or stats.cell_sum is None else _cell_r2(stats, folds)
    return ShareFit(
        r2_rel=np.mean(r2_rel, 0), r2_abs=np.mean(r2_abs, 0), r2_cell=r2_cell,
        r2_rel_in=r2_rel_in, r2_abs_in=r2_abs_in, n_prompts=int(round(n_all)),
    )


def _cell_r2(stats: TargetStatistics, folds) -> np.ndarray:
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


def cell_means(stats: TargetStatistics) -> np.ndarray:
    """Mean response of every scored cell over all prompts, ``[layer, head, cell]``."""
    return stats.fold_cell_sums().sum(0) / stats.n_prompts


def fitted_cells(stats: TargetStatistics, model: str = "abs") -> np.ndarray:
    """In-sample fitted value of ``M_rel`` or ``M_abs`` at every cell, ``[layer, head, cell]``
    (``O(n^2)`` per head: for maps of chosen heads and small ``n``)."""
    design = stats.design
    mean = stats.xty.sum(0) / stats.n_prompts
    if model == "abs":
        beta = absolute_projector(design).coefficients(mean)
    elif model == "rel":
        beta = np.zeros_like(mean)
        beta[..., design.relative_columns] = offset_means(design, mean)
    else:
        raise ValueError(f"model must be 'abs' or 'rel', got {model!r}.")
    cols = design.cell_columns
    return beta[..., cols[:, 0]] + beta[..., cols[:, 1]] + beta[..., cols[:, 2]]


def cell_xty(design: PairDesign, cell_values: np.ndarray) -> np.ndarray:
    """``X^T y`` of per-cell values ``[..., cell] -> [..., column]``."""
    cols = design.cell_columns
    flat = cell_values.reshape(-1, design.n_cells)
    xty = np.zeros((flat.shape[0], design.n_columns))
    for k in range(3):
        for row in range(flat.shape[0]):
            xty[row] += np.bincount(cols[:, k], weights=flat[row], minlength=design.n_columns)
    return xty.reshape(cell_values.shape[:-1] + (design.n_columns,))


def absolute_sum_of_squares(design: PairDesign, cell_values: np.ndarray) -> np.ndarray:
    """Sum of squares of cell values that ``M_abs`` explains beyond ``M_rel``:
    ``||(H_abs - H_rel) y||^2`` over the cells (``[..., cell] -> [...]``)."""
    z = absolute_projector(design).project(cell_xty(design, cell_values))
    return (z * z).sum(-1)
