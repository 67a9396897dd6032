"""Independent per-cell numpy reference for the start-cut decomposition of
attention log-patterns (a test oracle: slow, dense, and obviously right).

Everything here is written from the definitions, cell by cell, with explicit
one-hot design matrices and ``numpy.linalg.lstsq``; nothing is imported from
the package under test.

Definitions (one prompt, noise-free, positions 0..n-1, causal mask hides j > i)
-----------------------------------------------------------------------------
* ``A[i, j]`` = softmax over the visible keys ``j' = 0..i`` of ``s[i, j']``;
  ``logA = log A``.
* Scored cells: ``1 <= j <= i``, ``max(1, min_query) <= i < max_query`` (key 0,
  the sink, is never scored). The start cut scores ``w <= i < n - 1``: ``abar``
  reaches offset ``n - 2``, and only the last query has a key at offset ``n - 1``.
* ``M_rel``: ``y ~ a[i - j]``; ``M_abs``: ``y ~ a[i - j] + b[i] + c[j]`` (one-hot
  effects).  ``H_rel``, ``H_abs`` are the least-squares hat matrices over the
  scored cells, ``D = H_abs - H_rel`` and ``SS(y) = ||D y||^2``.  ``D y`` is
  computed as ``X_abs beta_abs - X_rel beta_rel`` with the ``beta`` from
  ``lstsq`` (fitted values are unique even though the designs are
  rank-deficient); the dense ``H`` (cells x cells) is never formed because at
  n = 256 it would take ~8.5 GB.
* Start cut, window ``w``: ``R_i = {max(1, i-w+1), ..., i}``,
  ``rho_i = sum_{j in R_i} A[i, j]``, ``At = A / rho_i``;
  ``abar(d)`` = mean of ``At[i, i-d]`` over the queries ``i >= w`` having key
  ``i - d >= 1``; ``T_i = sum_{d=i+1}^{n-2} abar(d) / sum_{d=0}^{min(w,i)-1}
  abar(d)``; ``m_i = log(1 + rho_i T_i)``; ``yS = logA - m``.
  The profile always uses every query ``i >= w`` (``min_query`` only restricts
  which cells are scored).
* Renormalisation split: ``Afull`` = softmax over all keys ``0..n-1``,
  ``m^R_i = -log sum_{j<=i} Afull[i, j]``, so ``logA = log Afull + m^R``.

Reported numbers (units of ``SS(logA)``): ``mask_share = <D m, D logA>/SS``,
``mask_part = SS(m)/SS``, ``scores_part = SS(yS)/SS``,
``cross = 2 <D yS, D m>/SS``; ``mask_part + scores_part + cross = 1``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "completed_split_reference",
    "renormalisation_split_reference",
    "constructed_scores",
    "scored_cells",
    "absolute_part",
]


# --------------------------------------------------------------------------
# scored cells, designs and the absolute-position part D y
# --------------------------------------------------------------------------

def scored_cells(n: int, min_query: int = 1, max_query: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Query and key index of every scored cell (1 <= j <= i, min_query <= i < max_query)."""
    qs, ks = [], []
    for i in range(max(1, min_query), n if max_query is None else min(n, max_query)):
        for j in range(1, i + 1):
            qs.append(i)
            ks.append(j)
    return np.asarray(qs, dtype=int), np.asarray(ks, dtype=int)


def _one_hot(labels: np.ndarray) -> np.ndarray:
    levels = np.unique(labels)
    X = np.zeros((labels.size, levels.size))
    for col, level in enumerate(levels):
        X[labels == level, col] = 1.0
    return X


