"""BOS interventions: replace what enters the model at position 0 and measure what changes
at early queries.

For each replacement of the position-0 embedding (before the forward pass):

* ``token`` — embedding of another token (``token_id``; default: the most common token
  of the prompts' positions ``>= 1``, see :func:`default_replacement_token`);
* ``mean``  — the mean token embedding;
* ``zeros`` — a zero vector;
* ``noise`` — Gaussian noise rescaled to the norm of the embedding it replaces;

the prompts are run under the causal mask and scored on the early-query pairs
(``1 <= j <= i < early``, default ``early = 32``). Under the causal mask query ``i`` sees
tokens ``0..i`` only, so the prompts are cut to their first ``early`` tokens: later tokens
cannot change anything that is scored (tested against full-length runs).

**What is measured.** The quantity that is there at early queries: the *scores'
absolute-position sum of squares*, ``SS_abs(s) = ||D mu||^2`` where ``mu`` is the
expected per-prompt cell vector of the pre-softmax scores on the scored pairs and ``D =
H_abs - H_rel`` projects onto what absolute position adds to the saturated offset model
(:mod:`rope_leak.fits.projection`). It is estimated without bias by the U-statistic over
pairs of distinct prompts (``sum_{p != p'} <D y_p, D y_p'> / #pairs``; the same numerator as
the debiased share), per head, and averaged over heads. The scores carry what the residual
stream gives the logits (the causal denominator is not in them), so this is where a change
of the position-0 stream shows. Beside it, ``L_total``: the debiased absolute-position share
of the pattern at the same pairs.

Ratios to the baseline (``scores_ss_relative``, ``L_total_relative``) come with paired
bootstrap CIs (one resample of prompt buckets for every condition). A ratio whose
baseline's CI includes 0 is **not estimable**: NaN in the table, null in JSON, a dash in
the report (``*_estimable`` columns say which).

**The completed split's parts** (``scores_part_ss``, ``mask_part_ss``): each condition
also runs the start cut with a window of :data:`BOS_WINDOW` keys, so the early queries
``w <= i < early`` get the completed split of ``log A``: ``SS(D y^S)``, the scores' part with
the missing past filled in (what the residual stream carries, gauge-invariant), and
``SS(D m)``, the start cut's. Debiased, mean over heads, with pivotal bootstrap CIs and
ratios to the baseline (``scores_part_relative``: the fraction of the residual-stream part
that a replacement leaves).

Gauge caveat: adding any ``c_i`` to every score of query ``i`` leaves the pattern unchanged
and moves the scores' query effect, which ``D`` counts. ``SS_abs(s)`` therefore measures the
scores as the model computes them (``q_i . k_j / sqrt(d_head)``), not a property of ``A``
alone; ``L_total`` is the pattern-level companion.

Not included: "replace all" (position 0's stream pinned at every layer to another token's
trajectory). Under the causal mask position 0 is a closed system, so it equals the
``token`` replacement exactly (tested in ``tests/analyses/test_sinks.py``) and adds nothing; the
context manager stays available as
:func:`rope_leak.interventions.position_zero_patch.replace_all_position_zero`.
The bidirectional ablation's ``L_resid`` is available with ``bidirectional=True`` (full-length
prompts under both masks; six times the cost): the replacements change bidirectional
patterns too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
from torch import Tensor
from transformer_lens import HookedTransformer

from rope_leak.display import Displayable
from rope_leak.engine.pairs import PairSpec
from rope_leak.engine.run import run_statistics
from rope_leak.engine.statistics import RunStatistics, TargetStatistics
from rope_leak.fits.projection import BucketProjection, pair_products
from rope_leak.fits.start_cut import mask_part_rows, row_projection
from rope_leak.inference.bootstrap import bootstrap_statistic, bucket_weights
from rope_leak.interventions.conditions import compose
from rope_leak.interventions.mask import bidirectional as bidirectional_mask
from rope_leak.interventions.position_zero import replace_position_zero
from rope_leak.quantities import column

ESTIMATORS = ("debiased", "crossfit")
REPLACEMENTS = ("token", "mean", "zeros", "noise")
EARLY_QUERIES = PairSpec(max_query=32)
BOS_WINDOW = 8
"""The start cut's window at early queries (queries ``8 <= i < 32`` are scored)."""


