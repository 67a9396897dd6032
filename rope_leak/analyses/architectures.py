"""Across architectures: RoPE controls (the additivity check), model specs with RoPE
variants, and the per-model comparison behind ``rope-leak compare``.

**RoPE controls** (:func:`rope_controls`). The decomposition ``L_total = L_mask + L_resid``
assumes the causal-mask and residual-stream parts add. It is recomputed with the RoPE
of every layer replaced by the identity (no rotation: logits carry no position at all
except through the residual stream) and by a scrambled RoPE (a fixed permutation of
the position ids within the prompt length), each composed with both masks
(``causal+identity``, ``bidirectional+identity``, ...). If additivity holds, the
composition ratios of the controls agree with the real one; the table reports each
difference and flags disagreement beyond a tolerance.

**Model specs** (:func:`parse_model_spec`). ``NAME[+VARIANT]`` where ``NAME`` is anything
:func:`rope_leak.backends.load_model` accepts and ``VARIANT`` one of

* ``ntk<F>``: NTK-by-parts scaling (Llama-3.1 formula) with factor ``F``, low/high
  frequency factors 1 / 4, original context ``cfg.n_ctx`` (2048 for zoo models);
* ``linear<F>``: linear position interpolation by ``F``;
* ``base<B>``: RoPE base ``B`` for the global layers (e.g. ``base5e5``).

e.g. ``smollm2-135m+ntk4``. Scaling applies to global layers only (local sliding-window
layers keep their RoPE, as in Gemma 3), at inference, via
:mod:`rope_leak.interventions.rope`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from rope_leak.analyses.bos_status import bos_label, bos_status
from rope_leak.analyses.sink_scores import GU_EPSILON, SINK_THRESHOLD, gu_alpha0
from rope_leak.backends.bridge import is_bridge, layer_kinds, window_size
from rope_leak.engine.pairs import PairSpec
from rope_leak.engine.run import run_statistics
from rope_leak.engine.statistics import ConditionStatistics, RunStatistics, TargetStatistics
from rope_leak.fits.decomposition import (
    COMPONENTS,
    Decomposition,
    composition_weights,
    layer_component_means,
)
from rope_leak.fits.depth import (
    CI_LEVEL,
    depth_slope,
    percentile_interval,
    relative_depth,
    slopes_over_depth,
)
from rope_leak.fits.projection import BucketProjection
from rope_leak.fits.shares import fit_shares
from rope_leak.fits.start_cut import completed_split
from rope_leak.inference import bootstrap_statistic, bucket_weights
from rope_leak.inference.intervals import decomposition_inference
from rope_leak.interventions.conditions import Condition, compose
from rope_leak.interventions.mask import bidirectional, causal
from rope_leak.interventions.rope import identity_rope, rope_base, rope_scaling, scrambled_rope
from rope_leak.quantities import PARTS, QUANTITIES, column

MASKS: dict[str, Condition] = {"causal": causal, "bidirectional": bidirectional}
CONTROL_NAMES = ("real", "identity", "scrambled")
#: |composition(control) - composition(real)| above this flags "disagrees".
CONTROL_TOLERANCE = 0.1


# ------------------------------------------------------------------ RoPE controls


def control_conditions(n_positions: int, seed: int = 0) -> dict[str, Condition]:
    """``{"causal", "bidirectional", "causal+identity", ..., "bidirectional+scrambled"}``."""
    ropes: dict[str, Condition | None] = {
        "real": None,
        "identity": identity_rope,
        "scrambled": partial(scrambled_rope, seed=seed, n_positions=n_positions),
    }
    out: dict[str, Condition] = {}
    for rope_name, rope in ropes.items():
        for mask_name, mask in MASKS.items():
            name = mask_name if rope is None else f"{mask_name}+{rope_name}"
            out[name] = mask if rope is None else compose(rope, mask)
    return out


def _condition_name(mask: str, control: str) -> str:
    return mask if control == "real" else f"{mask}+{control}"


def controls_table(
    stats: RunStatistics,
    target: str = "pattern",
    tolerance: float = CONTROL_TOLERANCE,
    n_boot: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    """The RoPE-controls table from statistics holding the six control conditions.

    Components and compositions are read as ``analyze`` reports them
    (:func:`ablation_columns`): debiased and cross-fitted, means over the non-degenerate
    heads and the composition pooled over them, with bucket-bootstrap CIs when ``n_boot`` > 0.
    Where the causal conditions carry the start cut, each row also has its completed split
    (``completed_*``, with jackknife intervals)."""
    rows = []
    for control in CONTROL_NAMES:
        causal_stats = stats.conditions[_condition_name("causal", control)]
        bidirectional_stats = stats.conditions[_condition_name("bidirectional", control)]
        split = completed_split(causal_stats) if causal_stats.start_cut is not None else None
        rows.append({"control": control, "target": target, **_completed_columns(split),
                     **ablation_columns(causal_stats, bidirectional_stats, target, n_boot, seed)})
    table = pd.DataFrame(rows)
    composition = column("composition")
    table[f"{composition}_minus_real"] = table[composition] - table.loc[table["control"] == "real",
                                                                        composition].iloc[0]
    difference = table[f"{composition}_minus_real"]
    # None where a composition is not estimable: neither agreeing nor disagreeing
    table["agrees_with_real"] = [None if np.isnan(d) else bool(abs(d) <= tolerance) for d in difference]
    table["tolerance"] = tolerance
    return table


def rope_controls(
    model: HookedTransformer,
    tokens: torch.Tensor,
    *,
    target: str = "pattern",
    spec: PairSpec = PairSpec(),
    batch_size: int = 8,
    n_buckets: int | None = None,
    seed: int = 0,
    tolerance: float = CONTROL_TOLERANCE,
    n_boot: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Recompute the decomposition under identity and scrambled RoPE (six conditions,
    one streaming pass) and compare each composition ratio with the real one.

    Returns one row per control (``real``, ``identity``, ``scrambled``): the columns of
    :func:`ablation_columns` (``L_total_debiased``, ..., ``composition_debiased``,
    ``composition_crossfit``), ``composition_debiased_minus_real`` and ``agrees_with_real``
    (``|difference| <= tolerance``); with ``n_boot`` > 0 also a bucket-bootstrap CI of
    each component and composition; and each causal condition's completed split
    (``completed_*``; prompts too short for its window skip it). The scrambled permutation
    covers positions ``0..n-1`` of the prompts (``seed`` fixes it).
    """
    stats = run_statistics(
        model, tokens, conditions=control_conditions(tokens.shape[1], seed), targets=(target,),
        spec=spec, batch_size=batch_size, n_buckets=n_buckets, progress=progress,
        start_cut_conditions=[_condition_name("causal", control) for control in CONTROL_NAMES],
    )
    return controls_table(stats, target, tolerance, n_boot, seed)