def _designs(qi: np.ndarray, kj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X_rel = _one_hot(qi - kj)
    X_abs = np.hstack([X_rel, _one_hot(qi), _one_hot(kj)])
    return X_rel, X_abs


def _fitted(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    beta, *_ = np.linalg.lstsq(X, Y, rcond=None)
    return X @ beta


def absolute_part(Y: np.ndarray, qi: np.ndarray, kj: np.ndarray) -> np.ndarray:
    """D Y = H_abs Y - H_rel Y for cell vectors (columns of Y) over the cells."""
    Y = np.asarray(Y, dtype=float)
    squeeze = Y.ndim == 1
    if squeeze:
        Y = Y[:, None]
    if not np.all(np.isfinite(Y)):
        raise ValueError("non-finite value on a scored cell")
    X_rel, X_abs = _designs(qi, kj)
    DY = _fitted(X_abs, Y) - _fitted(X_rel, Y)
    return DY[:, 0] if squeeze else DY


def _four_numbers(logA_cells, mask_cells, scores_cells, qi, kj) -> dict:
    D = absolute_part(np.column_stack([logA_cells, mask_cells, scores_cells]), qi, kj)
    DlogA, Dm, DyS = D[:, 0], D[:, 1], D[:, 2]
    ss = float(DlogA @ DlogA)
    return {
        "mask_share": float(Dm @ DlogA) / ss,
        "mask_part": float(Dm @ Dm) / ss,
        "scores_part": float(DyS @ DyS) / ss,
        "cross": 2.0 * float(DyS @ Dm) / ss,
        "ss_logA": ss,
    }


# --------------------------------------------------------------------------
# softmaxes, cell by cell
# --------------------------------------------------------------------------

def causal_log_pattern(scores: np.ndarray) -> np.ndarray:
    """logA[i, j] for j <= i (log-softmax over keys 0..i); NaN above the diagonal."""
    n = scores.shape[0]
    logA = np.full((n, n), np.nan)
    for i in range(n):
        row = scores[i, : i + 1]
        top = row.max()
        logA[i, : i + 1] = row - (top + np.log(np.sum(np.exp(row - top))))
    return logA


def full_log_pattern(scores: np.ndarray) -> np.ndarray:
    """log Afull[i, j], log-softmax over all keys 0..n-1 of each row."""
    n = scores.shape[0]
    out = np.empty((n, n))
    for i in range(n):
        row = scores[i, :]
        top = row.max()
        out[i, :] = row - (top + np.log(np.sum(np.exp(row - top))))
    return out


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be square [n, n], got {scores.shape}")
    if scores.shape[0] < 3:
        raise ValueError("need n >= 3")
    return scores


# --------------------------------------------------------------------------
# the start cut
# --------------------------------------------------------------------------

def start_cut_mask(A: np.ndarray, w: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(m, rho, T, abar) of the start cut for a causal pattern A (NaN above the diagonal).

    m[0], rho[0], T[0] are NaN (query 0 has no non-sink key).
    """
    n = A.shape[0]
    if not 1 <= w <= n - 1:
        raise ValueError(f"need 1 <= w <= n-1 (no query i >= w otherwise); w={w}, n={n}")

    rho = np.full(n, np.nan)
    for i in range(1, n):
        lo = max(1, i - w + 1)
        rho[i] = sum(A[i, j] for j in range(lo, i + 1))

    # profile abar(d), d = 0..n-2, over the queries i >= w with key i - d >= 1
    abar = np.full(n - 1, np.nan)
    for d in range(n - 1):
        vals = [A[i, i - d] / rho[i] for i in range(w, n) if i - d >= 1]
        if vals:
            abar[d] = float(np.mean(vals))

    T = np.full(n, np.nan)
    for i in range(1, n):
        num = sum(abar[d] for d in range(i + 1, n - 1))  # empty (0) for i >= n-2
        den = sum(abar[d] for d in range(0, min(w, i)))
        T[i] = num / den

    m = np.full(n, np.nan)
    m[1:] = np.log1p(rho[1:] * T[1:])
    return m, rho, T, abar


def completed_split_reference(scores: np.ndarray, w: int = 32, min_query: int = 1,
                              max_query: int | None = None) -> dict:
    """Start-cut ("completed") split of logA into a mask part m and a scores' part.

    Returns mask_share, mask_part, scores_part, cross (units of SS(logA)),
    imputed_past_mass_at_w (T at query i = w) and m (array [n], m[0] = NaN),
    plus the diagnostics ss_logA, rho, T and abar.
    """
    scores = _check_scores(scores)
    n = scores.shape[0]
    logA = causal_log_pattern(scores)
    A = np.exp(logA)  # exp(NaN) stays NaN above the diagonal
    m, rho, T, abar = start_cut_mask(A, w)

    qi, kj = scored_cells(n, min_query, max_query)
    logA_c = logA[qi, kj]
    m_c = m[qi]
    yS_c = logA_c - m_c
    out = _four_numbers(logA_c, m_c, yS_c, qi, kj)
    out.update(imputed_past_mass_at_w=float(T[w]), m=m, rho=rho, T=T, abar=abar)
    return out


def renormalisation_split_reference(scores: np.ndarray, min_query: int = 1) -> dict:
    """Renormalisation split logA = log Afull + m^R, m^R_i = -log sum_{j<=i} Afull[i, j].

    Returns mask_share, mask_part, scores_part, cross (units of SS(logA)) and
    m (the array m^R, [n]), plus ss_logA.
    """
    scores = _check_scores(scores)
    n = scores.shape[0]
    logA = causal_log_pattern(scores)
    logAfull = full_log_pattern(scores)
    mR = np.empty(n)
    for i in range(n):
        mR[i] = -np.log(np.sum(np.exp(logAfull[i, : i + 1])))

    qi, kj = scored_cells(n, min_query)
    out = _four_numbers(logA[qi, kj], mR[qi], logAfull[qi, kj], qi, kj)
    out["m"] = mR
    return out


# --------------------------------------------------------------------------
# constructed score matrices
# --------------------------------------------------------------------------

_KINDS = (
    "power_law", "rope_cosines", "linear_key", "key_effect",
    "temperature", "varying_sink", "constant_sink", "broad",
)


def constructed_scores(kind: str, n: int, **params) -> np.ndarray:
    """[n, n] float64 score matrix s[i, j] (i query, j key, d = i - j)."""
    i = np.arange(n, dtype=float)[:, None] * np.ones((1, n))
    j = np.ones((n, 1)) * np.arange(n, dtype=float)[None, :]
    d = i - j
    logd = np.log1p(np.abs(d))

    def take(defaults: dict) -> dict:
        unknown = set(params) - set(defaults)
        if unknown:
            raise TypeError(f"{kind!r}: unknown parameters {sorted(unknown)}")
        return {**defaults, **params}

    if kind == "power_law":
        p = take({"p": 1.5})["p"]
        s = -p * logd
    elif kind == "broad":
        p = take({"p": 0.8})["p"]
        s = -p * logd
    elif kind == "rope_cosines":
        take({})
        s = np.zeros((n, n))
        for k in range(8):
            theta = 10000.0 ** (-k / 8.0)
            s = s + 1.0 * np.cos(theta * d)
    elif kind == "linear_key":
        slope = take({"slope": 0.05})["slope"]
        s = slope * j
    elif kind == "key_effect":
        take({})
        s = -1.5 * logd + 0.5 * np.sin(j / 7.0)
    elif kind == "temperature":
        take({})
        s = -(1.0 + i / n) * 1.5 * logd
    elif kind == "varying_sink":
        take({})
        s = -1.5 * logd
        s[:, 0] = 2.0 + 3.0 * np.arange(n) / n
    elif kind == "constant_sink":
        take({})
        s = -1.5 * logd
        s[:, 0] = 4.0
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {_KINDS}")
    return np.ascontiguousarray(s, dtype=np.float64)


if __name__ == "__main__":  # a quick table; slow at n = 256 (dense lstsq)
    import sys

    sizes = [int(a) for a in sys.argv[1:]] or [64]
    for n in sizes:
        for kind in _KINDS:
            s = constructed_scores(kind, n)
            c = completed_split_reference(s)
            r = renormalisation_split_reference(s)
            print(
                f"n={n:4d} {kind:14s} completed: share={c['mask_share']:8.4f} "
                f"mask={c['mask_part']:8.4f} scores={c['scores_part']:8.4f} "
                f"cross={c['cross']:8.4f} T_w={c['imputed_past_mass_at_w']:.4f} | "
                f"renorm: share={r['mask_share']:8.4f} mask={r['mask_part']:8.4f} "
                f"scores={r['scores_part']:8.4f} cross={r['cross']:8.4f}",
                flush=True,
            )
