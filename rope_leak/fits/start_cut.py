"""The completed split of ``log A``: the causal mask's part is the cut at the start.

With an infinite past, query ``i``'s softmax normaliser would not depend on ``i``; the
mask makes absolute position only because the sequence starts. So the mask's part is
what the missing past would change, and the scores' part is the log-pattern with the
missing past put back, filled in from the head's own count-free offset profile:

* ``ā(d)``: the mean count-free pattern ``Ã = A / rho`` at offset ``d`` over the queries
  ``i >= w`` and keys ``j >= 1`` (:mod:`rope_leak.engine.start_cut`), **cross-fitted**:
  bucket ``g``'s prompts use the profile of the other buckets;
* ``T_i = sum_{d=i+1}^{H} ā(d)``: the imputed mass of the keys before position 0,
  relative to the window's (``sum_{d<w} ā(d) = 1``). The tail is a stated **horizon**
  ``H`` (default ``n - 2``, the longest offset any prompt shows; no extrapolation beyond
  what was measured);
* only queries ``w <= i <= n - 2`` are scored (:func:`~rope_leak.engine.pairs.start_cut_spec`):
  an early query's window holds fewer than ``w`` keys, whose noise (and a sink's
  displacement of the key at offset ``i``) the large past imputed to it would amplify;
  the last query sees key 0 at offset ``n - 1``, one beyond the horizon every other
  query's past is completed to;
* mask part ``m_i = log(1 + rho_i T_i) >= 0``; scores' part ``y^S = log A - m``.

``log A = y^S + m`` splits the absolute-position sum of squares (``D = H_abs - H_rel``)
into ``SS(m)``, ``SS(y^S)`` and the cross term ``2 <D y^S, D m>``. The headline is the
mask share ``<D m, D log A> / SS(D log A)`` (it and the scores' share ``<D y^S, D log A> /
SS`` sum to 1). Each inner product is a U-statistic over pairs of distinct prompt
buckets (:func:`~rope_leak.fits.projection.pair_products`), with delete-one-bucket
jackknife intervals (the profile is held at its cross-fitted estimate in the replicates).
The replicates are kept (:attr:`CompletedSplit.replicates`), so any group of heads or layers
gets its pooled share with the same interval (:meth:`CompletedSplit.group_ci`), and two
groups their difference, jackknifed bucket by bucket (:meth:`CompletedSplit.group_difference`).

A per-query shift of the scores leaves every number unchanged (``rho``, ``Ã`` and
``log A`` are all shift-free). Conventions: interactions between the cut and the scores
go to the scores' part (the missing past is assumed relative); the profile measured at
late queries is assumed for the missing past of early ones; a head whose mass does not
converge (a power law with ``p <= 1``) has a horizon-dependent answer.

>>> split = completed_split(stats.conditions["causal"])      # doctest: +SKIP
>>> split.summary()["mask_share"]                             # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy.stats import norm

from rope_leak.engine.start_cut import StartCutStatistics, profile_counts
from rope_leak.engine.statistics import ConditionStatistics
from rope_leak.fits.degenerate import degenerate_heads, fold_scored_variance
from rope_leak.fits.position_models import absolute_projector
from rope_leak.fits.projection import BucketProjection, pair_products
from rope_leak.quantities import pooled_ratio

COMPENSATING_CROSS = 0.5
"""A head whose cross term is below ``-COMPENSATING_CROSS x SS(log A)`` is *compensating*:
its two parts are large and cancel, so one share does not describe it."""


def imputed_past(profile: np.ndarray, window: int, horizon: int | None = None) -> np.ndarray:
    """``T_i`` (``[..., n]``) from the profile ``ā`` (``[..., n]``): the mass of offsets
    ``i + 1 .. horizon`` relative to the window's (``min(w, i)`` nearest offsets);
    0 for row 0 (no window)."""
    n = profile.shape[-1]
    horizon = n - 2 if horizon is None else min(int(horizon), n - 2)
    upto = np.where(np.arange(n) <= horizon, profile, 0.0)
    tail = np.cumsum(upto[..., ::-1], -1)[..., ::-1]  # tail[d] = sum_{d' >= d}
    past = np.concatenate([tail[..., 1:], np.zeros(profile.shape[:-1] + (1,))], -1)  # d > i
    head = np.concatenate([np.zeros(profile.shape[:-1] + (1,)), np.cumsum(profile, -1)], -1)
    size = np.minimum(window, np.arange(n))  # window keys of query i
    window_mass = np.take(head, size, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(window_mass > 0, past / np.where(window_mass > 0, window_mass, 1.0), 0.0)
    out[..., 0] = 0.0
    return out


def mean_profile(cut: StartCutStatistics, leave_out: int | None = None) -> np.ndarray:
    """``ā`` (``[layer, head, n]``) from every bucket but ``leave_out``."""
    buckets = cut.buckets
    prompts = np.bincount(buckets, minlength=cut.n_buckets).astype(float)
    keep = np.ones(cut.n_buckets, dtype=bool)
    if leave_out is not None:
        keep[leave_out] = False
    total = cut.profile_sum[keep].sum(0)
    count = profile_counts(cut.n_tokens, cut.window) * prompts[keep].sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.where(count > 0, count, 1.0), 0.0)


def mask_part_rows(cut: StartCutStatistics, horizon: int | None = None,
                   cross_fit: bool = True) -> np.ndarray:
    """``m`` per prompt, ``[prompt, layer, head, n]``, each bucket's prompts with the
    profile of the other buckets (``cross_fit=False``: of all prompts)."""
    out = np.zeros_like(cut.log_rho)
    buckets = cut.buckets
    for g in np.unique(buckets):
        past = imputed_past(mean_profile(cut, g if cross_fit else None), cut.window, horizon)
        rows = buckets == g
        with np.errstate(divide="ignore"):
            log_t = np.log(past)  # -inf where nothing is imputed: m = 0
        out[rows] = np.logaddexp(0.0, cut.log_rho[rows] + log_t)  # log(1 + rho T)
    out[~np.isfinite(out)] = 0.0
    return out


def row_projection(design, rows: np.ndarray, buckets: np.ndarray, n_buckets: int) -> BucketProjection:
    """:class:`BucketProjection` of a target constant along each query row, from its
    per-prompt rows ``[prompt, layer, head, n]``."""
    scored = design.row_count > 0
    rows = np.where(scored, rows, 0.0)
    shape = (n_buckets,) + rows.shape[1:]
    sums, sumsq = np.zeros(shape), np.zeros(shape[:-1])
    np.add.at(sums, buckets, rows)
    np.add.at(sumsq, buckets, (rows * rows * design.row_count).sum(-1))
    xty = design.row_xty(torch.from_numpy(sums)).numpy()
    return BucketProjection(absolute_projector(design).project(xty),
                            xty[..., design.relative_columns].sum(-1), sumsq,
                            np.bincount(buckets, minlength=n_buckets).astype(float), design.n_cells)


@dataclass(repr=False)
class CompletedSplit:
    """Per head ``[layer, head]``, per prompt, debiased: ``total = SS(D log A)``,
    ``mask = SS(D m)``, ``scores = SS(D y^S)``, ``cross = 2 <D y^S, D m>``, ``mask_inner =
    <D m, D log A>``; ``sst`` the per-prompt total sum of squares of ``log A``.

    ``degenerate``: scored variance below the floor; ``not_estimable``: ``SS(D log A)`` not
    above its noise (its jackknife interval reaches 0). Both are left out of the pools.
    """

    total: np.ndarray
    mask: np.ndarray
    scores: np.ndarray
    cross: np.ndarray
    mask_inner: np.ndarray
    sst: np.ndarray
    degenerate: np.ndarray
    not_estimable: np.ndarray
    imputed_past_mass: np.ndarray  # T at i = w, from the full-sample profile
    missing_mass: np.ndarray  # mean over prompts and scored queries of r_i = 1 - exp(-m_i)
    window: int
    horizon: int
    head_ci: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [layer, head, 2]
    layer_ci: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [layer, 2]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    level: float = 0.95
    # the delete-one-bucket replicates of :meth:`sums`, name -> [replicate, layer, head]
    # (empty without the jackknife); what :meth:`group_ci` and :meth:`group_difference` pool
    replicates: dict[str, np.ndarray] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"CompletedSplit({self.total.shape[0]}x{self.total.shape[1]} heads, w={self.window}, "
                f"mask share {self.model_table()['mask_share']:.3f}, "
                f"{int(self.compensating().sum())} compensating, {int(self.not_estimable.sum())} not estimable)")

    @property
    def keep(self) -> np.ndarray:
        return ~self.degenerate & ~self.not_estimable

    def sums(self) -> dict[str, np.ndarray]:
        """The per-head debiased sums of squares by name (``total``, ``mask``, ``scores``,
        ``cross``, ``mask_inner``), ``[layer, head]``."""
        return {"total": self.total, "mask": self.mask, "scores": self.scores, "cross": self.cross,
                "mask_inner": self.mask_inner}

    @staticmethod
    def pooled(terms: dict[str, np.ndarray], keep: np.ndarray, axis=None) -> dict[str, np.ndarray]:
        """Each part as a pooled fraction of ``SS(D log A)`` over the kept heads."""
        total = terms["total"]
        return {"mask_share": pooled_ratio(terms["mask_inner"], total, keep, axis),
                "mask_part": pooled_ratio(terms["mask"], total, keep, axis),
                "scores_part": pooled_ratio(terms["scores"], total, keep, axis),
                "cross": pooled_ratio(terms["cross"], total, keep, axis)}

    def model_table(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.pooled(self.sums(), self.keep).items()}

    def layer_table(self) -> dict[str, np.ndarray]:
        return self.pooled(self.sums(), self.keep, axis=1)

    def head_table(self) -> dict[str, np.ndarray]:
        """Per-head fractions of the head's own ``SS(D log A)``; NaN where not kept."""
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(self.keep & (self.total > 0), 1.0 / self.total, np.nan)
        return {"mask_share": self.mask_inner * scale, "mask_part": self.mask * scale,
                "scores_part": self.scores * scale, "cross": self.cross * scale}

    def compensating(self) -> np.ndarray:
        """Heads whose parts are large and cancel (cross term below ``-0.5 x SS``)."""
        return self.keep & (self.head_table()["cross"] < -COMPENSATING_CROSS)

    def group(self, layers=None, heads=None) -> np.ndarray:
        """A group of heads as a boolean ``[layer, head]`` array: ``layers`` (indices, or a
        boolean per layer) and/or ``heads`` (``(layer, head)`` pairs, or a boolean
        ``[layer, head]`` array); both given: their union. Neither: every head."""
        shape = self.total.shape
        if layers is None and heads is None:
            return np.ones(shape, dtype=bool)
        out = np.zeros(shape, dtype=bool)
        if layers is not None:
            layers = np.asarray(layers)
            if layers.dtype == bool:
                if layers.shape != shape[:1]:
                    raise ValueError(f"a boolean layer group needs {shape[0]} entries, got {layers.shape}.")
                out |= layers[:, None]
            else:
                out[layers.astype(int).ravel()] = True
        if heads is not None:
            heads = np.asarray(heads)
            if heads.dtype == bool:
                if heads.shape != shape:
                    raise ValueError(f"a boolean head group needs shape {shape}, got {heads.shape}.")
                out |= heads
            else:
                heads = heads.astype(int).reshape(-1, 2)
                out[heads[:, 0], heads[:, 1]] = True
        return out

    def _group_mask(self, group) -> np.ndarray:
        """``group`` as :meth:`group` reads it: a boolean ``[layer, head]`` array or
        ``(layer, head)`` pairs (heads), a boolean ``[layer]`` array or layer indices (layers)."""
        array = np.asarray(group)
        if array.ndim == 2:
            return self.group(heads=array)
        return self.group(layers=array)

    def group_table(self, group) -> dict[str, float]:
        """Each part pooled over the kept heads of ``group`` (see :meth:`group`), as a
        fraction of their summed ``SS(D log A)``: :meth:`model_table` restricted to the group."""
        keep = self.keep & self._group_mask(group)
        return {k: float(v) for k, v in self.pooled(self.sums(), keep).items()}

    def _group_replicates(self, group) -> dict[str, np.ndarray]:
        if not self.replicates:
            raise ValueError("group intervals need the jackknife's replicates. Fix: build the split "
                             "with completed_split(..., jackknife=True) (the default).")
        keep = self.keep & self._group_mask(group)
        return self.pooled(self.replicates, keep[None], axis=(1, 2))

    def group_ci(self, group, name: str = "mask_share") -> dict:
        """The pooled ``name`` (``mask_share``, ``mask_part``, ``scores_part``, ``cross``) over
        the kept heads of ``group``, with the delete-one-bucket jackknife interval that
        :attr:`ci` and :attr:`layer_ci` use (a group of every head gives :attr:`ci`, a group of
        one layer its :attr:`layer_ci` row): ``{"estimate", "ci", "se", "heads"}``."""
        estimate = self.group_table(group)[name]
        return {**self._interval(estimate, self._group_replicates(group)[name]),
                "heads": int((self.keep & self._group_mask(group)).sum())}

    def group_difference(self, first, second, name: str = "mask_share") -> dict:
        """``group_ci(first) - group_ci(second)`` with the jackknife interval of the
        difference itself: each replicate leaves the same bucket out of both groups, so
        their correlation (the same prompts) is accounted for.
        ``{"estimate", "ci", "se", "first", "second"}`` (the last two: :meth:`group_ci`)."""
        a, b = self.group_ci(first, name), self.group_ci(second, name)
        replicates = self._group_replicates(first)[name] - self._group_replicates(second)[name]
        return {**self._interval(a["estimate"] - b["estimate"], replicates), "first": a, "second": b}

    def _interval(self, estimate: float, replicates: np.ndarray) -> dict:
        """``{"estimate", "ci", "se"}``: the normal interval at :attr:`level` from the
        jackknife standard error of ``replicates``."""
        se = jackknife_se(replicates)
        z = norm.ppf((1 + self.level) / 2)
        return {"estimate": estimate, "ci": (estimate - z * se, estimate + z * se), "se": se}

    def heads(self) -> pd.DataFrame:
        """One row per head (registry names)."""
        n_layers, n_heads = self.total.shape
        layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
        table = self.head_table()
        out = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel()})
        for name in ("mask_share", "mask_part", "scores_part", "cross"):
            out[f"completed_{name}"] = table[name].ravel()
        for name, ci in self.head_ci.items():
            out[f"completed_{name}_ci_low"] = np.where(self.keep, ci[..., 0], np.nan).ravel()
            out[f"completed_{name}_ci_high"] = np.where(self.keep, ci[..., 1], np.nan).ravel()
        out["completed_ss_log_pattern"] = self.total.ravel()
        out["completed_not_estimable"] = self.not_estimable.ravel()
        out["completed_compensating"] = self.compensating().ravel()
        out["imputed_past_mass"] = self.imputed_past_mass.ravel()
        out["missing_mass"] = self.missing_mass.ravel()
        return out

    def summary(self) -> dict:
        out = self.model_table()
        out.update({f"{k}_ci": [float(c) for c in v] for k, v in self.ci.items()})
        compensating = self.compensating()
        out.update({
            "window": self.window,
            "horizon": self.horizon,
            "ci_level": self.level,
            "heads_kept": int(self.keep.sum()),
            "heads_compensating": [f"L{l}H{h}" for l, h in zip(*np.nonzero(compensating))],
            "heads_not_estimable": [f"L{l}H{h}" for l, h in zip(*np.nonzero(self.not_estimable))],
            "heads_degenerate": int(self.degenerate.sum()),
            "median_imputed_past_mass": float(np.median(self.imputed_past_mass[self.keep]))
            if self.keep.any() else float("nan"),
            "aggregation": "pooled over non-degenerate, estimable heads: sum <D m, D log A> / "
                           "sum SS(D log A) (and likewise for each part)",
            "early_queries": f"left out: only queries w = {self.window} <= i <= n - 2 are scored",
        })
        return out


