"""The main analysis: stream a corpus under the causal and bidirectional masks, fit every
head's absolute-position share for each target, and decompose it.

``analyze(model, corpus)`` (a :class:`rope_leak.Corpus` or a ``[prompt, pos]`` token
tensor) returns an :class:`Analysis` whose tables are pandas DataFrames,
``analysis.head("L3H1")`` one head's numbers and fitted profiles, and whose
``save(out_dir)`` writes ``results.json``, ``heads.csv``, ``layers.csv``, the mergeable
``statistics.npz`` and ``report.html``.

Two estimators of each share appear, and every name says which:

* **debiased** (``*_debiased``, with bootstrap CIs): the headline numbers
  (:mod:`rope_leak.inference.intervals`);
* **cross-fitted** (``*_crossfit``; :meth:`Analysis.decomposition`): the definition,
  biased low at realistic prompt counts.

``docs/method.md`` has the definitions; ``rope_leak.quantities`` lists every name.
Output (figures, report, files) renders :meth:`Analysis.record`, plain tables and dicts.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from rope_leak.analyses.head_result import HeadResult
from rope_leak.analyses.sink_scores import (
    GU_EPSILON,
    SINK_THRESHOLD,
    gu_alpha0,
    position_zero_profile,
    sink_heads,
    sink_metrics,
    sink_scores,
)
from rope_leak.backends.requirements import require_rope
from rope_leak.display import Displayable
from rope_leak.engine.pairs import PairSpec
from rope_leak.engine.run import run_statistics
from rope_leak.engine.start_cut import DEFAULT_WINDOW
from rope_leak.engine.statistics import TARGETS, RunStatistics
from rope_leak.fits.decomposition import COMPONENTS, Decomposition, layer_component_means
from rope_leak.fits.profiles import abs_profiles, gauged_coefficients, per_prompt_xty
from rope_leak.fits.shares import ShareFit, cell_means, fit_shares
from rope_leak.fits.start_cut import CompletedSplit, completed_split
from rope_leak.heads import head_label, normalize_head
from rope_leak.inference.intervals import DecompositionInference, decomposition_inference
from rope_leak.output.records import AnalysisRecord, CellMeans, HeadProfiles, top_heads_table
from rope_leak.output.results import save_analysis
from rope_leak.quantities import NOT_ESTIMABLE, column

REPORTED_TARGETS = ("pattern", "log_pattern", "scores")
CONDITIONS = ("causal", "bidirectional")
MISSING_BOS_ACTIONS = ("error", "warn", "ignore")


class MissingBOSError(ValueError):
    """Prompts do not start with the BOS token that the model expects at position 0."""


class MissingBOSWarning(UserWarning):
    """``analyze(..., on_missing_bos="warn")`` on prompts without the model's BOS."""


class StrayBOSWarning(UserWarning):
    """A BOS / EOS token where the model does not put one: at position 0 of a model that
    prepends no BOS (e.g. from ``tokenizer.encode``), or after position 0."""


