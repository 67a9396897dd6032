"""One head's fitted ``M_abs`` coefficients: the offset, query and key profiles.

``M_abs: y ~ a[i - j] + b[i] + c[j]`` is fitted by least squares over the scored cells
from the sufficient statistics (``X^T y``), through
:mod:`rope_leak.fits.position_models`. The fitted values are unique, the coefficients are
not: ``a``, ``b`` and ``c`` can trade a constant (``b + k``, ``a - k``; ``c + k``,
``a - k``) and a linear trend (``a[d] + t d``, ``b[i] - t i``, ``c[j] + t j``) without
changing any fitted value. :func:`abs_profiles` reports them in one fixed gauge:

* ``b`` and ``c`` have mean 0 over the scored queries and keys;
* ``b`` and ``c`` have the same least-squares slope (along ``i`` and ``j``), so the only
  linear trend left in the absolute part is one in ``i + j``; any trend along
  ``i - j`` is in ``a``.

So ``a[d]`` carries the intercept and everything relative, and ``b[i]``, ``c[j]`` are
the absolute query and key effects. ``a[d] + b[i] + c[j]`` reproduces the fitted
cells exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rope_leak.engine.pairs import PairDesign
from rope_leak.engine.statistics import TargetStatistics
from rope_leak.fits.position_models import absolute_projector


@dataclass(frozen=True)
class Profiles:
    """``a[d]`` (index: offset ``d = i - j``), ``b[i]`` (query), ``c[j]`` (key)."""

    offset: pd.Series
    query: pd.Series
    key: pd.Series

    def fitted(self, design: PairDesign) -> np.ndarray:
        """``a[i - j] + b[i] + c[j]`` at every scored cell of ``design``."""
        queries, keys = design.cells
        return (self.offset.loc[queries - keys].to_numpy() + self.query.loc[queries].to_numpy()
                + self.key.loc[keys].to_numpy())


def _slopes(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Least-squares slope of ``values[..., k]`` along ``positions[k]``."""
    centred = positions - positions.mean()
    denominator = float(centred @ centred)
    return values @ centred / denominator if denominator > 0 else np.zeros(values.shape[:-1])


def per_prompt_xty(stats: TargetStatistics) -> np.ndarray:
    """``X^T y`` per prompt (all buckets), ``[layer, head, column]``."""
    if stats.n_prompts < 1:
        raise ValueError("the statistics hold no prompt. Fix: run the analysis on some prompts first.")
    return stats.xty.sum(0) / stats.n_prompts


def gauged_coefficients(design: PairDesign, xty: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``M_abs``'s ``a [..., offset]``, ``b [..., query]``, ``c [..., key]`` for per-prompt
    ``X^T y [..., column]`` (any leading shape: one solve for all heads), in the gauge of
    the module docstring."""
    beta = absolute_projector(design).coefficients(xty)
    n_off, n_q = len(design.offsets), len(design.queries)
    a, b, c = beta[..., :n_off], beta[..., n_off:n_off + n_q], beta[..., n_off + n_q:]
    offsets = design.offsets.astype(float)
    queries = design.queries.astype(float)
    keys = design.keys.astype(float)
    # equal slopes of b and c: move the difference into a (a + t d, b - t i, c + t j)
    t = ((_slopes(b, queries) - _slopes(c, keys)) / 2)[..., None]
    a, b, c = a + t * offsets, b - t * queries, c + t * keys
    # zero means of b and c: move them into a
    b_mean, c_mean = b.mean(-1, keepdims=True), c.mean(-1, keepdims=True)
    return a + b_mean + c_mean, b - b_mean, c - c_mean


def profiles_of(design: PairDesign, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> Profiles:
    """One head's gauged coefficients (from :func:`gauged_coefficients`) as labelled series."""
    return Profiles(
        offset=pd.Series(a, index=pd.Index(design.offsets, name="offset"), name="a"),
        query=pd.Series(b, index=pd.Index(design.queries, name="query"), name="b"),
        key=pd.Series(c, index=pd.Index(design.keys, name="key"), name="c"),
    )


def abs_profiles(stats: TargetStatistics, layer: int, head: int) -> Profiles:
    """The in-sample ``M_abs`` fit of one head (all prompts), in the gauge of the module
    docstring."""
    a, b, c = gauged_coefficients(stats.design, per_prompt_xty(stats)[layer, head])
    return profiles_of(stats.design, a, b, c)