def _plugin_products(a: BucketProjection, b: BucketProjection, weights: np.ndarray) -> np.ndarray:
    """The plug-in ``<D c̄_a, D c̄_b>`` of the weighted cell means (the bootstrap world's value)."""
    full = np.einsum("bg,lhgk,bk->blh", weights, a.bucket_products(b), weights)
    return full / ((weights @ a.count) ** 2)[:, None, None]


def completed_parts(log_a: BucketProjection, m: BucketProjection, weights: np.ndarray | None = None,
                    debiased: bool = True) -> dict[str, np.ndarray]:
    """``SS(D y^S)`` and ``SS(D m)`` per head, ``[B, layer, head]``, of the completed split
    (``y^S = log A - m``) for bucket weights ``[B, bucket]``."""
    w = np.ones((1, log_a.n_buckets)) if weights is None else np.atleast_2d(np.asarray(weights, float))
    product = partial(pair_products, weights=w) if debiased else partial(_plugin_products, weights=w)
    total, inner, mask = product(log_a, log_a), product(m, log_a), product(m, m)
    return {"scores_part_ss": total - 2 * inner + mask, "mask_part_ss": mask}


def default_replacement_token(tokens: Tensor) -> int:
    """The most common token at positions ``>= 1`` (smallest id on ties)."""
    ids = tokens[:, 1:].reshape(-1).cpu().numpy()
    values, counts = np.unique(ids, return_counts=True)
    return int(values[np.argmax(counts)])


def _replacement_condition(replacement: str, token_id: int, seed: int):
    if replacement == "token":
        return partial(replace_position_zero, replacement="token", token_id=token_id)
    return partial(replace_position_zero, replacement=replacement, seed=seed)


def absolute_sum_of_squares(projection: BucketProjection, weights: np.ndarray | None = None,
                            debiased: bool = True) -> np.ndarray:
    """``||D mu||^2`` per head, ``[B, layer, head]``, for bucket weights ``[B, bucket]``.

    ``debiased``: the U-statistic over pairs of distinct prompt draws (unbiased for the
    population value); else the plug-in ``||D c_bar||^2`` of the weighted cell means (the
    value of the bootstrap world)."""
    w = np.ones((1, projection.n_buckets)) if weights is None else np.atleast_2d(np.asarray(weights, float))
    products = projection.bucket_products()  # [layer, head, g, g']
    full = np.einsum("bg,lhgk,bk->blh", w, products, w)
    n = w @ projection.count
    if not debiased:
        return full / (n**2)[:, None, None]
    self_sq = np.einsum("lhgg->glh", products)
    cross = full - np.einsum("bg,glh->blh", w, self_sq)
    pairs = n**2 - w @ projection.count**2
    if np.any(pairs <= 0):
        raise ValueError("the debiased sum of squares needs prompts in at least two buckets.")
    return cross / pairs[:, None, None]


def _interval(estimate, truth, samples, level: float):
    alpha = (1 - level) / 2
    with np.errstate(invalid="ignore"):
        lo, hi = np.nanquantile(samples, [alpha, 1 - alpha], axis=0)
    return estimate + truth - hi, estimate + truth - lo  # pivotal ("basic")


def _excludes_zero(low, high) -> np.ndarray:
    return np.isfinite(low) & np.isfinite(high) & ((low > 0) | (high < 0))