# ------------------------------------------------------------------ model specs

_VARIANT = re.compile(r"^(?P<name>.+)\+(?P<kind>ntk|linear|base)(?P<value>\d+(?:\.\d+)?(?:e\d+)?)$")


@dataclass(frozen=True)
class ModelSpec:
    """A model name plus an optional RoPE variant applied at inference."""

    spec: str
    name: str
    variant: str | None = None  # "ntk" | "linear" | "base"
    value: float | None = None

    def rope_context(self) -> Condition | None:
        if self.variant == "ntk":
            return partial(rope_scaling, kind="ntk_by_parts", factor=self.value)
        if self.variant == "linear":
            return partial(rope_scaling, kind="linear", factor=self.value)
        if self.variant == "base":
            return partial(rope_base, base=self.value)
        return None

    def conditions(self) -> dict[str, Condition]:
        rope = self.rope_context()
        if rope is None:
            return dict(MASKS)
        return {name: compose(rope, mask) for name, mask in MASKS.items()}


def parse_model_spec(spec: str) -> ModelSpec:
    """``"smollm2-135m+ntk4"`` -> ``ModelSpec(name="smollm2-135m", variant="ntk", value=4)``.
    A spec without a recognised ``+variant`` suffix is a plain model name."""
    match = _VARIANT.match(str(spec))
    if match is None:
        return ModelSpec(str(spec), str(spec))
    value = float(match["value"])
    if value <= 0 or (match["kind"] == "base" and value <= 1):
        raise ValueError(f"bad RoPE variant value in {spec!r}.")
    return ModelSpec(str(spec), match["name"], match["kind"], value)


