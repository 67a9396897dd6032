"""The marginal-statistics fits against the earlier per-cell implementation (kept here as
a reference): cross-fitted shares of every model from per-cell fold sums and a dense
pseudo-inverse of ``X^T X``, in float64, equal to 1e-10."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rope_leak.engine.accumulate import LayerAccumulator
from rope_leak.engine.pairs import PairDesign, PairSpec
from rope_leak.engine.statistics import TARGETS
from rope_leak.fits.projection import BucketProjection
from rope_leak.fits.shares import fit_shares

MASKED = TARGETS


def reference_shares(design: PairDesign, cell_sum: np.ndarray, sumsq: np.ndarray, count: np.ndarray):
    """Per-cell reference: ``cell_sum`` ``[fold, head, cell]``, ``sumsq`` ``[fold, head]``,
    ``count`` ``[fold]``; returns cross-fitted R² of M_rel, M_abs, M_cell ``[head]``."""
    X = design.design_matrix()
    gram_pinv = np.linalg.pinv(X.T @ X, rcond=1e-10)
    rel = design.relative_columns
    out = {"rel": [], "abs": [], "cell": []}
    for a, b in ((0, 1), (1, 0)):
        mean_a = cell_sum[a] / count[a]  # cell means of the fitting fold
        fits = {
            "abs": (mean_a @ X) @ gram_pinv @ X.T,
            "rel": (mean_a @ X[:, rel]) @ np.linalg.pinv(X[:, rel].T @ X[:, rel]) @ X[:, rel].T,
            "cell": mean_a,
        }
        total = cell_sum[b].sum(-1)
        sst = sumsq[b] - total**2 / (count[b] * design.n_cells)
        for name, fit in fits.items():
            sse = sumsq[b] - 2 * (fit * cell_sum[b]).sum(-1) + count[b] * (fit**2).sum(-1)
            out[name].append(1 - sse / sst)
    return {k: np.mean(v, 0) for k, v in out.items()}


@pytest.mark.parametrize("spec", [PairSpec(), PairSpec(include_sink=True, min_query=0),
                                  PairSpec(min_query=2, max_query=15), PairSpec(max_offset=5)],
                         ids=lambda s: s.label())
def test_marginal_fits_equal_the_per_cell_reference(spec):
    gen = torch.Generator().manual_seed(4)
    P, H, n = 10, 3, 19
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    scores = (torch.randn(2 * n, generator=gen, dtype=torch.float64)[(i - j) + n]
              + 0.8 * torch.cos(j / 3.0) + torch.randn(P, H, n, n, generator=gen, dtype=torch.float64))
    scores = scores.masked_fill(j > i, float("-inf"))
    design = PairDesign(spec, n)
    acc = LayerAccumulator(design, 1, H, 4, MASKED, cell_maps=True)
    ids = torch.arange(P)
    acc.add_layer(0, scores, ids)  # float64: the torch path, no float32 rounding
    acc.add_prompts(ids)
    for target, stats in acc.to_statistics().items():
        folds = np.array([stats.count[0::2].sum(), stats.count[1::2].sum()], dtype=float)
        sumsq = np.stack([stats.sumsq[0::2].sum(0), stats.sumsq[1::2].sum(0)])[:, 0]
        ref = reference_shares(design, stats.cell_sum[:, 0], sumsq, folds)
        fit = fit_shares(stats)
        np.testing.assert_allclose(fit.r2_rel[0], ref["rel"], rtol=0, atol=1e-10, err_msg=target)
        np.testing.assert_allclose(fit.r2_abs[0], ref["abs"], rtol=0, atol=1e-10, err_msg=target)
        np.testing.assert_allclose(fit.r2_cell[0], ref["cell"], rtol=0, atol=1e-10, err_msg=target)
        # the bucket projection's cross-fitted share is the same number
        np.testing.assert_allclose(BucketProjection.from_statistics(stats).crossfit_share()[0, 0],
                                   fit.share[0], rtol=0, atol=1e-10, err_msg=target)
