"""The absolute-position part of every prompt bucket, in a small basis: the shared
engine of the bootstrap, the nulls and the debiased share.

For cell-mean vectors ``c`` (per cell, mean over prompts) let ``D = H_abs - H_rel`` be
the difference of the hat matrices of ``M_abs`` and ``M_rel`` (an orthogonal projection,
since the models are nested). Every head's absolute-position content of a bucket is the
short vector ``z_g`` of :class:`~rope_leak.fits.position_models.AbsoluteProjector`
(about ``2 n`` numbers, from the bucket's ``X^T y``), with ``z_g . z_g' = <D S_g, D S_g'>``
for the bucket sums ``S``.

Cross-fitted share of direction ``a -> b`` (fit on fold ``a``, score on ``b``), exactly
``R²_abs - R²_rel`` of :func:`rope_leak.fits.shares.fit_shares`:

    ``share_ab = N_b (2 <D c_a, D c_b> - ||D c_a||²) / SST_b``
    ``         = (2 z_a.z_b / N_a - N_b ||z_a||² / N_a²) / SST_b``

with ``z_f`` the (weighted) sum of the fold's bucket vectors. Every such product is a
quadratic form in the bucket weights, ``z_a.z_b = w_a^T M w_b`` with the per-head bucket
Gram ``M[g, g'] = <z_g, z_g'>`` (``[layer, head, bucket, bucket]``, computed once per
statistics), so thousands of bootstrap weight vectors cost well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rope_leak.engine.pairs import PairDesign
from rope_leak.engine.statistics import TargetStatistics
from rope_leak.fits.position_models import absolute_projector


def absolute_basis(design: PairDesign) -> np.ndarray:
    """``W`` (``[column, rank]``, dense) with ``W^T X^T c`` the absolute-position
    coordinates of cell vector ``c`` (``||W^T X^T c||² = ||(H_abs - H_rel) c||²``). Built
    by projecting unit vectors: ``O(n^2)`` memory, for small designs (the permutation
    null); the streaming fits use :class:`AbsoluteProjector` directly."""
    return absolute_projector(design).project(np.eye(design.n_columns))


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
    def from_statistics(cls, stats: TargetStatistics) -> BucketProjection:
        """The projection of ``stats`` (computed once per statistics object and kept on it:
        the inference, the split and the BOS tables all start from it)."""
        sources = stats.arrays()  # what xty is read from (a derived xty is new on each read)
        cached = getattr(stats, "_bucket_projection", None)
        if (cached is not None and len(cached[0]) == len(sources)
                and all(a is b for a, b in zip(cached[0], sources))):
            return cached[1]
        design = stats.design
        xty = stats.xty
        z = absolute_projector(design).project(xty)
        total = xty[..., design.relative_columns].sum(-1)
        del xty
        out = cls(z, total, stats.sumsq.astype(float), stats.count.astype(float), design.n_cells)
        stats._bucket_projection = (sources, out)
        return out

    def bucket_products(self, other: BucketProjection | None = None) -> np.ndarray:
        """``M[layer, head, g, g'] = <z_g, other.z_g'>`` (``other`` None: self); cached."""
        other = self if other is None else other
        cache = self.__dict__.setdefault("_products", {})
        if id(other) not in cache or cache[id(other)][0] is not other:
            cache[id(other)] = (other, _bucket_gram(self.z, other.z))
        return cache[id(other)][1]

    @property
    def n_buckets(self) -> int:
        return self.z.shape[0]

    @property
    def head_shape(self) -> tuple[int, int]:
        return self.z.shape[1:3]

    # -- weighted fold sums ----------------------------------------------------------
    def _fold_weights(self, weights: np.ndarray, fold: int) -> np.ndarray:
        """``weights`` with the other fold's buckets zeroed."""
        out = np.zeros_like(weights)
        out[:, fold::2] = weights[:, fold::2]
        return out

    def _sst(self, total, sumsq, n):
        return sumsq - total**2 / (n[:, None, None] * self.n_cells)

    def _totals(self, weights: np.ndarray):
        total = np.einsum("bg,glh->blh", weights, self.total)
        sumsq = np.einsum("bg,glh->blh", weights, self.sumsq)
        return total, sumsq, weights @ self.count

    def crossfit_share(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Cross-fitted share ``[B, layer, head]`` for bucket weights ``[B, bucket]``
        (``None``: all ones, ``B = 1``); equals ``fit_shares(stats, w).share``."""
        weights = self._weights(weights)
        folds = [self._fold_weights(weights, f) for f in (0, 1)]
        n = [w @ self.count for w in folds]
        if np.any(n[0] <= 0) or np.any(n[1] <= 0):
            raise ValueError("cross-fitting needs prompts in both folds for every weight vector.")
        products = self.bucket_products()
        out = 0.0
        for a, b in ((0, 1), (1, 0)):
            na, nb = n[a][:, None, None], n[b][:, None, None]
            zab = _quadratic(folds[a], products, folds[b])
            zaa = _quadratic(folds[a], products, folds[a])
            num = 2 * zab / na - nb * zaa / na**2
            out = out + safe_ratio(num, self._sst(*self._totals(folds[b])))
        return out / 2

    def in_sample_share(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Plug-in share ``N ||D c̄||² / SST`` over all (weighted) prompts, ``[B, layer,
        head]``: ``fit_shares(...).share_in_sample``, the population share of the
        bootstrap world (biased up by ``tr(DΣ) / N`` in the real one)."""
        weights = self._weights(weights)
        total, sumsq, n = self._totals(weights)
        zz = _quadratic(weights, self.bucket_products(), weights)
        return safe_ratio(zz / n[:, None, None], self._sst(total, sumsq, n))

    def debiased_share(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Unbiased-numerator share ``[B, layer, head]`` (see :mod:`rope_leak.fits.debias`).

        Weights are multiplicities, as in :func:`pair_products` (the one rule for every
        U-statistic here)."""
        weights = self._weights(weights)
        return safe_ratio(pair_products(self, self, weights), self.per_prompt_sst(weights))

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


def pair_products(a: BucketProjection, b: BucketProjection, weights: np.ndarray) -> np.ndarray:
    """U-statistic of the per-prompt ``<D mu_a, D mu_b>`` per head, ``[B, layer, head]``,
    for bucket weights ``[B, bucket]`` (multiplicities). Only pairs of distinct draws
    enter: each bucket's pairing with itself carries the noise and is left out; copies of
    a bucket in a bootstrap draw count as distinct draws (so the bootstrap reproduces the
    in-sample world around which its intervals are calibrated: tests/inference/test_stats.py)."""
    weights = np.asarray(weights, dtype=float)
    products = a.bucket_products(b)  # [layer, head, g, g']
    self_terms = np.einsum("bg,lhgg->blh", weights, products)
    n = weights @ a.count
    pairs = n**2 - weights @ a.count**2
    if np.any(pairs <= 0):
        raise ValueError("this estimate needs prompts in at least two buckets. Fix: use at "
                         "least 4 prompts (64 recommended).")
    return (_quadratic(weights, products, weights) - self_terms) / pairs[:, None, None]


def _bucket_gram(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    """``[bucket, layer, head, rank]`` x2 -> ``[layer, head, bucket, bucket]`` inner products."""
    a = torch.from_numpy(np.ascontiguousarray(za)).permute(1, 2, 0, 3)
    b = torch.from_numpy(np.ascontiguousarray(zb)).permute(1, 2, 3, 0)
    return (a @ b).numpy()


def _quadratic(wa: np.ndarray, products: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """``wa[B, g] M[l, h, g, g'] wb[B, g']`` -> ``[B, layer, head]`` (torch: numpy's
    einsum takes a slow path for this contraction)."""
    wa_t, wb_t = (torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)) for w in (wa, wb))
    left = wa_t @ torch.from_numpy(products)  # [layer, head, B, g']
    return (left * wb_t).sum(-1).permute(2, 0, 1).numpy()


def safe_ratio(num, den):
    """num / den where den > 0, NaN elsewhere (a share over no variance is not estimable)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