def _terms(log_a: BucketProjection, m: BucketProjection, weights: np.ndarray) -> dict[str, np.ndarray]:
    total = pair_products(log_a, log_a, weights)
    mask = pair_products(m, m, weights)
    inner = pair_products(m, log_a, weights)
    return {"total": total, "mask": mask, "mask_inner": inner,
            "scores": total - 2 * inner + mask, "cross": 2 * (inner - mask)}


def completed_split(stats: ConditionStatistics, *, horizon: int | None = None, jackknife: bool = True,
                    level: float = 0.95) -> CompletedSplit:
    """The completed split of a causal run's ``log_pattern`` (see the module docstring).

    ``horizon``: the largest offset of the imputed past (default ``n - 2``);
    ``jackknife``: delete-one-bucket intervals per head, layer and model."""
    cut = stats.start_cut
    if cut is None:
        raise ValueError(
            "the completed split needs the start cut's statistics of a run under the model's own "
            "mask. Fix: run with start_cut_window set (the default, 32; analyze does).")
    target = cut.log_pattern
    design = target.design
    log_a = BucketProjection.from_statistics(target)
    rows = mask_part_rows(cut, horizon)
    m = row_projection(design, rows, cut.buckets, target.n_buckets)
    ones = np.ones((1, target.n_buckets))
    point = {k: v[0] for k, v in _terms(log_a, m, ones).items()}
    sst = log_a.per_prompt_sst(ones)[0]
    degenerate = degenerate_heads(sst, fold_sst=fold_scored_variance(log_a))
    scored = design.row_count > 0
    past = imputed_past(mean_profile(cut), cut.window, horizon)
    missing = (-np.expm1(-rows) * design.row_count)[..., scored].sum(-1).mean(0) / design.n_cells
    split = CompletedSplit(**point, sst=sst, degenerate=degenerate,
                           not_estimable=~(point["total"] > 0), imputed_past_mass=past[..., cut.window],
                           missing_mass=missing, window=cut.window,
                           horizon=design.n_tokens - 2 if horizon is None else int(horizon), level=level)
    if jackknife:
        _jackknife(split, log_a, m, level)
    return split


