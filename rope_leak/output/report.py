"""A self-contained HTML report (plotly.js inlined once, so it opens offline)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.io as pio
from plotly.offline import get_plotlyjs

from rope_leak.download_cache import atomic_write_text
from rope_leak.output.bos_text import NOT_ESTIMABLE, bos_label, spread_text
from rope_leak.output.explorer import explorer_html
from rope_leak.output.plots import all_figures, top_heads_figure
from rope_leak.output.records import AnalysisRecord, SinkRecord, as_analysis_record, as_sink_record
from rope_leak.quantities import column

CAPTIONS = {
    "decompositions": "Two ways to split log A's absolute position, layer by layer, with 95% CIs. The "
                      "completed split (the headline) stays in distribution: the mask's part is the cut "
                      "at the start, m_i = log(1 + rho_i T_i), with the missing past T_i filled in from "
                      "the head's own count-free offset profile; the scores' part is log A - m. Both are "
                      "unchanged by a per-query shift of the scores; queries w <= i <= n - 2 are scored. The "
                      "bidirectional ablation (the paper's method) swaps the causal mask for a "
                      "bidirectional one: out of distribution, and a query near the end sees fewer "
                      "future keys, so the swap itself adds absolute position (its mask share falls, "
                      "even below 0, at long prompts).",
    "shares": "Each cell is one head (debiased shares, as fractions of the head's scored variance). "
              "L_total: absolute-position share under the causal mask. The completed split's two "
              "parts (of log A): the scores' part and the start cut. Ablation L_mask: "
              "L_total minus the share under a bidirectional mask. The shares and the completed "
              "split's parts (fractions of the head's SS(D log A), which can exceed 1) each have "
              "one colour scale, set by 98% of the heads; × marks heads beyond it, ○ degenerate heads (scored "
              "variance below the floor; blank, left out of every mean and pool), − heads the completed "
              "split leaves out (SS(log A) not above its noise: not estimable).",
    "composition": "Left: mean debiased components per layer over non-degenerate heads. Right: the "
                   "mask's share of log A's absolute position per layer, pooled over heads (sums of "
                   "squares), by the completed split and by the ablation, with 95% CIs.",
    "targets": "The same decomposition for each response: the pattern A, log A and the pre-softmax "
               "scores s. The causal-mask part lives in the softmax denominator, so it should be near "
               "zero for the scores, whose absolute position can only come from the residual stream.",
    "intervals": "The 20 heads with the largest L_total and their confidence intervals (error bars), "
                 "(bootstrap over prompt buckets, debiased share). An interval that reaches 0 "
                 "means the head's absolute-position share is not distinguishable from none.",
    "sinks": "Mean attention each head puts on key 0 (queries i ≥ 1), under the causal mask and under "
             "the bidirectional ablation, on one 0–1 scale. Heads above the threshold are attention sinks.",
    "position_zero": "Left: how much the residual stream at position 0 varies across prompts, layer by "
                     "layer. With the same token at position 0 it is exactly 0 under the causal mask "
                     "(position 0 only sees itself) and not under the bidirectional ablation. Right: its "
                     "norm against the other positions (massive activations).",
}

TITLES = {
    "decompositions": "Completed split vs the ablation",
    "shares": "Absolute-position share per head",
    "composition": "Causal mask vs residual stream, by layer",
    "targets": "Pattern, log pattern and scores",
    "intervals": "Uncertainty of the top heads",
    "sinks": "Attention sinks",
    "position_zero": "The position-0 trajectory",
}

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}.note{color:#555;font-size:.95em}.flag{color:#b00}
.caption{color:#333;font-size:.95em;max-width:60em}.headline{font-size:1.1em;max-width:60em}
"""


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _top_heads_table(record: AnalysisRecord, k: int = 10) -> pd.DataFrame:
    """Top heads by the debiased L_total, with its CI, BH q-value and the components."""
    return record.top_heads(k).rename(columns={
        "L_total_debiased": "L_total", "L_total_ci_low": "ci_low", "L_total_ci_high": "ci_high",
        "L_resid_debiased": "L_resid", "L_mask_debiased": "L_mask", "L_total_qvalue": "q (BH)",
        f"{record.target}_L_total_crossfit": "L_total (cross-fitted)",
    })


def _with_ci_column(table: pd.DataFrame, level: float) -> pd.DataFrame:
    table = table.copy()
    ci = [f"[{lo:.4f}, {hi:.4f}]" for lo, hi in zip(table.pop("ci_low"), table.pop("ci_high"))]
    table.insert(table.columns.get_loc("L_total") + 1, f"{level:.0%} CI", ci)
    return table


def _diagnostics_html(record: AnalysisRecord, limit: int = 40) -> str:
    table = record.diagnostics
    if table.empty:
        return "<p>No head or layer is flagged.</p>"
    counts = ", ".join(f"{n} × {html.escape(issue)}" for issue, n in table["issue"].value_counts().items())
    order = table["scope"].map({"model": 0, "layer": 1, "head": 2})
    table = table.assign(_order=order).sort_values("_order", kind="stable").drop(columns="_order")
    shown = table.head(limit).to_html(index=False, border=0)
    more = f"<p class='note'>{len(table) - limit} more rows in results.json.</p>" if len(table) > limit else ""
    return f"<p>{counts}. Nothing is clipped; these rows say where to read with care.</p>{shown}{more}"