# ------------------------------------------------------------------ comparison


@dataclass
class ModelComparison:
    """Per-model summary row and per-layer profile, with bootstrap replicates' intervals."""

    row: dict
    layers: pd.DataFrame
    extra: dict = field(default_factory=dict)


COMPONENT_NAMES = COMPONENTS


def _layer_components(shares: dict[str, np.ndarray], keep: np.ndarray) -> np.ndarray:
    """``{"causal", "bidirectional": [B, layer, head]}`` -> ``[B, 3, layer]``: per layer the
    means of ``L_total``, ``L_mask``, ``L_resid`` (order of :data:`COMPONENT_NAMES`) over the
    heads kept (``keep``: 1, or NaN for a degenerate head)."""
    return layer_component_means(shares["causal"], shares["bidirectional"], keep)


def _kind_statistics(shares: dict[str, np.ndarray], keep: np.ndarray, local: np.ndarray) -> np.ndarray:
    """``[B, 3 x 3]``: per component, the mean of the per-layer values over the
    sliding-window layers (``local``, bool per layer), over the global layers, and their
    difference (the order of :data:`rope_leak.quantities.PARTS`)."""
    per_layer = _layer_components(shares, keep)
    loc, glo = np.nanmean(per_layer[:, :, local], 2), np.nanmean(per_layer[:, :, ~local], 2)
    return np.stack([loc, glo, loc - glo], axis=2).reshape(len(per_layer), -1)


def _depth_slopes(shares: dict[str, np.ndarray], keep: np.ndarray) -> np.ndarray:
    """``[B, 3]``: each component's least-squares slope over relative depth."""
    return slopes_over_depth(_layer_components(shares, keep))


@dataclass
class _ModelFits:
    """What every part of :func:`summarize_model` reads: both conditions' statistics, their
    cross-fitted and debiased decompositions, and the bootstrap settings."""

    causal: ConditionStatistics
    bidirectional: ConditionStatistics
    target: str
    n_boot: int
    seed: int
    level: float
    crossfit: Decomposition = field(init=False)
    debiased: Decomposition = field(init=False)

    def __post_init__(self) -> None:
        cs, bs = self.shares_input["causal"], self.shares_input["bidirectional"]
        weights = composition_weights(cs, bs)  # the same statistics: the same weights for both
        self.crossfit = Decomposition(fit_shares(cs).share, fit_shares(bs).share, *weights)
        self.debiased = Decomposition(BucketProjection.from_statistics(cs).debiased_share(None)[0],
                                      BucketProjection.from_statistics(bs).debiased_share(None)[0], *weights)

    @property
    def keep(self) -> np.ndarray:
        """``[layer, head]``: 1, or NaN for a degenerate head (left out of every mean)."""
        return np.where(self.debiased.degenerate, np.nan, 1.0)

    @property
    def shares_input(self) -> dict[str, TargetStatistics]:
        """The target's statistics per condition (what the bootstrap resamples)."""
        return {"causal": self.causal.targets[self.target],
                "bidirectional": self.bidirectional.targets[self.target]}

    def point(self, statistic: Callable, decomposition: Decomposition | None = None) -> np.ndarray:
        """``statistic`` of the shares of ``decomposition`` (default: the debiased one);
        ``statistic(shares, keep)``."""
        d = self.debiased if decomposition is None else decomposition
        return statistic({"causal": d.total[None], "bidirectional": d.resid[None]}, self.keep)[0]

    def bootstrap(self, statistic: Callable):
        """Pivotal ("basic") bucket-bootstrap intervals of ``statistic`` of the debiased
        shares, one joint resample for both masks (the degenerate heads held fixed)."""
        return bootstrap_statistic(self.shares_input, partial(statistic, keep=self.keep), n_boot=self.n_boot,
                                   seed=self.seed, level=self.level, share="debiased", method="basic")

    def intervals(self, statistic: Callable, n_values: int) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)`` of :meth:`bootstrap`; NaN without resamples."""
        if not self.n_boot:
            low = high = np.full(n_values, np.nan)
            return low, high
        boot = self.bootstrap(statistic)
        return boot.ci_low, boot.ci_high

    def sink_scores(self) -> np.ndarray:
        """``[layer, head]``: the mean over prompts of each head's sink score."""
        return self.causal.sink_sum.sum(0) / self.causal.n_prompts


