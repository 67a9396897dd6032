"""A self-contained HTML report (plotly.js inlined once, so it opens offline)."""

from __future__ import annotations

import html
from pathlib import Path

import plotly.io as pio

from rope_leak.analysis import Analysis
from rope_leak.cache import atomic_write_text
from rope_leak.plots import all_figures

CAPTIONS = {
    "shares": "Each cell is one head. L_total is its absolute-position share under the causal "
              "mask, L_resid under a bidirectional mask (same weights, same causal pairs scored), "
              "L_mask their difference: the part the causal softmax denominator creates. One colour "
              "scale for the three panels.",
    "composition": "Mean components per layer (bars) and the layer's composition, the fraction of its "
                   "absolute-position share that the causal mask creates (line, right axis).",
    "sinks": "Mean attention each head puts on key 0. Heads above the threshold are attention sinks.",
    "position_zero": "Left: how much the residual stream at position 0 varies across prompts, layer by "
                     "layer. With the same token at position 0 it is exactly 0 under the causal mask "
                     "(position 0 only sees itself) and not under the bidirectional ablation. Right: its "
                     "norm against the other positions (massive activations).",
}

TITLES = {
    "shares": "Absolute-position share per head",
    "composition": "Causal mask vs residual stream, by layer",
    "sinks": "Attention sinks",
    "position_zero": "The position-0 trajectory",
}

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}.note{color:#555;font-size:.95em}.flag{color:#b00}
"""


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def summary_html(analysis: Analysis) -> str:
    s = analysis.summary()
    rows = [
        ("target", s["target"]), ("prompts", s["n_prompts"]),
        ("mean L_total (causal)", s["L_total"]), ("mean L_resid (bidirectional)", s["L_resid"]),
        ("mean L_mask", s["L_mask"]), ("composition (mask share)", s["composition"]),
        ("sink heads", ", ".join(s["sink_heads"]) or "none"),
        ("heads with L_mask < 0 (additivity violated)", s["heads_additivity_violated"]),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    top = analysis.top_heads(10)
    top_html = top.to_html(index=False, float_format=lambda x: f"{x:.4f}", border=0)
    warn = ""
    if s["additivity_violated"]:
        warn = ("<p class='flag'>Additivity violated: the bidirectional ablation raised the mean "
                "share (L_mask &lt; 0). Read the decomposition with care.</p>")
    return (f"<h2>Summary</h2><table>{body}</table>{warn}"
            f"<p class='note'>Composition = {html.escape(s['composition_aggregation'])}.</p>"
            f"<h3>Top heads by L_total</h3>{top_html}")


def write_report(
    analysis: Analysis,
    path: str | Path,
    *,
    provenance: dict | None = None,
    run_info: dict | None = None,
) -> Path:
    figures = all_figures(analysis)
    sections = []
    for index, (key, fig) in enumerate(figures.items()):
        div = pio.to_html(fig, full_html=False, include_plotlyjs=(index == 0), div_id=f"fig-{key}")
        sections.append(f"<h2>{TITLES[key]}</h2><p class='note'>{CAPTIONS[key]}</p>{div}")
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
            f"<style>{STYLE}</style></head><body><h1>rope_leak: where does absolute position come from? "
            f"({model_name})</h1>{summary_html(analysis)}{''.join(sections)}{footer}</body></html>")
    return atomic_write_text(path, page)