def jackknife_se(values: np.ndarray) -> np.ndarray:
    """The delete-one-bucket jackknife standard error over the replicates' axis 0:
    ``sqrt((g - 1) / g * sum (v_k - mean v)^2)``, the replicates that are NaN (nothing
    kept, or no variance) left out of the mean and the sum; ``g`` counts every replicate."""
    values = np.asarray(values, dtype=float)
    g = values.shape[0]
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a head left out everywhere: NaN
        return np.sqrt((g - 1) / g * np.nansum((values - np.nanmean(values, 0)) ** 2, 0))


def _jackknife(split: CompletedSplit, log_a: BucketProjection, m: BucketProjection, level: float) -> None:
    buckets = np.flatnonzero(log_a.count > 0)
    g = len(buckets)
    if g < 3:
        raise ValueError("the completed split's intervals need prompts in at least three buckets. "
                         "Fix: use at least 6 prompts (64 recommended), or jackknife=False.")
    weights = np.ones((g, log_a.n_buckets))
    weights[np.arange(g), buckets] = 0.0
    terms = _terms(log_a, m, weights)
    split.replicates = terms
    z = norm.ppf((1 + level) / 2)

    # a head's SS(D log A) is "not above its noise" when its interval reaches 0
    split.not_estimable = ~(split.total - z * jackknife_se(terms["total"]) > 0)
    keep = split.keep
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, num in (("mask_share", "mask_inner"), ("cross", "cross")):
            se = jackknife_se(terms[num] / terms["total"])
            est = split.head_table()[name]
            split.head_ci[name] = np.stack([est - z * se, est + z * se], -1)
    point_terms = split.sums()
    for point_axis, axis, target in (((0, 1), (1, 2), split.ci), (1, 2, split.layer_ci)):
        point = CompletedSplit.pooled(point_terms, keep, axis=point_axis)
        left_out = CompletedSplit.pooled(terms, keep[None], axis=axis)
        for name, values in left_out.items():
            se = jackknife_se(values)
            low, high = point[name] - z * se, point[name] + z * se
            target[name] = (float(low), float(high)) if np.ndim(low) == 0 else np.stack([low, high], -1)