@dataclass(repr=False)
class BosInterventions(Displayable):
    """Statistics of every condition (``"{replacement}/causal"``, and ``/bidirectional``
    when run) and the tables derived from them."""

    statistics: RunStatistics
    replacements: list[str]
    token_id: int
    target: str = "pattern"
    n_boot: int = 200
    seed: int = 0
    aggregate: str = "mean"
    estimator: str = "debiased"
    level: float = 0.95
    shares: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> [layer, head]
    scores_ss: dict[str, np.ndarray] = field(default_factory=dict)  # replacement -> [layer, head]

    def __post_init__(self) -> None:
        if self.aggregate not in ("mean", "median"):
            raise ValueError(f"aggregate must be 'mean' or 'median', got {self.aggregate!r}.")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}.")
        for name, cond in self.statistics.conditions.items():
            projection = BucketProjection.from_statistics(cond.targets[self.target])
            self.shares[name] = (projection.debiased_share(None) if self.estimator == "debiased"
                                 else projection.crossfit_share(None))[0]
        for name in self.rows:
            cond = self.statistics.conditions[f"{name}/causal"]
            if "scores" in cond.targets:
                self.scores_ss[name] = absolute_sum_of_squares(
                    BucketProjection.from_statistics(cond.targets["scores"]))[0]

    @property
    def rows(self) -> list[str]:
        return ["baseline", *self.replacements]

    def _display_items(self):
        """Cheap point values only (no bootstrap): the aggregated L_total per row."""
        cond = self.statistics.conditions["baseline/causal"]
        first = next(iter(cond.targets.values()))
        items = [("token_id", self.token_id), ("prompts", cond.n_prompts),
                 ("pairs", first.design.spec.label()), ("target", self.target)]
        items += [(f"{column('L_total', self.estimator)}[{name}]", float(self._agg(self.shares[f"{name}/causal"][None])[0]))
                  for name in self.rows]
        items.append(("bidirectional", self.has_bidirectional))
        return items

    @property
    def has_bidirectional(self) -> bool:
        return "baseline/bidirectional" in self.statistics.conditions

    def _agg(self, values: np.ndarray) -> np.ndarray:
        return (np.nanmean if self.aggregate == "mean" else np.nanmedian)(values, axis=(-2, -1))

    def _stats(self, name: str, mask: str, target: str) -> TargetStatistics:
        return self.statistics.conditions[f"{name}/{mask}"].targets[target]

    def _share_rows(self, mask: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Aggregated share per row with pivotal CIs, and the paired bootstrap replicates of
        the ratios to the baseline: ``(point, low, high, ratio_samples)``."""
        stats = {name: self._stats(name, mask, self.target) for name in self.rows}
        fn = lambda sh: np.stack([self._agg(sh[name]) for name in self.rows], -1)  # noqa: E731
        if self.n_boot <= 0:
            point = fn({k: v[None] for k, v in self._point_shares(mask).items()})[0]
            return point, np.full_like(point, np.nan), np.full_like(point, np.nan), None
        result = bootstrap_statistic(stats, fn, n_boot=self.n_boot, seed=self.seed, level=self.level,
                                     share=self.estimator, method="basic", keep_samples=True)
        return result.estimate, result.ci_low, result.ci_high, result.samples

    def _point_shares(self, mask: str) -> dict[str, np.ndarray]:
        return {name: self.shares[f"{name}/{mask}"] for name in self.rows}

    def _ss_rows(self):
        """Aggregated ``SS_abs(scores)`` per row: point, pivotal CI, paired replicates."""
        projections = [BucketProjection.from_statistics(self._stats(name, "causal", "scores"))
                       for name in self.rows]
        point = np.array([self._agg(p_ss[None])[0] for p_ss in (self.scores_ss[n] for n in self.rows)])
        if self.n_boot <= 0:
            return point, np.full_like(point, np.nan), np.full_like(point, np.nan), None
        count = projections[0].count
        weights = bucket_weights(count, self.n_boot, np.random.default_rng(self.seed))
        samples = np.stack([self._agg(absolute_sum_of_squares(p, weights)) for p in projections], -1)
        truth = np.array([self._agg(absolute_sum_of_squares(p, None, debiased=False))[0] for p in projections])
        low, high = _interval(point, truth, samples, self.level)
        return point, low, high, samples

    def _completed_projections(self) -> list[tuple[BucketProjection, BucketProjection]] | None:
        """Per row, the projections of ``log A`` and of the start cut ``m`` (built once)."""
        if "_completed" not in self.__dict__:
            cuts = [self.statistics.conditions[f"{name}/causal"].start_cut for name in self.rows]
            self.__dict__["_completed"] = None if any(cut is None for cut in cuts) else [
                (BucketProjection.from_statistics(cut.log_pattern),
                 row_projection(cut.design, mask_part_rows(cut), cut.buckets, cut.n_buckets)) for cut in cuts]
        return self.__dict__["_completed"]

    def _completed_rows(self, part: str):
        """Mean over heads of one part of the completed split per row: point, pivotal CI,
        paired replicates (the same bucket resample for every row)."""
        projections = self._completed_projections()
        point = np.array([self._agg(completed_parts(a, m)[part])[0] for a, m in projections])
        if self.n_boot <= 0:
            return point, np.full_like(point, np.nan), np.full_like(point, np.nan), None
        weights = bucket_weights(projections[0][0].count, self.n_boot, np.random.default_rng(self.seed))
        samples = np.stack([self._agg(completed_parts(a, m, weights)[part]) for a, m in projections], -1)
        truth = np.array([self._agg(completed_parts(a, m, debiased=False)[part])[0] for a, m in projections])
        low, high = _interval(point, truth, samples, self.level)
        return point, low, high, samples

    def _ratios(self, point, low, high, samples) -> dict[str, np.ndarray]:
        """Ratio of every row to the baseline (row 0) with a percentile CI of the paired
        replicates; NaN where the baseline's CI includes 0 (or without bootstrap: where the
        baseline is not positive)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = point / point[0]
            if samples is not None:
                alpha = (1 - self.level) / 2
                r_lo, r_hi = np.nanquantile(samples / samples[:, :1], [alpha, 1 - alpha], axis=0)
            else:
                r_lo = r_hi = np.full_like(ratio, np.nan)
        estimable = bool(_excludes_zero(low[0], high[0])) if samples is not None else bool(point[0] > 0)
        if not estimable:
            ratio, r_lo, r_hi = (np.full_like(ratio, np.nan) for _ in range(3))
        return {"value": ratio, "low": r_lo, "high": r_hi, "estimable": estimable}

    def table(self) -> pd.DataFrame:
        """One row per replacement (and the baseline), aggregated over heads by
        :attr:`aggregate`, with pivotal bootstrap CIs (see the module docstring). Computed
        once per setting (the report, the JSON and the CSV all ask for it)."""
        key = (self.n_boot, self.seed, self.aggregate, self.estimator, self.level)
        cache = self.__dict__.setdefault("_tables", {})
        if key not in cache:
            cache[key] = self._table()
        return cache[key].copy()

    def _table(self) -> pd.DataFrame:
        table = pd.DataFrame({"replacement": self.rows})
        blocks = []
        if self.scores_ss:
            blocks.append(("scores_ss", "scores_ss_relative", self._ss_rows()))
        if self._completed_projections() is not None:
            for part in ("scores_part_ss", "mask_part_ss"):
                blocks.append((part, part.replace("_ss", "_relative"), self._completed_rows(part)))
        total, resid = column("L_total", self.estimator), column("L_resid", self.estimator)
        blocks.append((total, "L_total_relative", self._share_rows("causal")))
        if self.has_bidirectional:
            blocks.append((resid, "L_resid_relative", self._share_rows("bidirectional")))
        for name, ratio_name, (point, low, high, samples) in blocks:
            table[name], table[f"{name}_low"], table[f"{name}_high"] = point, low, high
            ratio = self._ratios(point, low, high, samples)
            table[ratio_name] = ratio["value"]
            table[f"{ratio_name}_low"], table[f"{ratio_name}_high"] = ratio["low"], ratio["high"]
            table[f"{ratio_name}_estimable"] = ratio["estimable"]
        if self.has_bidirectional:
            table[column("L_mask", self.estimator)] = table[total] - table[resid]
        table["n_prompts"] = self.statistics.conditions["baseline/causal"].n_prompts
        table["token_id"] = self.token_id
        table["aggregate"] = self.aggregate
        table["estimator"] = self.estimator
        table["ci_method"] = "basic" if self.n_boot > 0 else None
        table["early_queries"] = self.statistics.metadata.get("early_queries")
        return table

