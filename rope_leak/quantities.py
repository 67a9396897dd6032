"""The estimator registry: one definition, one estimator and one aggregation per quantity.

Every number rope_leak reports is one of the :data:`QUANTITIES` below, read under one
estimator. Its column (or summary key) is ``{name}_{estimator}`` — e.g.
``L_total_debiased``, ``L_total_crossfit`` — except for quantities with a single
estimator, whose name is already unambiguous (``completed_mask_share``). Tables, figures,
``compare`` rows and the report all go through :func:`column`, so a name never means a
debiased number in one table and a cross-fitted one in another.

>>> column("L_total", "debiased")
'L_total_debiased'
>>> column("completed_mask_share")
'completed_mask_share'
>>> QUANTITIES["composition"].aggregation
'pooled sums of squares over non-degenerate heads'
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ESTIMATORS = {
    "debiased": "U-statistic over pairs of distinct prompt buckets (unbiased numerator); "
                "delete-one-bucket jackknife or bucket-bootstrap intervals",
    "crossfit": "fit on one half of the prompts, score on the other, averaged both ways "
                "(the definition; biased low at realistic prompt counts)",
    "plugin": "plain mean over prompts (no fitted model, no bias to remove)",
}

NOT_ESTIMABLE = "not estimable"
"""What is printed in place of a number that cannot be estimated (a ratio over a baseline
whose interval reaches 0, a spread over one prompt)."""

POOLED = "pooled sums of squares over non-degenerate heads"
"""The one aggregation of every ratio over heads: ``sum_h numerator_h / sum_h
denominator_h`` over the heads kept, so that a head weighs what it actually varies."""


@dataclass(frozen=True)
class Quantity:
    """One reported quantity.

    Attributes:
        name: the stem of its column and summary key.
        definition: what it is, in one sentence.
        estimators: the estimators it is reported under (the first is the headline).
        aggregation: how heads are combined into a layer or model value.
        suffixed: whether its columns carry the estimator suffix (False only for a
            quantity with a single estimator).
    """

    name: str
    definition: str
    estimators: tuple[str, ...]
    aggregation: str
    suffixed: bool = True

    def column(self, estimator: str | None = None, part: str | None = None) -> str:
        estimator = estimator or self.estimators[0]
        if estimator not in self.estimators:
            raise KeyError(f"{self.name} has no {estimator!r} estimator; it has {self.estimators}.")
        stem = self.name if part is None else f"{self.name}_{part}"
        return f"{stem}_{estimator}" if self.suffixed else stem


def _q(name, definition, estimators=("debiased", "crossfit"), aggregation="mean over non-degenerate heads",
       suffixed=True) -> Quantity:
    return Quantity(name, definition, tuple(estimators), aggregation, suffixed)


QUANTITIES: dict[str, Quantity] = {q.name: q for q in (
    _q("L_total", "absolute-position share dR2 = R2(M_abs) - R2(M_rel) under the model's own causal mask"),
    _q("L_resid", "the same share with every layer's mask swapped for a bidirectional one "
                  "(the ablation; same causal pairs scored)"),
    _q("L_mask", "L_total - L_resid (the ablation's mask part)"),
    _q("composition", "the ablation's mask share sum L_mask / sum L_total, the paper's "
                      "method; biased by the end of the prompt at long n", aggregation=POOLED),
    *(_q(f"depth_slope_{name}", f"least-squares slope of the per-layer {name} (mean over the "
                                "layer's non-degenerate heads) against relative depth "
                                "layer / (n_layers - 1)", aggregation="one value per model")
      for name in ("L_total", "L_mask", "L_resid")),
    _q("completed_mask_share", "the start cut's share of log A's absolute position: "
                               "<D m, D log A> / SS(D log A), m_i = log(1 + rho_i T_i)",
       estimators=("debiased",), aggregation=POOLED, suffixed=False),
    _q("completed_mask_part", "SS(D m) / SS(D log A): the start cut's own sum of squares",
       estimators=("debiased",), aggregation=POOLED, suffixed=False),
    _q("completed_scores_part", "SS(D y^S) / SS(D log A), y^S = log A - m: the scores with the "
                                "missing past filled in", estimators=("debiased",), aggregation=POOLED,
       suffixed=False),
    _q("completed_cross", "2 <D y^S, D m> / SS(D log A): mask_part + scores_part + cross = 1",
       estimators=("debiased",), aggregation=POOLED, suffixed=False),
    _q("imputed_past_mass", "T_w: the imputed mass before position 0, in units of the window's "
                            "mass, at query i = w", estimators=("plugin",),
       aggregation="median over heads", suffixed=False),
    _q("sink_score", "mean over queries i >= 1 of A[i, 0]", estimators=("plugin",),
       aggregation="per head", suffixed=False),
    _q("alpha0_gu", "Gu et al.'s alpha_0 = mean over queries i >= 0 of A[i, 0] (query 0 included)",
       estimators=("plugin",), aggregation="per head", suffixed=False),
)}


PARTS = ("local", "global", "local_minus_global")
"""Subsets of layers a quantity can be restricted to: the sliding-window layers, the
global layers, and their difference (``L_resid_local_debiased``)."""


def column(name: str, estimator: str | None = None, part: str | None = None) -> str:
    """The column / summary key of quantity ``name`` under ``estimator`` (default: its
    headline estimator), optionally restricted to a ``part`` of the layers (:data:`PARTS`).
    Its interval, where it has one (the headline estimator only), is ``{stem}_ci_low`` /
    ``{stem}_ci_high``, the stem being the column without its estimator suffix.

    >>> column("L_resid", "debiased", part="local")
    'L_resid_local_debiased'
    """
    if name not in QUANTITIES:
        raise KeyError(f"unknown quantity {name!r}; registered: {sorted(QUANTITIES)}.")
    if part is not None and part not in PARTS:
        raise KeyError(f"unknown part {part!r}; choose from {PARTS}.")
    return QUANTITIES[name].column(estimator, part)


def pooled_ratio(numerator: np.ndarray, denominator: np.ndarray, keep: np.ndarray, axis=None) -> np.ndarray:
    """:data:`POOLED`: ``sum numerator / sum denominator`` over the heads in ``keep``
    (``axis``: the heads' axes; None pools the whole model); NaN where nothing is kept or
    the pooled denominator is not positive."""
    keep = np.broadcast_to(keep, np.shape(numerator))
    num = np.nansum(np.where(keep, numerator, 0.0), axis=axis)
    den = np.nansum(np.where(keep, denominator, 0.0), axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def registry_table():
    """Every quantity as a DataFrame (name, columns, definition, aggregation)."""
    import pandas as pd  # deferred: the registry itself needs only numpy

    return pd.DataFrame([{"quantity": q.name, "columns": ", ".join(q.column(e) for e in q.estimators),
                          "definition": q.definition, "aggregation": q.aggregation}
                         for q in QUANTITIES.values()])