def _sink_heads_html(record: AnalysisRecord) -> str:
    heads = record.heads
    sinks = heads[heads["sink_head"]].sort_values("sink_score", ascending=False)
    if sinks.empty:
        return f"<p>No head has a sink score above {record.sink_threshold}.</p>"
    items = ", ".join(f"{html.escape(l)} ({v:.2f})" for l, v in zip(sinks["label"], sinks["sink_score"]))
    return (f"<p><b>{len(sinks)} sink heads</b> (sink score &gt; {record.sink_threshold}, "
            f"mean attention to key 0): {items}</p>")


def _ci(values) -> str:
    return f"[{values[0]:.4f}, {values[1]:.4f}]"


def _bos_header(status: dict) -> str:
    """BOS status first: whether position 0 holds a BOS, what follows, the measured spread."""

    return (f"<p class='headline' id='bos-status'><b>BOS: {html.escape(bos_label(status))}.</b> "
            f"{html.escape(str(status.get('implication', '')))}</p>"
            f"<p class='note'>{html.escape(spread_text(status))} (– / not estimable: no token held by "
            "two prompts, or a single token).</p>")


def summary_html(analysis) -> str:
    """The report's summary section for an :class:`AnalysisRecord` (or an analysis)."""
    record = as_analysis_record(analysis)
    s = record.summary
    total, resid, mask, composition = (column(name, "debiased") for name in
                                       ("L_total", "L_resid", "L_mask", "composition"))
    comp = s[composition]
    estimable = bool(s.get(f"{composition}_estimable", np.isfinite(comp)))
    comp_text = f"{comp:.0%} {_ci(s[composition + '_ci'])}" if estimable else \
        "a share that is not estimable (the pooled L_total's interval reaches 0)"
    level = f"{s['ci_level']:.0%}"
    headline = (
        f"<p class='headline'>Under the model's causal mask, the absolute-position share of "
        f"<b>{html.escape(s['target'])}</b> averages <b>{s[total]:.4f}</b> {_ci(s[total + '_ci'])} "
        f"(ΔR², debiased, {level} CI) per head; by the bidirectional ablation the causal mask "
        f"accounts for <b>{comp_text}</b> of it and the residual stream for the rest "
        f"(mean L_mask {s[mask]:.4f}, L_resid {s[resid]:.4f}; {s['n_prompts']} prompts).</p>")
    split = s.get("completed_split")
    if split:
        headline = (
            f"<p class='headline'>Completed split (w = {split['window']}, queries w ≤ i ≤ n − 2, log A): the "
            f"causal mask's start cut accounts for <b>{split['mask_share']:.0%}</b> "
            f"{_ci(split.get('mask_share_ci', [np.nan, np.nan]))} of the absolute position in the "
            f"attention, the scores (what the residual stream carries) for the rest; cross term "
            f"{split['cross']:.2f} {_ci(split.get('cross_ci', [np.nan, np.nan]))} × SS(log A), pooled "
            f"over {split['heads_kept']} heads.</p>") + headline
    rows = [
        ("target", s["target"]), ("prompts", s["n_prompts"]),
        (f"mean L_total (causal) [{level} CI]", f"{s[total]:.4f} {_ci(s[total + '_ci'])}"),
        (f"mean L_resid (bidirectional) [{level} CI]", f"{s[resid]:.4f} {_ci(s[resid + '_ci'])}"),
        (f"mean L_mask [{level} CI]", f"{s[mask]:.4f} {_ci(s[mask + '_ci'])}"),
        (f"ablation composition (the paper's method; mask share of {s['target']}) [{level} CI]",
         f"{comp:.3f} {_ci(s[composition + '_ci'])}" if estimable else NOT_ESTIMABLE),
        *([(f"completed split (w = {split['window']}): mask share <D m, D log A> / SS(D log A) "
             f"[{level} CI]", f"{split['mask_share']:.3f} {_ci(split.get('mask_share_ci', [np.nan, np.nan]))}"),
           (f"completed split: cross term / SS(log A) [{level} CI]",
            f"{split['cross']:.3f} {_ci(split.get('cross_ci', [np.nan, np.nan]))}"),
           ("completed split: compensating heads (parts large and cancelling)",
            ", ".join(split["heads_compensating"]) or "none"),
           ("completed split: heads not estimable (SS(log A) not above noise)",
            len(split["heads_not_estimable"]))]
          if split else []),
        ("degenerate heads (left out of means and pools)", len(s["heads_degenerate"])),
        (f"heads with L_total > 0 (BH q < {s['fdr_level']})", s["heads_significant_total"]),
        (f"heads with L_resid > 0 (BH q < {s['fdr_level']})", s["heads_significant_resid"]),
        ("sink heads: rope_leak score (mean over i ≥ 1 of A[i,0]) > "
         f"{record.sink_threshold}", f"{len(s['sink_heads'])} of {record.n_layers * record.n_heads}"),
        ("sink heads: Gu et al. (ICLR 2025) α₀ > "
         f"{s['sink_metrics']['gu_et_al_2025']['epsilon']} (query 0 included)",
         f"{len(s['sink_metrics']['gu_et_al_2025']['sink_heads'])} of {record.n_layers * record.n_heads} "
         f"(sink ratio {s['sink_metrics']['gu_et_al_2025']['sink_ratio']:.3f})"),
        ("heads with L_mask < 0 beyond their CI (additivity violated)", s["heads_additivity_violated"]),
        ("max cross-prompt std at position 0 (causal)", s["position_zero_max_std"].get("causal")),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    crossfit = pd.DataFrame([{"target": t, **{k: v for k, v in d.items() if isinstance(v, float)}}
                             for t, d in s["crossfit"].items()])
    crossfit_html = crossfit.to_html(index=False, float_format=lambda x: f"{x:.4f}", border=0)
    top_html = _with_ci_column(_top_heads_table(record), s["ci_level"]).to_html(index=False, float_format=lambda x: f"{x:.4f}",
                                                  border=0, na_rep="n/a")
    warn = ""
    if s["additivity_violated"]:
        warn = ("<p class='flag'>Additivity violated: the bidirectional ablation raised the mean "
                "share (L_mask &lt; 0 beyond its CI). Read the ablation-based decomposition with care "
                "and read the completed split.</p>")
    return (f"<section id='summary'><h2>Summary</h2>{_bos_header(s['bos_status'])}{headline}<table>{body}</table>{warn}"
            f"<p class='note'>Composition = {html.escape(s['composition_aggregation'])}. ΔR² = "
            f"R²(M_abs) − R²(M_rel): 0 means offset alone explains the head's "
            f"{html.escape(s['target'])} as well as absolute position does. Debiased shares are "
            f"unbiased for the population share; the cross-fitted shares of the definition are biased "
            f"low at small prompt counts (table below). CIs: bootstrap over prompt buckets; "
            f"q: sign-flip null, Benjamini–Hochberg across heads.</p>"
            f"<h3>Top heads by L_total</h3>{top_html}"
            f"<h3>Diagnostics</h3>{_diagnostics_html(record)}"
            f"<h3>Sink heads</h3>{_sink_heads_html(record)}"
            f"<h3>Cross-fitted shares by target (the definition; means over heads)</h3>{crossfit_html}</section>")


def write_report(
    analysis,
    path: str | Path,
    *,
    provenance: dict | None = None,
    run_info: dict | None = None,
    extra_sections: Sequence[str] = (),
    sinks: SinkRecord | None = None,
) -> Path:
    """Write a self-contained HTML report (opens offline: plotly.js is inlined once, in
    the page's head).

    ``extra_sections``: more HTML sections (e.g. :func:`rope_leak.output.plots_sinks.sections_html`
    with ``include_plotlyjs=False``), placed after the analysis' own figures. ``analysis``:
    an :class:`AnalysisRecord` or an analysis; ``sinks``: the sink analysis of the same run
    (or its :class:`SinkRecord`), for the head explorer's sink-reading flag."""
    record, sinks = as_analysis_record(analysis), as_sink_record(sinks)
    figures = all_figures(record)
    figures["intervals"] = top_heads_figure(
        _top_heads_table(record, k=20), "L_total", ci=("ci_low", "ci_high"),
        title=f"Top heads by L_total (debiased) with {record.ci_level:.0%} CIs "
              f"(target {record.target})")
    sections = []
    for key, fig in figures.items():
        div = pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"fig-{key}")
        sections.append(f"<section id='section-{key}'><h2>{TITLES[key]}</h2>"
                        f"<p class='caption'>{CAPTIONS[key]}</p>{div}</section>")
    model_name = html.escape(str((provenance or {}).get("model", {}).get("name", "model")))
    footer = ""
    if provenance:
        items = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>"
                        for k, v in sorted(provenance.get("versions", {}).items()))
        footer += f"<h2>Provenance</h2><ul>{items}</ul>"
        corpus = provenance.get("corpus", {})
        if corpus.get("attribution"):
            footer += f"<p class='note'>Text: {html.escape(corpus['attribution'])}</p>"
    if run_info and "seconds" in run_info:
        footer += f"<p class='note'>Run time: {run_info['seconds']:.0f} s.</p>"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>rope_leak report: {model_name}</title>"
            f"<style>{STYLE}</style><script>window.PlotlyConfig = {{MathJaxConfig: 'local'}};</script>"
            f"<script>{get_plotlyjs()}</script></head>"
            f"<body><h1>rope_leak: where does absolute position come from? ({model_name})</h1>"
            f"{summary_html(record)}{explorer_html(record, sinks)}{''.join(sections)}"
            f"{''.join(extra_sections)}{footer}</body></html>")
    return atomic_write_text(path, page)