def bos_interventions(
    model: HookedTransformer,
    tokens: Tensor,
    *,
    replacements: Iterable[str] = REPLACEMENTS,
    token_id: int | None = None,
    early_queries: int = 32,
    spec: PairSpec | None = None,
    target: str = "pattern",
    bidirectional: bool = False,
    n_boot: int = 200,
    batch_size: int = 8,
    n_buckets: int | None = None,
    seed: int = 0,
    aggregate: str = "mean",
    estimator: str = "debiased",
    progress: bool = False,
) -> BosInterventions:
    """Run the baseline and every replacement (see the module docstring).

    Causal only (default): the prompts are cut to their first ``early_queries + 1`` tokens, and
    all of them go through in one batch per condition (``1 + len(replacements)`` short
    passes). ``bidirectional=True`` also runs every condition under the bidirectional
    ablation, on the full-length prompts (its early queries see the whole prompt).
    ``spec`` overrides the scored pairs (its ``max_query`` then sets the cut).
    """
    replacements = list(replacements)
    unknown = set(replacements) - set(REPLACEMENTS)
    if unknown:
        raise ValueError(f"unknown replacements {sorted(unknown)}; choose from {REPLACEMENTS} "
                         "('replace_all' equals 'token' under the causal mask and is not run).")
    if len(tokens) < 4:
        raise ValueError(f"{len(tokens)} prompts are too few to cross-fit; use at least 4 (64 recommended).")
    spec = PairSpec(max_query=int(early_queries)) if spec is None else spec
    token_id = default_replacement_token(tokens) if token_id is None else int(token_id)
    # one token past the early queries: the start cut leaves out a prompt's last query
    cut = tokens.shape[1] if (bidirectional or spec.max_query is None) else min(spec.max_query + 1, tokens.shape[1])
    conditions = {}
    for name in ["baseline", *replacements]:
        replacement = None if name == "baseline" else _replacement_condition(name, token_id, seed)
        conditions[f"{name}/causal"] = compose(replacement)
        if bidirectional:
            conditions[f"{name}/bidirectional"] = compose(replacement, bidirectional_mask)
    targets = tuple(dict.fromkeys((target, "scores")))
    early = spec.max_query if spec.max_query is not None else cut
    window = BOS_WINDOW if cut >= BOS_WINDOW + 2 and early > max(spec.min_query, BOS_WINDOW) else None
    stats = run_statistics(model, tokens[:, :cut], conditions=conditions, targets=targets, spec=spec,
                           batch_size=batch_size if bidirectional else max(batch_size, min(len(tokens), 64)),
                           n_buckets=n_buckets, progress=progress, start_cut_window=window,
                           start_cut_conditions=[f"{name}/causal" for name in ["baseline", *replacements]],
                           metadata={"replacements": replacements, "token_id": token_id,
                                     "early_queries": spec.max_query, "prompt_tokens": int(cut)})
    return BosInterventions(stats, replacements, token_id, target=target, n_boot=n_boot, seed=seed,
                            aggregate=aggregate, estimator=estimator)