def ablation_columns(causal: ConditionStatistics, bidirectional: ConditionStatistics, target: str,
                     n_boot: int, seed: int = 0, level: float = CI_LEVEL,
                     crossfit: Decomposition | None = None) -> dict:
    """The bidirectional ablation's components and composition exactly as ``analyze``
    reports them, under both estimators (:mod:`rope_leak.quantities`): ``L_total_debiased``,
    ``L_mask_debiased``, ``L_resid_debiased``, ``composition_debiased`` with their intervals
    (``*_ci_low`` / ``*_ci_high``; NaN without resamples), and the same four ``*_crossfit``.
    Means over the non-degenerate heads; the composition pools their sums of squares.
    ``crossfit``: the cross-fitted decomposition of these statistics, when the caller has it."""
    inference = decomposition_inference(causal, bidirectional, target, n_boot=max(n_boot, 1),
                                        seed=seed, level=level)
    summary = inference.summary()
    if crossfit is None:
        c, b = causal.targets[target], bidirectional.targets[target]
        crossfit = Decomposition.of(fit_shares(c).share, fit_shares(b).share, c, b)
    crossfit = crossfit.summary()
    row: dict = {}
    for name in (*COMPONENT_NAMES, "composition"):
        key = name if name == "composition" else f"{name}_mean"
        row[column(name)] = summary[key]
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = summary[f"{key}_ci"] if n_boot else (np.nan, np.nan)
        row[column(name, "crossfit")] = crossfit[name]
    row["composition_estimable"] = summary["composition_estimable"]  # for both estimators
    if not summary["composition_estimable"]:
        row[column("composition", "crossfit")] = np.nan
    row["composition_aggregation"] = QUANTITIES["composition"].aggregation
    row["heads_degenerate"] = summary["degenerate_heads"]
    violated = inference.mask.high < 0 if n_boot else inference.mask.estimate < 0
    row["heads_additivity_violated"] = int((violated & ~inference.degenerate).sum())
    row["additivity_violated"] = bool(row["L_mask_ci_high"] < 0) if n_boot else bool(row[column("L_mask")] < 0)
    return row


def _completed_columns(split) -> dict:
    """``completed_*``: the completed split's summary with its intervals (none without it)."""
    if split is None:
        return {}
    completed = split.summary()
    row: dict = {}
    for name in ("mask_share", "cross", "mask_part", "scores_part"):
        row[f"completed_{name}"] = completed[name]
        row[f"completed_{name}_ci_low"], row[f"completed_{name}_ci_high"] = completed.get(
            f"{name}_ci", (np.nan, np.nan))
    row["completed_heads_compensating"] = len(completed["heads_compensating"])
    row["completed_heads_kept"] = completed["heads_kept"]
    return row


