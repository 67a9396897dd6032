"""The absolute-position part of every prompt bucket, in a small basis: the shared
engine of the bootstrap, the nulls and the debiased share.

For cell-mean vectors ``c`` (per cell, mean over prompts) let ``D = H_abs - H_rel`` be
the difference of the hat matrices of ``M_abs`` and ``M_rel`` (an orthogonal projection,
since the models are nested). With ``u = X^T c`` (what ``xty / N`` holds),
``<D c, D c'> = u^T K u'`` where ``K = G^+ - R`` (``G = X^T X``; ``R`` = diagonal
inverse offset counts on the offset columns). Restricted to ``range(G)`` (where every
``u`` lives) ``K`` is positive semi-definite with rank ``rank(X_abs) - rank(X_rel)``
(about ``2 n``), so ``K = W W^T`` and every head's absolute-position content of a
bucket is the short vector ``z_g = W^T xty_g``.

Cross-fitted share of direction ``a -> b`` (fit on fold ``a``, score on ``b``), exactly
``R²_abs - R²_rel`` of :func:`rope_leak.metrics.shares.fit_shares`:

    ``share_ab = N_b (2 <D c_a, D c_b> - ||D c_a||²) / SST_b``
    ``         = (2 z_a.z_b / N_a - N_b ||z_a||² / N_a²) / SST_b``

with ``z_f`` the (weighted) sum of the fold's bucket vectors. Sums over buckets with
weights are matrix products, so thousands of bootstrap weight vectors cost seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from rope_leak.engine.pairs import PairDesign
from rope_leak.engine.statistics import CellStatistics
from rope_leak.metrics.shares import _gram_pinv


@lru_cache(maxsize=16)
def absolute_basis(design: PairDesign) -> np.ndarray:
    """``W`` (``[column, rank]``) with ``W W^T = K`` on ``range(X^T X)``: ``||W^T X^T c||²
    = ||(H_abs - H_rel) c||²`` for any cell vector ``c``."""
    gram = design.gram
    pinv = _gram_pinv(design)
    rel = design.relative_columns
    k = pinv.copy()
    k[rel, rel] -= np.diag(1.0 / np.diag(gram)[rel])
    proj = gram @ pinv  # projector onto range(G)
    k = proj @ k @ proj.T
    k = 0.5 * (k + k.T)
    eigval, eigvec = np.linalg.eigh(k)
    tol = np.abs(eigval).max() * 1e-9
    if eigval.min() < -tol * 1e3:
        raise FloatingPointError("absolute-position form is not positive semi-definite.")
    keep = eigval > tol
    return eigvec[:, keep] * np.sqrt(eigval[keep])


@dataclass
class BucketProjection:
    """Per-bucket sufficient statistics reduced to what the share needs.

    Attributes:
        z: ``[bucket, layer, head, rank]`` absolute-position coordinates of bucket sums.
        total: ``[bucket, layer, head]`` sum of ``y`` over the scored cells.
        sumsq: ``[bucket, layer, head]`` sum of ``y²``.
        count: ``[bucket]`` prompts per bucket.
        n_cells: scored cells per prompt.
    """

    z: np.ndarray
    total: np.ndarray
    sumsq: np.ndarray
    count: np.ndarray
    n_cells: int

    @classmethod
    def from_statistics(cls, stats: CellStatistics) -> BucketProjection:
        design = stats.design
        w = absolute_basis(design)
        g, n_l, n_h, n_c = stats.xty.shape
        z = (stats.xty.reshape(-1, n_c) @ w).reshape(g, n_l, n_h, w.shape[1])
        total = stats.xty[..., design.relative_columns].sum(-1)
        return cls(z, total, stats.sumsq.astype(float), stats.count.astype(float), design.n_cells)

    @property
    def n_buckets(self) -> int:
        return self.z.shape[0]

    @property
    def head_shape(self) -> tuple[int, int]:
        return self.z.shape[1:3]

    # -- weighted fold sums ----------------------------------------------------------
    def _fold(self, weights: np.ndarray, fold: int):
        """Weighted sums of fold ``fold``'s buckets for weights ``[B, bucket]``."""
        wf = weights[:, fold::2]
        zf = self.z[fold::2]
        shape = (weights.shape[0],) + zf.shape[1:]
        z = (wf @ zf.reshape(zf.shape[0], -1)).reshape(shape)
        total = np.einsum("bg,glh->blh", wf, self.total[fold::2])
        sumsq = np.einsum("bg,glh->blh", wf, self.sumsq[fold::2])
        n = wf @ self.count[fold::2]
        return z, total, sumsq, n

    def _sst(self, total, sumsq, n):
        return sumsq - total**2 / (n[:, None, None] * self.n_cells)

    def crossfit_share(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Cross-fitted share ``[B, layer, head]`` for bucket weights ``[B, bucket]``
        (``None``: all ones, ``B = 1``); equals ``fit_shares(stats, w).share``."""
        weights = self._weights(weights)
        folds = [self._fold(weights, f) for f in (0, 1)]
        if np.any(folds[0][3] <= 0) or np.any(folds[1][3] <= 0):
            raise ValueError("cross-fitting needs prompts in both folds for every weight vector.")
        out = 0.0
        for a, b in ((0, 1), (1, 0)):
            za, _, _, na = folds[a]
            zb, tb, sb, nb = folds[b]
            na_, nb_ = na[:, None, None], nb[:, None, None]
            num = 2 * np.einsum("blhr,blhr->blh", za, zb) / na_ - nb_ * (za * za).sum(-1) / na_**2
            out = out + _safe_ratio(num, self._sst(tb, sb, nb))
        return out / 2

    def in_sample_share(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Plug-in share ``N ||D c̄||² / SST`` over all (weighted) prompts, ``[B, layer,
        head]``: ``fit_shares(...).share_in_sample``, the population share of the
        bootstrap world (biased up by ``tr(DΣ) / N`` in the real one)."""
        weights = self._weights(weights)
        flat = self.z.reshape(self.n_buckets, -1)
        zsum = (weights @ flat).reshape((weights.shape[0],) + self.z.shape[1:])
        n = weights @ self.count
        total = np.einsum("bg,glh->blh", weights, self.total)
        sumsq = np.einsum("bg,glh->blh", weights, self.sumsq)
        return _safe_ratio((zsum * zsum).sum(-1) / n[:, None, None], self._sst(total, sumsq, n))

    def debiased_share(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Unbiased-numerator share ``[B, layer, head]`` (see :mod:`rope_leak.stats.debias`).

        Weights are multiplicities; copies of a bucket count as distinct draws, so only
        each draw's pairing with itself is left out of the U-statistic."""
        weights = self._weights(weights)
        flat = self.z.reshape(self.n_buckets, -1)
        zsum = (weights @ flat).reshape((weights.shape[0],) + self.z.shape[1:])
        self_sq = (self.z * self.z).sum(-1)  # [bucket, layer, head]
        cross = (zsum * zsum).sum(-1) - np.einsum("bg,glh->blh", weights, self_sq)
        n = weights @ self.count
        pairs = n**2 - weights @ self.count**2
        if np.any(pairs <= 0):
            raise ValueError("the debiased share needs prompts in at least two buckets.")
        return _safe_ratio(cross / pairs[:, None, None], self.per_prompt_sst(weights))

    def per_prompt_sst(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Total sum of squares over the scored cells per prompt, ``[B, layer, head]``:
        the denominator of the debiased share."""
        weights = self._weights(weights)
        n = weights @ self.count
        total = np.einsum("bg,glh->blh", weights, self.total)
        sumsq = np.einsum("bg,glh->blh", weights, self.sumsq)
        return self._sst(total, sumsq, n) / n[:, None, None]

    def _weights(self, weights):
        if weights is None:
            return np.ones((1, self.n_buckets))
        weights = np.asarray(weights, dtype=float)
        if weights.ndim == 1:
            weights = weights[None]
        if weights.shape[1] != self.n_buckets:
            raise ValueError(f"weights need {self.n_buckets} columns, got {weights.shape[1]}.")
        return weights


def _safe_ratio(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