@dataclass(repr=False)
class Analysis(Displayable):
    """Fitted shares, decomposition and sinks of one model on one corpus.

    ``progress``: show progress bars for the slow steps (bootstrap CIs, the completed
    split's jackknife), which run on the first call that needs them."""

    statistics: RunStatistics
    target: str = "pattern"
    sink_threshold: float = SINK_THRESHOLD
    fits: dict[tuple[str, str], ShareFit] = field(default_factory=dict)
    n_boot: int = 1000
    seed: int = 0
    #: Everything :func:`analyze` was given (settings, model and token fingerprints), for
    #: ``results.json``; empty for an Analysis built by hand.
    inputs: dict = field(default_factory=dict)
    progress: bool = True
    #: BOS facts and the measured position-0 spread by token
    #: (:func:`rope_leak.analyses.bos_status.bos_status`); None when not measured (merged shards).
    bos_status: dict | None = None

    def __post_init__(self) -> None:
        if self.target not in REPORTED_TARGETS:
            raise ValueError(f"target must be one of {REPORTED_TARGETS}, got {self.target!r}.")
        missing = set(CONDITIONS) - set(self.statistics.conditions)
        if missing:
            raise ValueError(f"statistics lack the conditions {sorted(missing)}.")
        for condition in CONDITIONS:
            for target, stats in self.statistics.conditions[condition].targets.items():
                if (condition, target) not in self.fits:
                    self.fits[condition, target] = fit_shares(stats)

    # -- building blocks -----------------------------------------------------------
    @property
    def targets(self) -> list[str]:
        available = self.statistics.conditions["causal"].targets
        return [t for t in REPORTED_TARGETS if t in available]

    @property
    def n_layers(self) -> int:
        return self.fits["causal", self.target].share.shape[0]

    @property
    def n_heads(self) -> int:
        return self.fits["causal", self.target].share.shape[1]

    @property
    def n_prompts(self) -> int:
        return self.statistics.conditions["causal"].n_prompts

    def settings(self) -> dict:
        """Every setting that determines the numbers: what :func:`analyze` was given
        (model fingerprint, token sha256, batch size, ...) plus the fit settings."""
        conditions = self.statistics.conditions
        first = next(iter(conditions["causal"].targets.values()))
        return {
            **self.inputs,
            "target": self.target,
            "targets": self.targets,
            "conditions": sorted(conditions),
            "pairs": first.design.spec.to_dict(),
            "n_tokens": first.design.n_tokens,
            "n_buckets": first.n_buckets,
            "n_prompts": self.n_prompts,
            "window": None if conditions["causal"].start_cut is None else conditions["causal"].start_cut.window,
            "sink_threshold": self.sink_threshold,
            "n_boot": self.n_boot,
            "bootstrap_seed": self.seed,
        }

    def decomposition(self, target: str | None = None) -> Decomposition:
        """The *cross-fitted* components per head (``L_total``, ``L_resid``, ``L_mask``);
        the debiased ones with CIs are in :meth:`inference`."""
        target = target or self.target
        if target not in self._decompositions:
            self._decompositions[target] = Decomposition.of(
                self.fits["causal", target].share, self.fits["bidirectional", target].share,
                self.statistics.conditions["causal"].targets[target],
                self.statistics.conditions["bidirectional"].targets[target])
        return self._decompositions[target]

    @cached_property
    def _decompositions(self) -> dict[str, Decomposition]:
        return {}

    @cached_property
    def _completed(self) -> CompletedSplit | None:
        causal = self.statistics.conditions["causal"]
        if causal.start_cut is None:
            return None
        with tqdm(total=1, desc="completed split (jackknife over prompt buckets)",
                  disable=not self.progress, leave=False) as bar:
            split = completed_split(causal)
            bar.update()
        return split

    @cached_property
    def _inferences(self) -> dict[str, DecompositionInference]:
        return {}

    def inference(self, target: str | None = None) -> DecompositionInference:
        """Debiased components with bootstrap CIs, sign-flip p-values and BH q-values
        (see :mod:`rope_leak.inference.intervals`); default: the headline target."""
        target = target or self.target
        if target not in self._inferences:
            conditions = self.statistics.conditions
            with tqdm(total=1, desc=f"bootstrap CIs of {target} ({self.n_boot} resamples)",
                      disable=not self.progress, leave=False) as bar:
                self._inferences[target] = decomposition_inference(
                    conditions["causal"], conditions["bidirectional"], target,
                    n_boot=self.n_boot, seed=self.seed,
                )
                bar.update()
        return self._inferences[target]

    def diagnostics(self) -> pd.DataFrame:
        """Where the decomposition should not be read at face value, with the reason.

        * a head whose debiased ``L_mask`` is negative beyond its CI (the bidirectional
          swap raised its share: additivity violated);
        * a degenerate head (scored variance below the floor);
        * a *compensating* head of the completed split (its mask and scores' parts are
          large and cancel), and a head whose ``SS(log A)`` is not above its noise.
        Nothing is clipped; the rows only point at what to read with care.
        """
        rows = []
        inf = self.inference()
        for layer, head in zip(*np.nonzero(inf.mask.high < 0)):
            rows.append({
                "scope": "head", "where": head_label(layer, head), "issue": "additivity violated",
                "reason": (f"debiased L_mask = {inf.mask.estimate[layer, head]:.4f} with CI "
                           f"[{inf.mask.low[layer, head]:.4f}, {inf.mask.high[layer, head]:.4f}] < 0: "
                           "the bidirectional swap raised this head's share"),
            })
        for layer, head in zip(*np.nonzero(inf.degenerate)):
            rows.append({
                "scope": "head", "where": head_label(layer, head), "issue": "degenerate",
                "reason": ("scored variance below the floor (pattern nearly constant on the "
                           "scored pairs): left out of means, pools, compositions and colour scales"),
            })
        split = self.completed_split()
        if split is not None:
            table = split.head_table()
            for layer, head in zip(*np.nonzero(split.compensating())):
                rows.append({
                    "scope": "head", "where": head_label(layer, head), "issue": "compensating",
                    "reason": (f"completed split: mask part {table['mask_part'][layer, head]:.2f}, scores' "
                               f"part {table['scores_part'][layer, head]:.2f}, cross term "
                               f"{table['cross'][layer, head]:.2f} (x SS(log A)): the parts are large "
                               "and cancel; read both, not the share"),
                })
            for layer, head in zip(*np.nonzero(split.not_estimable & ~split.degenerate)):
                rows.append({
                    "scope": "head", "where": head_label(layer, head), "issue": "not estimable",
                    "reason": "completed split: debiased SS(log A) on queries w <= i <= n - 2 is not above "
                              "its noise (jackknife interval reaches 0)",
                })
        return pd.DataFrame(rows, columns=["scope", "where", "issue", "reason"])

    def completed_split(self) -> CompletedSplit | None:
        """The completed split (start cut) of the causal run's ``log A`` (see
        :mod:`rope_leak.fits.start_cut`); None when the run kept no start-cut statistics."""
        return self._completed

    def sink_scores(self, condition: str = "causal") -> np.ndarray:
        return sink_scores(self.statistics.conditions[condition])

    def sink_heads(self) -> list[tuple[int, int]]:
        return sink_heads(self.sink_scores(), self.sink_threshold)

    def position_zero(self) -> dict[str, dict[str, list[float]]]:
        return {c: position_zero_profile(s.position_zero) for c, s in self.statistics.conditions.items()}

    # -- tables --------------------------------------------------------------------
    def heads(self) -> pd.DataFrame:
        """One row per head: components for every target, R² of every model, sinks.

        ``L_*_debiased`` / ``_ci_low`` / ``_ci_high``: debiased shares of the headline
        target with CIs; ``{target}_L_*_crossfit``: cross-fitted shares of every target
        (every share column names its estimator)."""
        return self._heads_table.copy()

    @cached_property
    def _heads_table(self) -> pd.DataFrame:
        """:meth:`heads`, built once (the summary, the record and :meth:`head` all read it)."""
        layers, heads = np.meshgrid(np.arange(self.n_layers), np.arange(self.n_heads), indexing="ij")
        table = pd.DataFrame({
            "layer": layers.ravel(),
            "head": heads.ravel(),
            "label": [head_label(l, h) for l, h in zip(layers.ravel(), heads.ravel())],
        })
        for target in self.targets:
            dec = self.decomposition(target)
            for name, values in (("L_total", dec.total), ("L_resid", dec.resid), ("L_mask", dec.mask)):
                table[f"{target}_{name}_crossfit"] = values.ravel()
            for condition in CONDITIONS:
                fit = self.fits[condition, target]
                prefix = f"{target}_{condition}"
                table[f"{prefix}_r2_rel"] = fit.r2_rel.ravel()
                table[f"{prefix}_r2_abs"] = fit.r2_abs.ravel()
                if fit.r2_cell is not None:
                    table[f"{prefix}_r2_cell"] = fit.r2_cell.ravel()
        split = self.completed_split()
        if split is not None:
            completed = split.heads().drop(columns=["layer", "head"])
            for name in completed.columns:
                table[name] = completed[name].to_numpy()
        inf = self.inference()
        table["degenerate"] = inf.degenerate.ravel()
        for name, part in (("L_total", inf.total), ("L_resid", inf.resid), ("L_mask", inf.mask)):
            table[f"{name}_debiased"] = part.estimate.ravel()
            table[f"{name}_ci_low"] = part.low.ravel()
            table[f"{name}_ci_high"] = part.high.ravel()
        table["L_total_pvalue"] = inf.pvalue_total.ravel()
        table["L_total_qvalue"] = inf.qvalue_total.ravel()
        table["L_total_significant"] = inf.significant_total.ravel()
        table["L_resid_pvalue"] = inf.pvalue_resid.ravel()
        table["L_resid_qvalue"] = inf.qvalue_resid.ravel()
        table["L_resid_significant"] = inf.significant_resid.ravel()
        table["sink_score"] = self.sink_scores("causal").ravel()
        table["sink_score_ci_low"] = inf.sink.low.ravel()
        table["sink_score_ci_high"] = inf.sink.high.ravel()
        table["sink_score_bidirectional"] = self.sink_scores("bidirectional").ravel()
        table["sink_head"] = table["sink_score"] > self.sink_threshold
        causal = self.statistics.conditions["causal"]
        table["alpha0_gu"] = gu_alpha0(causal).ravel()  # Gu et al.'s alpha_0 (query 0 included)
        table["sink_head_gu"] = table["alpha0_gu"] > GU_EPSILON
        # Flagged when the debiased L_mask is negative beyond its CI; the cross-fitted
        # L_mask < 0 alone is often noise (see ``crossfit_L_mask_negative``).
        table["additivity_violated"] = (inf.mask.high < 0).ravel()
        table["crossfit_L_mask_negative"] = self.decomposition().additivity_violated().ravel()
        return table

    def layers(self, target: str | None = None) -> pd.DataFrame:
        """Per-layer means and composition of ``target`` (default: the headline target):
        ``*_crossfit`` cross-fitted, ``*_debiased`` with CIs, and the completed split of
        ``log A`` (``completed_*``, pooled over heads; the same rows for every target)."""
        table = self.decomposition(target).layer_table().rename(
            columns={name: f"{name}_crossfit" for name in ("L_total", "L_resid", "L_mask", "composition")})
        table.insert(1, "target", target or self.target)
        table["sink_heads"] = (self.sink_scores() > self.sink_threshold).sum(1)
        if target in self.targets or target is None:
            inf = self.inference(target)
            table["composition_debiased"] = inf.layer_composition.estimate
            table["composition_ci_low"] = inf.layer_composition.low
            table["composition_ci_high"] = inf.layer_composition.high
            table["composition_estimable"] = inf.layer_composition_estimable  # the crossfit one too
            table["composition_crossfit"] = table["composition_crossfit"].where(inf.layer_composition_estimable)
            keep = np.where(inf.degenerate, np.nan, 1.0)  # degenerate heads left out
            means = layer_component_means(inf.total.estimate, inf.resid.estimate, keep)
            for name, values in zip(COMPONENTS, means):
                table[column(name, "debiased")] = values
            table["degenerate_heads"] = inf.degenerate.sum(1)
        split = self.completed_split()
        if split is not None:
            for name, values in split.layer_table().items():
                table[f"completed_{name}"] = values
                if name in split.layer_ci:
                    table[f"completed_{name}_ci_low"] = split.layer_ci[name][:, 0]
                    table[f"completed_{name}_ci_high"] = split.layer_ci[name][:, 1]
            table["completed_heads_compensating"] = split.compensating().sum(1)
        return table

    def top_heads(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` heads with the largest debiased ``L_total``."""
        return top_heads_table(self.heads(), self.target, k)

    def target_means(self) -> pd.DataFrame:
        """One row per target: the debiased components' means over non-degenerate heads,
        with CIs (``L_total_debiased``, ``L_total_ci_low``, ...)."""
        rows = []
        for target in self.targets:
            means = self.inference(target).means
            row = {"target": target}
            for k, name in enumerate(("L_total", "L_resid", "L_mask")):
                row[column(name, "debiased")] = float(means.estimate[k])
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = float(means.low[k]), float(means.high[k])
            rows.append(row)
        return pd.DataFrame(rows)

    def record(self, *, statistics: bool = True) -> AnalysisRecord:
        """The plain tables and dicts that output renders (figures, report, saved files);
        ``statistics=False`` leaves the mergeable statistics out (nothing to save)."""
        causal = self.statistics.conditions["causal"].targets[self.target]
        fitted = gauged_coefficients(causal.design, per_prompt_xty(causal))
        profiles = HeadProfiles(causal.design.offsets, causal.design.queries, causal.design.keys,
                                *fitted, n_tokens=int(causal.design.n_tokens))
        cells = None
        if causal.has_cells:
            queries, keys = causal.design.cells
            cells = CellMeans(queries, keys, cell_means(causal), int(causal.design.n_tokens))
        return AnalysisRecord(
            target=self.target, targets=tuple(self.targets), n_layers=self.n_layers,
            n_heads=self.n_heads, n_prompts=self.n_prompts, ci_level=self.inference().level,
            sink_threshold=self.sink_threshold, summary=self.summary(), settings=self.settings(),
            metadata=self.statistics.metadata, heads=self.heads(),
            layers=pd.concat([self.layers(t) for t in self.targets], ignore_index=True),
            target_means=self.target_means(), diagnostics=self.diagnostics(),
            position_zero=self.position_zero(), profiles=profiles, cell_means=cells,
            model=dict(self.inputs.get("model") or {}),
            statistics=self.statistics if statistics else None)

    def head(self, layer, head: int | None = None, *, condition: str = "causal",
             target: str | None = None) -> HeadResult:
        """One head: ``analysis.head(3, 1)``, ``analysis.head("L3H1")`` or ``analysis.head((3, 1))``.

        Returns a :class:`rope_leak.analyses.head_result.HeadResult` with the head's row of
        :meth:`heads` (debiased shares with CIs, cross-fitted shares, R², sink score, flags)
        and its fitted ``M_abs`` profiles ``a[d]``, ``b[i]``, ``c[j]`` for ``target``
        (default: the headline target) under ``condition`` (``"causal"`` or ``"bidirectional"``).
        """
        spec = layer if head is None else (layer, head)
        l, h = normalize_head(spec, (self.n_layers, self.n_heads))
        target = target or self.target
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}.")
        if target not in self.targets:
            raise ValueError(f"target must be one of {self.targets}, got {target!r}.")
        row = self.heads().iloc[l * self.n_heads + h].copy()
        row.name = head_label(l, h)
        stats = self.statistics.conditions[condition].targets[target]
        return HeadResult(l, h, target, condition, row, abs_profiles(stats, l, h))

    def save(self, out_dir, *, overwrite: bool = False, **options) -> Path:
        """Write ``results.json``, ``heads.csv``, ``layers.csv``, ``statistics.npz`` and
        ``report.html`` into ``out_dir`` (see :func:`rope_leak.output.results.save_analysis` for
        ``options``, e.g. ``statistics=False`` to skip the large statistics file)."""
        return save_analysis(self.record(), out_dir, overwrite=overwrite, **options)

    def _display_items(self):
        model = self.inputs.get("model", {})
        first = next(iter(self.statistics.conditions["causal"].targets.values()))
        items = [("model", model.get("name", "?")),
                 ("heads", f"{self.n_layers} layers x {self.n_heads} heads"),
                 ("prompts", f"{self.n_prompts} x {first.design.n_tokens} tokens"),
                 ("target", self.target)]
        if self.target in self._inferences:  # only what is already computed: a repr stays cheap
            inf = self._inferences[self.target]
            comp = inf.composition
            items.append(("composition_debiased",
                          f"{float(comp.estimate):.3f} [{float(comp.low):.3f}, {float(comp.high):.3f}]"
                          if inf.composition_estimable else NOT_ESTIMABLE))
        items.append(("sink_heads", len(self.sink_heads())))
        return items

    def summary(self) -> dict:
        """Headline numbers. ``L_total_debiased``, ``L_resid_debiased``, ``L_mask_debiased``
        (means over heads) and ``composition_debiased``, each with ``..._ci``, are the
        *debiased* estimates with bootstrap CIs (robust at realistic prompt counts).
        The cross-fitted shares of the definition are under ``crossfit`` (means are
        sensitive to near-constant heads, so medians are given too)."""
        inf = self.inference().summary()
        out = {"target": self.target, "n_prompts": self.n_prompts, "estimator": inf["share_estimator"]}
        for key in ("composition", "L_total", "L_resid", "L_mask"):
            name = key if key == "composition" else f"{key}_mean"
            out[column(key, "debiased")] = inf[name]
            out[f"{column(key, 'debiased')}_ci"] = inf[f"{name}_ci"]
        out["composition_debiased_estimable"] = inf["composition_estimable"]
        out["composition_debiased_point"] = inf["composition_point"]  # the ratio, also where not estimable
        out["estimators"] = ("*_debiased: debiased shares (the headline); "
                             "crossfit: cross-fitted shares of the definition")
        out["composition_aggregation"] = inf["aggregation"]
        out["ci_level"] = inf["level"]
        out["heads_significant_total"] = inf["heads_significant_total"]
        out["heads_significant_resid"] = inf["heads_significant_resid"]
        out["fdr_level"] = inf["fdr_level"]
        dec = self.decomposition()
        out["heads_additivity_violated"] = int((self.inference().mask.high < 0).sum())
        out["additivity_violated"] = bool(out["L_mask_debiased_ci"][1] < 0)
        out["crossfit"] = {t: self.decomposition(t).summary() for t in self.targets}
        if not inf["composition_estimable"]:  # the same ratio over the same near-0 baseline
            out["crossfit"][self.target]["composition"] = float("nan")
        out["crossfit"][self.target]["L_total_median"] = float(np.median(dec.total))
        out["crossfit"][self.target]["L_resid_median"] = float(np.median(dec.resid))
        inference = self.inference()
        out["heads_degenerate"] = [head_label(l, h) for l, h in zip(*np.nonzero(inference.degenerate))]
        # Beside the pooled composition: the mean of per-head compositions L_mask / L_total
        # over the non-degenerate heads whose L_total CI excludes 0 (elsewhere the ratio is
        # not estimable); None when no head qualifies.
        usable = ~inference.degenerate & (inference.total.low > 0)
        ratios = inference.mask.estimate[usable] / inference.total.estimate[usable]
        out["mean_head_composition"] = float(ratios.mean()) if ratios.size else None
        out["mean_head_composition_heads"] = int(usable.sum())
        split = self.completed_split()
        if split is not None:
            out["completed_split"] = split.summary()
            log_inf = self.inference("log_pattern")
            out["completed_split"]["ablation_composition_log_pattern"] = float(log_inf.composition.estimate)
            out["completed_split"]["ablation_composition_log_pattern_ci"] = [
                float(log_inf.composition.low), float(log_inf.composition.high)]
        diagnostics = self.diagnostics()
        out["diagnostics"] = diagnostics.groupby("issue").size().to_dict() if len(diagnostics) else {}
        out["top_heads"] = self.top_heads(5)["label"].tolist()
        out["sink_heads"] = [head_label(l, h) for l, h in self.sink_heads()]
        metrics = sink_metrics(self.statistics.conditions["causal"], self.sink_threshold)
        for value in metrics.values():  # per-head values are in heads.csv
            value.pop("alpha0", None), value.pop("score", None)
        out["sink_metrics"] = metrics
        pz = self.position_zero()
        out["position_zero_max_std"] = {c: float(np.max(p["std"])) for c, p in pz.items()}
        out["bos_status"] = self.bos_summary()
        return out

    def bos_summary(self) -> dict:
        """BOS status of the run (see :mod:`rope_leak.analyses.bos_status`): from :func:`analyze`,
        or, for statistics merged from shards, the model's ``default_prepend_bos`` only."""
        if self.bos_status is not None:
            return self.bos_status
        prepends = (self.inputs.get("model") or {}).get("default_prepend_bos")
        return {"model_prepends_bos": prepends, "position_zero": "unknown", "measured": False,
                "implication": "position-0 tokens not recorded for this run"}


def tokens_sha256(tokens: Tensor) -> str:
    """sha256 of the prompts as little-endian int64 (shape included)."""
    array = np.ascontiguousarray(tokens.detach().cpu().numpy().astype("<i8"))
    digest = hashlib.sha256(repr(tuple(array.shape)).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def model_fingerprint(model: HookedTransformer) -> dict:
    """What identifies the model in ``results.json``: its provenance (name, kind, sha256)
    and the config fields that change the numbers."""
    from rope_leak.backends.loading import SHA256_OF, parameters_sha256

    cfg = model.cfg
    source = dict(getattr(model, "rope_leak_source", None) or {"name": cfg.model_name, "kind": "custom"})
    if source.get("sha256"):
        source["sha256_of"] = getattr(model, "rope_leak_sha256_of", None) or SHA256_OF.get(
            source.get("kind"), "unknown")
    else:  # a model built by hand: hash its parameters
        source["sha256"] = parameters_sha256(model)
        source["sha256_of"] = "parameters"
    return {
        **source,
        "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model,
        "n_ctx": cfg.n_ctx, "d_vocab": cfg.d_vocab, "dtype": str(cfg.dtype).removeprefix("torch."),
        "device": str(cfg.device), "rotary_base": cfg.rotary_base,
        "default_prepend_bos": bool(cfg.default_prepend_bos),
    }


def check_bos(model: HookedTransformer, tokens: Tensor, on_missing_bos: str = "error") -> None:
    """Check position 0 against what the model expects.

    * A model that prepends BOS (``cfg.default_prepend_bos`` True, with a BOS id from
      :func:`rope_leak.backends.bos_token_id`): every prompt must start with it
      (``on_missing_bos``: ``"error"`` raises :class:`MissingBOSError`, ``"warn"`` warns).
    * A model that prepends none: a token its tokenizer uses as BOS or EOS at position 0
      (``tokenizer.encode`` of some models adds one although the model does not) warns with
      :class:`StrayBOSWarning`: position 0 then holds a special token the corpus builder and
      ``to_tokens`` would not put there.
    * Any model: the BOS id (or, without BOS, a BOS/EOS id) after position 0 warns with
      :class:`StrayBOSWarning` (a document boundary inside a prompt gives a second sink).

    ``on_missing_bos="ignore"`` skips every check. Without BOS at position 0 the sinks, the
    position-0 trajectory and the BOS interventions measure a token-dependent position 0.
    """
    if on_missing_bos not in MISSING_BOS_ACTIONS:
        raise ValueError(f"on_missing_bos must be one of {MISSING_BOS_ACTIONS}, got {on_missing_bos!r}.")
    if on_missing_bos == "ignore" or not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.shape[1] == 0:
        return
    from rope_leak.analyses.bos_status import special_token_ids

    specials = special_token_ids(model)
    prepends = bool(getattr(model.cfg, "default_prepend_bos", False))
    bos = specials.get("bos")
    if prepends and bos is not None:
        _check_missing_bos(tokens, bos, on_missing_bos)
        inside = {bos}
    else:
        inside = set(specials.values())
        stray = sorted(inside)
        at_zero = torch.isin(tokens[:, 0], torch.tensor(stray, dtype=tokens.dtype)) if stray else None
        if at_zero is not None and at_zero.any():
            bad = at_zero.nonzero().flatten().tolist()
            names = ", ".join(f"{k}={v}" for k, v in sorted(specials.items()))
            warnings.warn(
                f"{len(bad)} of {len(tokens)} prompts start with a BOS/EOS token of the tokenizer "
                f"(e.g. prompt {bad[0]} starts with {int(tokens[bad[0], 0])}; special ids: {names}), but "
                "this model prepends no BOS (cfg.default_prepend_bos=False): tokenizer.encode may have "
                "added it. Position 0 then holds a special token that load_corpus and model.to_tokens "
                "would not put there. Fix: build prompts with rope_leak.corpus.load_corpus or "
                "model.to_tokens, or drop the first column; pass on_missing_bos='ignore' if intended.",
                StrayBOSWarning, stacklevel=3)
    if inside and tokens.shape[1] > 1:
        later = torch.isin(tokens[:, 1:], torch.tensor(sorted(inside), dtype=tokens.dtype))
        if later.any():
            prompt, pos = (int(v) for v in later.nonzero()[0])
            warnings.warn(
                f"{int(later.any(1).sum())} of {len(tokens)} prompts hold a BOS/EOS token after position 0 "
                f"(e.g. prompt {prompt}, position {pos + 1}: token {int(tokens[prompt, pos + 1])}). Such a "
                "token can act as a second attention sink and a second closed-form anchor. Fix: split "
                "prompts at document boundaries (load_corpus does), or pass on_missing_bos='ignore' if "
                "intended.", StrayBOSWarning, stacklevel=3)


def _check_missing_bos(tokens: Tensor, bos: int, on_missing_bos: str) -> None:
    bad = (tokens[:, 0] != bos).nonzero().flatten().tolist()
    if not bad:
        return
    message = (
        f"{len(bad)} of {len(tokens)} prompts do not start with the model's BOS token (id {bos}); "
        f"e.g. prompt {bad[0]} starts with token {int(tokens[bad[0], 0])}. This model expects "
        "BOS at position 0 (cfg.default_prepend_bos=True), and the sink scores, the position-0 "
        "trajectory and the BOS interventions assume it. Fix: build the prompts with "
        "rope_leak.corpus.load_corpus (it prepends BOS), or set tokens[:, 0] = "
        f"{bos}; to analyse prompts without BOS on purpose, pass on_missing_bos='warn' or 'ignore'."
    )
    if on_missing_bos == "error":
        raise MissingBOSError(message)
    warnings.warn(message, MissingBOSWarning, stacklevel=4)


def analyze(
    model: HookedTransformer,
    tokens,
    *,
    target: str = "pattern",
    spec: PairSpec = PairSpec(),
    batch_size: int = 8,
    n_buckets: int | None = None,
    sink_threshold: float = SINK_THRESHOLD,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
    prompt_ids=None,
    metadata: dict | None = None,
    on_missing_bos: str = "error",
    checkpoint=None,
    checkpoint_every: int = 0,
    checkpoint_seconds: float = 0.0,
    cell_maps: bool = False,
    window: int = DEFAULT_WINDOW,
    force: bool = False,
) -> Analysis:
    """Run the full decomposition of ``model`` on ``tokens``: a :class:`rope_leak.Corpus`
    (from :func:`rope_leak.load_corpus`) or a ``[prompt, pos]`` token tensor.

    One forward pass per batch and condition (causal, bidirectional) accumulates all
    targets at once; see :func:`rope_leak.engine.run.run_statistics` (also for
    ``prompt_ids`` and the resumable ``checkpoint``). ``cell_maps=True`` also keeps
    per-cell sums (``O(n^2)`` per head) for ``M_cell`` and per-cell maps of the explorer.
    ``window``: the completed split's reference window ``w`` (:mod:`rope_leak.fits.start_cut`).
    ``force``: run even when the memory estimate (:mod:`rope_leak.engine.memory`) exceeds
    what is available.

    ``on_missing_bos``: what to do when the model expects a BOS at position 0 and some
    prompts lack it (see :func:`check_bos`): ``"error"`` (default, :class:`MissingBOSError`),
    ``"warn"`` or ``"ignore"``.

    ``progress``: progress bars for the forward passes, and later for the bootstrap CIs
    (``Analysis.progress``).

    Raises:
        ValueError: a bad target, fewer than 4 prompts, prompts longer than the model's
            context, or (``MissingBOSError``) prompts without the BOS the model expects.
        NotRoPEModelError: the model has no rotary position embeddings.
        NonFiniteAttentionError: NaN or inf attention scores (names layer and head).
    """
    require_rope(model, "analyze")
    tokens = getattr(tokens, "tokens", tokens)  # a Corpus
    if not isinstance(tokens, Tensor):
        raise TypeError(f"analyze takes a Corpus or a [prompt, pos] token tensor, got "
                        f"{type(tokens).__name__}. Fix: pass rope_leak.load_corpus(...) or its .tokens.")
    if target not in REPORTED_TARGETS:
        raise ValueError(f"target must be one of {REPORTED_TARGETS}, got {target!r}.")
    if len(tokens) < 4:
        raise ValueError(
            f"{len(tokens)} prompts are too few to cross-fit over two halves of the prompts. "
            "Fix: use at least 4 prompts (64 recommended)."
        )
    check_bos(model, tokens, on_missing_bos)
    if prompt_ids is not None:
        prompt_ids = [int(i) for i in prompt_ids]  # an iterator is read twice below
        if len({i % 2 for i in prompt_ids}) < 2:
            raise ValueError(
                f"all {len(prompt_ids)} prompt ids have the same parity, so every prompt falls "
                "in one cross-fitting fold (a prompt's fold is its global index mod 2). Fix: "
                "pass prompt ids of both parities, e.g. the default 0..P-1."
            )
    stats = run_statistics(
        model, tokens, targets=TARGETS, spec=spec, batch_size=batch_size, n_buckets=n_buckets,
        progress=progress, prompt_ids=prompt_ids, metadata=metadata, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds, cell_maps=cell_maps,
        start_cut_window=window, force=force,
    )
    inputs = {
        "model": model_fingerprint(model),
        "tokens_sha256": tokens_sha256(tokens),
        "batch_size": batch_size,
        "on_missing_bos": on_missing_bos,
        "prompt_ids": prompt_ids,
    }
    from rope_leak.analyses.bos_status import bos_status

    return Analysis(stats, target=target, sink_threshold=sink_threshold, n_boot=n_boot, seed=seed,
                    inputs=inputs, progress=progress,
                    bos_status=bos_status(model, tokens, batch_size=max(batch_size, 64)))