def _depth_slope_columns(fits: _ModelFits, bar: tqdm) -> tuple[dict, dict]:
    """``(columns, fits)``: each component's depth slope, debiased with its bootstrap
    interval (``*_ci_low`` / ``*_ci_high``) and the ``linregress`` t interval over layers
    (``*_t_low`` / ``*_t_high``), and cross-fitted; each t fit also as a dict."""
    point, crossfit = fits.point(_depth_slopes), fits.point(_depth_slopes, fits.crossfit)
    low, high = fits.intervals(_depth_slopes, len(COMPONENT_NAMES))
    if fits.n_boot:
        bar.update()
    layer_means = fits.debiased.layer_means()
    row, slopes = {}, {}
    for k, name in enumerate(COMPONENT_NAMES):
        stem = f"depth_slope_{name}"
        row[column(stem)], row[column(stem, "crossfit")] = float(point[k]), float(crossfit[k])
        row[f"{stem}_ci_low"], row[f"{stem}_ci_high"] = float(low[k]), float(high[k])
        fit = depth_slope(layer_means[name], fits.level)
        row[f"{stem}_t_low"], row[f"{stem}_t_high"] = fit.ci_low, fit.ci_high
        slopes[name] = fit.to_dict()
    return row, slopes


def _sink_head_columns(fits: _ModelFits, sink_threshold: float) -> dict:
    """``sink_heads`` (sink score above the threshold) with a percentile interval over a
    bucket resample."""
    sink = fits.sink_scores()
    row: dict = {"sink_heads": int((sink > sink_threshold).sum())}
    if fits.n_boot:
        count = fits.shares_input["causal"].count
        weights = bucket_weights(count, fits.n_boot, np.random.default_rng(fits.seed + 1))
        boot_sinks = (np.einsum("bg,glh->blh", weights, fits.causal.sink_sum)
                      / (weights @ count)[:, None, None] > sink_threshold).sum((1, 2))
        row["sink_heads_ci_low"], row["sink_heads_ci_high"] = percentile_interval(boot_sinks, fits.level)
    else:
        row["sink_heads_ci_low"] = row["sink_heads_ci_high"] = np.nan
    return row


def _layer_table(fits: _ModelFits, spec: str, bar: tqdm) -> pd.DataFrame:
    """Per layer: each component's mean over the non-degenerate heads, debiased (with its
    pivotal interval when there are resamples) and cross-fitted."""
    n_layers = fits.debiased.total.shape[0]
    layers = pd.DataFrame({"model": spec, "layer": np.arange(n_layers), "relative_depth": relative_depth(n_layers)})
    debiased, crossfit = fits.debiased.layer_means(), fits.crossfit.layer_means()
    for name in COMPONENT_NAMES:
        layers[column(name)], layers[column(name, "crossfit")] = debiased[name], crossfit[name]
    if fits.n_boot:
        per_layer = fits.bootstrap(_layer_components)
        for k, name in enumerate(COMPONENT_NAMES):
            layers[f"{name}_ci_low"] = per_layer.ci_low[k]
            layers[f"{name}_ci_high"] = per_layer.ci_high[k]
        bar.update()
    return layers


def _insert_kind_column(layers: pd.DataFrame, kinds: Sequence[str]) -> np.ndarray:
    """Add the ``kind`` column to ``layers``; returns which layers are sliding-window ones."""
    kinds = [str(k) for k in kinds]
    if len(kinds) != len(layers):
        raise ValueError(f"kinds has {len(kinds)} entries for {len(layers)} layers.")
    layers.insert(2, "kind", kinds)
    return np.array([k == "local" for k in kinds])


def _kind_columns(fits: _ModelFits, local: np.ndarray, split) -> dict:
    """Layer counts per kind and, when both kinds occur, each component over the
    sliding-window layers, the global layers and their difference (``L_resid_local_debiased``,
    ... with intervals) and the completed split pooled over each kind's heads."""
    row: dict = {"n_local_layers": int(local.sum()), "n_global_layers": int((~local).sum())}
    if not local.any() or local.all():
        return row
    statistic = partial(_kind_statistics, local=local)
    point, (low, high) = fits.point(statistic), fits.intervals(statistic, len(COMPONENT_NAMES) * len(PARTS))
    k = 0
    for name in COMPONENT_NAMES:
        for part in PARTS:
            row[column(name, part=part)] = float(point[k])
            row[f"{name}_{part}_ci_low"], row[f"{name}_{part}_ci_high"] = float(low[k]), float(high[k])
            k += 1
    if split is not None:  # the completed split pooled over each kind's heads
        for part, heads in (("local", local), ("global", ~local)):
            terms = split.pooled(split.sums(), split.keep & heads[:, None], axis=(0, 1))
            row[column("completed_mask_share", part=part)] = float(terms["mask_share"])
            row[column("completed_cross", part=part)] = float(terms["cross"])
    return row


def summarize_model(
    stats: RunStatistics,
    spec: str,
    *,
    target: str = "pattern",
    n_boot: int = 200,
    seed: int = 0,
    sink_threshold: float = SINK_THRESHOLD,
    level: float = CI_LEVEL,
    progress: bool = False,
    kinds: Sequence[str] | None = None,
) -> ModelComparison:
    """The completed split, the ablation's components and composition, sink heads and
    depth slopes of one model, with CIs; every column named as in :mod:`rope_leak.quantities`.

    ``completed_*``: the completed split of ``log A`` (the headline) with its jackknife
    intervals. The ablation's columns are those of :func:`ablation_columns`, the numbers
    ``analyze`` prints for the same run: ``*_debiased`` from the debiased shares (the
    cross-fitted share is biased low at small prompt counts), with pivotal ("basic")
    cluster-bootstrap intervals over prompt buckets (one joint resample for both masks;
    :func:`rope_leak.inference.bootstrap_statistic`), and ``*_crossfit``. Means are over the
    non-degenerate heads and the composition pools their sums of squares, for both
    estimators. Depth slopes (``depth_slope_*``) also carry the ``linregress`` t interval
    over layers (``*_t_low`` / ``*_t_high``). ``sink_heads`` counts heads with sink score
    above the threshold; its interval is a percentile interval over the same kind of
    resample. ``progress``: a progress bar over the bootstrap steps.

    ``kinds`` (``"local"`` for a sliding-window layer, ``"global"`` otherwise, one per
    layer) adds a ``kind`` column to the per-layer table and, when both kinds occur, the
    row's ``{L_total,L_mask,L_resid}_{local,global,local_minus_global}_debiased``: the mean
    of the per-layer values over the sliding-window layers, over the global layers, and
    their difference, each with its pivotal bucket-bootstrap interval (the same resample
    as the other intervals, so the difference keeps the pairing of the two means), and
    ``completed_mask_share_{local,global}``.
    """
    fits = _ModelFits(stats.conditions["causal"], stats.conditions["bidirectional"], target,
                      n_boot=n_boot, seed=seed, level=level)
    design = fits.shares_input["causal"].design
    bar = tqdm(total=2 if n_boot else 0, desc=f"bootstrap CIs of {spec} ({n_boot} resamples)",
               disable=not progress or not n_boot, leave=False)
    row: dict = {"model": spec, "target": target, "n_prompts": fits.causal.n_prompts,
                 "n_tokens": int(design.n_tokens) if hasattr(design, "n_tokens") else None,
                 "n_layers": fits.crossfit.total.shape[0], "n_heads": fits.crossfit.total.shape[1]}
    split = completed_split(fits.causal) if fits.causal.start_cut is not None else None
    row.update(_completed_columns(split))
    row.update(ablation_columns(fits.causal, fits.bidirectional, target, n_boot, seed, level, fits.crossfit))
    slope_columns, slopes = _depth_slope_columns(fits, bar)
    row.update(slope_columns)
    row.update(_sink_head_columns(fits, sink_threshold))
    row["n_boot"] = n_boot
    layers = _layer_table(fits, spec, bar)
    bar.close()
    layers["sink_heads"] = (fits.sink_scores() > sink_threshold).sum(1)
    if kinds is not None:
        row.update(_kind_columns(fits, _insert_kind_column(layers, kinds), split))
    if split is not None:
        layer_table = split.layer_table()
        layers["completed_mask_share"] = layer_table["mask_share"]
        layers["completed_cross"] = layer_table["cross"]
    return ModelComparison(row, layers, {"slopes_t": slopes})


def model_layer_kinds(model: HookedTransformer) -> list[str]:
    """``"local"`` (sliding-window) or ``"global"`` for every layer of ``model``."""
    if is_bridge(model):
        return layer_kinds(model)
    return [str(getattr(block.attn, "attn_type", "global")) for block in model.blocks]


def model_facts(model: HookedTransformer, tokens: torch.Tensor, stats: RunStatistics) -> dict:
    """What ``compare`` shows beside the numbers: head total, BOS status, context and
    sliding window, and Gu et al.'s sink-head count (alpha_0 > 0.3)."""
    status = bos_status(model, tokens, measure=False)
    kinds = model_layer_kinds(model)
    window = window_size(model) if is_bridge(model) else getattr(model.cfg, "window_size", None)
    local = sum(kind == "local" for kind in kinds)
    return {
        "n_heads_total": int(model.cfg.n_layers * model.cfg.n_heads),
        "sink_heads_gu": int((gu_alpha0(stats.conditions["causal"]) > GU_EPSILON).sum()),
        "bos": bos_label(status),
        "model_prepends_bos": status["model_prepends_bos"],
        "prompts_with_bos_at_position_zero": status["prompts_with_bos_at_position_zero"],
        "n_ctx": int(model.cfg.n_ctx),
        "window": int(window) if local and window is not None else None,
        "local_layers": int(local),
    }


def compare_models(
    specs: Iterable[str],
    *,
    load: Callable[[str], HookedTransformer],
    tokens_for: Callable[[HookedTransformer], torch.Tensor],
    target: str = "pattern",
    spec: PairSpec = PairSpec(),
    batch_size: int = 8,
    n_buckets: int | None = None,
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = lambda _msg: None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Run every model spec through the same corpus (tokenised by each model) and
    summarise. Variants of one base model share one loaded model and one token set.

    Returns ``(table, layers, info)``: one row per spec, one row per (spec, layer), and
    per spec the depth-slope fits and timings.
    """
    parsed = [parse_model_spec(s) for s in specs]
    loaded: dict[str, tuple[HookedTransformer, torch.Tensor]] = {}
    rows, layer_tables, info = [], [], {}
    first_seen = {ms.name: k for k, ms in reversed(list(enumerate(parsed)))}
    # process variants of one base model together (one load), report in the given order
    order = sorted(range(len(parsed)), key=lambda k: (first_seen[parsed[k].name], k))
    results: dict[int, tuple[dict, pd.DataFrame, dict]] = {}
    for k in order:
        ms = parsed[k]
        if ms.name not in loaded:
            loaded.clear()  # keep one model in memory at a time
            log(f"loading {ms.name} ...")
            model = load(ms.name)
            loaded[ms.name] = (model, tokens_for(model))
        model, tokens = loaded[ms.name]
        log(f"running {ms.spec} on {tokens.shape[0]} x {tokens.shape[1]} tokens ...")
        started = time.perf_counter()
        stats = run_statistics(model, tokens, conditions=ms.conditions(), targets=(target,),
                               spec=spec, batch_size=batch_size, n_buckets=n_buckets,
                               progress=progress)
        result = summarize_model(stats, ms.spec, target=target, n_boot=n_boot, seed=seed,
                                 progress=progress, kinds=model_layer_kinds(model))
        result.row.update(model_facts(model, tokens, stats))
        result.row["seconds"] = time.perf_counter() - started
        results[k] = (result.row, result.layers, {
            **result.extra, "seconds": result.row["seconds"], "variant": ms.variant,
            "variant_value": ms.value, "base_model": ms.name,
            "tokens_shape": list(tokens.shape)})
    for k, ms in enumerate(parsed):
        row, layer_table, extra = results[k]
        rows.append(row)
        layer_tables.append(layer_table)
        info[ms.spec] = extra
    return pd.DataFrame(rows), pd.concat(layer_tables, ignore_index=True), info
