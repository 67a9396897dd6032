"""Plotly figures of the sinks analysis, and HTML sections the ``analyze`` report can
append (``sink_sections``/``sinks_html``). Kept apart from ``plots.py``/``report.py``.

Every function takes plain tables (a :class:`~rope_leak.output.records.SinkRecord`'s,
a BOS table) so it can be called from notebooks as well; the sections take the record
or the sink analysis itself.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from rope_leak.output.bos_text import NOT_ESTIMABLE, bos_label, spread_text
from rope_leak.output.records import as_sink_record, head_grid
from rope_leak.quantities import column

DIVERGING = "RdBu_r"


def _labels(n_layers: int, n_heads: int) -> np.ndarray:
    return np.array([[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)])


def trajectory_by_token(within: pd.DataFrame, between: pd.DataFrame) -> go.Figure:
    """Left: distance between the position-0 trajectories of different position-0 tokens
    (relative to the stream's norm; ``between``, causal mask). Right: cross-prompt std
    among prompts sharing the token (``within``, one curve per ``condition``) — exactly 0
    under the causal mask, not under the bidirectional ablation."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "different position-0 tokens: min distance / norm", "same position-0 token: cross-prompt std"])
    fig.add_scatter(x=between["depth"], y=between["relative_min_distance"], mode="lines+markers",
                    name="between tokens (causal)", row=1, col=1,
                    hovertemplate="depth %{x}<br>relative distance = %{y:.3g}<extra></extra>")
    for condition, rows in within.groupby("condition", sort=False):
        spread = rows.groupby("depth")["std"].max()
        fig.add_scatter(x=spread.index, y=spread.values, mode="lines+markers",
                        name=f"within token ({condition})", row=1, col=2,
                        hovertemplate="depth %{x}<br>std = %{y:.3g}<extra></extra>")
    fig.update_xaxes(title_text="depth (resid_pre of layer; last = final resid_post)")
    causal = within[within["condition"] == "causal"] if (within["condition"] == "causal").any() else within
    tokens = ", ".join(str(t) for t in sorted(causal["token"].unique()))
    fig.update_layout(title=f"Position-0 trajectory by token (tokens {tokens})",
                      legend=dict(orientation="h", y=-0.25))
    return fig


def sink_reading_heatmaps(heads: pd.DataFrame, threshold: float, source_token_id: int | None = None,
                          n_prompts: int | None = None) -> go.Figure:
    """Relative change of each head's output when only position 0 is patched, the
    fraction of its output through key 0, and (when ``heads`` has it) its sink score.
    ``heads``: one row per head (``layer``, ``head``, ``relative_change``,
    ``key0_fraction``, ``sink_reading``; a :class:`~rope_leak.output.records.SinkRecord`'s ``heads``)."""
    panels = [(f"relative change (sink-reading > {threshold})", head_grid(heads, "relative_change")),
              ("fraction of output through key 0", head_grid(heads, "key0_fraction"))]
    if "sink_score" in heads:
        panels.append(("rope_leak sink score (mean over i ≥ 1 of A[i,0])", head_grid(heads, "sink_score")))
    n_layers, n_heads = panels[0][1].shape
    labels = _labels(n_layers, n_heads)
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels],
                        shared_yaxes=True, horizontal_spacing=0.05)
    for col, (name, values) in enumerate(panels, start=1):
        fig.add_trace(go.Heatmap(
            z=values, customdata=labels, colorscale="Viridis", zmin=0,
            zmax=max(1.0, float(np.nanmax(values))) if col == 1 else 1.0, showscale=col == len(panels),
            hovertemplate="%{customdata}<br>" + name + " = %{z:.3f}<extra></extra>",
        ), row=1, col=col)
        fig.update_xaxes(title_text="head", row=1, col=col)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
    source = "" if source_token_id is None else f"; source token {source_token_id}"
    prompts = "" if n_prompts is None else f", {n_prompts} prompts"
    fig.update_layout(title=f"Sink-reading heads ({int(heads['sink_reading'].sum())} of {n_layers * n_heads}"
                            f"{source}{prompts})",
                      height=max(350, 18 * n_layers + 150))
    return fig


def _share_column(table: pd.DataFrame, name: str) -> str:
    """The column of share ``name`` under the table's estimator."""
    return column(name, table["estimator"].iloc[0] if "estimator" in table else None)


def _ratio_columns(table: pd.DataFrame) -> list[tuple[str, str, str]]:
    """``(ratio column, its baseline quantity, panel title)`` present in ``table``."""
    found = [("scores_part_relative", "scores_part_ss", "completed split, i >= 8:<br>scores' part SS / baseline"),
             ("scores_ss_relative", "scores_ss", "scores' absolute-position<br>SS / baseline"),
             ("L_total_relative", _share_column(table, "L_total"), "L_total (pattern) / baseline"),
             ("L_resid_relative", _share_column(table, "L_resid"), "L_resid (bidirectional) / baseline")]
    return [f for f in found if f[0] in table]


def _metrics(table: pd.DataFrame) -> list[str]:
    """The table's quantities, in the order they are shown."""
    return [m for m in ("scores_part_ss", "scores_part_relative", "mask_part_ss", "mask_part_relative",
                        "scores_ss", "scores_ss_relative", _share_column(table, "L_total"), "L_total_relative",
                        _share_column(table, "L_resid"), "L_resid_relative") if m in table]


def bos_interventions_figure(table: pd.DataFrame) -> go.Figure:
    """Each replacement's effect with bootstrap CIs: the scores' absolute-position sum of
    squares and ``L_total`` at early queries, relative to the baseline. Where a ratio is
    not estimable (its baseline CI includes 0) the panel shows the quantity itself for
    every row, baseline included, on a linear scale, and its title says why."""
    rows = table[table["replacement"] != "baseline"]
    panels = _ratio_columns(table)
    estimable = [bool(table[f"{m}_estimable"].iloc[0]) if f"{m}_estimable" in table else True
                 for m, _, _ in panels]
    titles = [title if ok else f"{title.split(' / ')[0]}<br>(ratio {NOT_ESTIMABLE}: baseline CI includes 0)"
              for (_, quantity, title), ok in zip(panels, estimable)]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=titles)
    for col, ((metric, quantity, _), ok) in enumerate(zip(panels, estimable), start=1):
        shown, column = (rows, metric) if ok else (table, quantity)
        error = None
        if f"{column}_low" in shown and shown[f"{column}_low"].notna().any():
            error = dict(type="data", symmetric=False, array=shown[f"{column}_high"] - shown[column],
                         arrayminus=shown[column] - shown[f"{column}_low"])
        unit = " x baseline" if ok else ""
        fig.add_bar(x=shown["replacement"], y=shown[column], error_y=error, name=column, row=1, col=col,
                    hovertemplate="%{x}<br>%{y:.3f}" + unit + "<extra></extra>", showlegend=False)
        if ok:
            fig.add_hline(y=1.0, line_dash="dot", row=1, col=col)
            fig.update_yaxes(type="log", title_text="relative to baseline (log; 1 = unchanged)",
                             row=1, col=col)
        else:
            fig.add_hline(y=0.0, line_dash="dot", row=1, col=col)
            fig.update_yaxes(title_text=titles[col - 1].split("<br>(ratio")[0].replace("<br>", " "),
                             row=1, col=col)
    fig.update_layout(title=f"Position-0 interventions at early queries (i < "
                            f"{table['early_queries'].iloc[0] if 'early_queries' in table else '?'}), "
                            "95% bootstrap CIs over prompts", margin=dict(t=120))
    for annotation in fig.layout.annotations:
        annotation.font.size = 12
    return fig


def _cell(row: dict, metric: str) -> str:
    value = row.get(metric)
    if value is None or not np.isfinite(value):
        return "–"
    low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    ci = f" [{low:.3g}, {high:.3g}]" if low is not None and np.isfinite(low) else ""
    return f"{value:.4g}{ci}"


def bos_table_figure(table: pd.DataFrame) -> go.Figure:
    """The BOS-intervention table as a plotly table (point estimate [CI]; a dash where a
    quantity is not estimable)."""
    metrics = _metrics(table)
    records = table.to_dict(orient="records")
    columns = [[r["replacement"] for r in records]] + [[_cell(r, m) for r in records] for m in metrics]
    fig = go.Figure(go.Table(header=dict(values=["replacement", *metrics]), cells=dict(values=columns)))
    fig.update_layout(title="Position-0 interventions (mean over heads; point [95% CI]; – = not estimable)")
    return fig


def bos_table_html(table: pd.DataFrame) -> str:
    """The same table as HTML (a dash where not estimable)."""
    metrics = _metrics(table)
    head = "".join(f"<th>{html.escape(m)}</th>" for m in ["replacement", *metrics])
    body = "".join("<tr><th>" + html.escape(str(r["replacement"])) + "</th>"
                   + "".join(f"<td>{html.escape(_cell(r, m))}</td>" for m in metrics) + "</tr>"
                   for r in table.to_dict(orient="records"))
    notes = [f"{title}: {NOT_ESTIMABLE}, the baseline's CI includes 0"
             for metric, _, title in _ratio_columns(table)
             if f"{metric}_estimable" in table and not bool(table[f"{metric}_estimable"].iloc[0])]
    note = "".join(f"<p class='note'>{html.escape(n)}.</p>" for n in notes)
    return f"<table><tr>{head}</tr>{body}</table>{note}"


def patching_heatmap(result, source: str | int = 0) -> go.Figure:
    """``[layer, head]`` effect of one patch site on every head's share."""
    table = result.table(source)
    values = table.to_numpy()
    zmax = float(np.abs(values).max()) or 1.0
    name = result.sources[source] if isinstance(source, int) else source
    fig = go.Figure(go.Heatmap(z=values, customdata=_labels(*values.shape), zmin=-zmax, zmax=zmax,
                               colorscale=DIVERGING, colorbar=dict(title="Δ share"),
                               hovertemplate="%{customdata}<br>Δ share = %{z:.4f}<extra></extra>"))
    fig.update_layout(title=f"Effect of patching {name} ({result.kind}) on each head's share",
                      xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed")
    return fig


SECTION_CAPTIONS = {
    "trajectory": "Residual stream at position 0 through the layers, for a few position-0 tokens put on "
                  "two prompts each. Left: different tokens give different trajectories. Right: prompts "
                  "sharing the token are identical under the causal mask (the closed system: this checks it, "
                  "the 0 is not a property of the corpus); the bidirectional ablation lets position 0 see "
                  "the prompt. Groups of one prompt are not estimable and not drawn.",
    "sink_reading": "A head is sink-reading when patching only position 0 of its layer input (from a "
                    "run with another position-0 token) changes its output at queries i ≥ 1 by more "
                    "than the threshold (relative norm). Key-0 fraction = share of the output's mass "
                    "A[i,0]|v_0 W_O| / Σ_j A[i,j]|v_j W_O|.",
    "bos": "The position-0 embedding replaced before the forward pass (another token, the mean embedding, "
           "zeros, norm-matched noise); causal mask, prompts cut to the early queries. Effect on the scores' "
           "absolute-position sum of squares (what the residual stream gives the logits, debiased) and on "
           "the pattern's L_total, relative to the baseline. A ratio whose baseline CI includes 0 is "
           "not estimable.",
}


def bos_status_html(status: dict | None) -> str:
    """The BOS status and the measured position-0 spread by token, as HTML."""

    if not status:
        return ""
    return (f"<p><b>BOS: {html.escape(bos_label(status))}</b>. {html.escape(status['implication'])}</p>"
            f"<p class='note'>{html.escape(spread_text(status))}.</p>")


def sink_metrics_html(metrics: dict) -> str:
    """Both sink metrics by name, with the threshold's source."""
    if not metrics:
        return ""
    gu, own = metrics["gu_et_al_2025"], metrics["rope_leak_sink_score"]
    return (f"<ul><li><b>Gu et al. (ICLR 2025) α₀</b> = (1/T) Σ<sub>i≥0</sub> A[i,0] (query 0 included): "
            f"{len(gu['sink_heads'])} of {gu['n_heads']} heads above ε = {gu['epsilon']} "
            f"(sink ratio {gu['sink_ratio']:.3f}; ε from {html.escape(gu['epsilon_source'])}).</li>"
            f"<li><b>rope_leak sink score</b> = mean over queries i ≥ 1 of A[i,0] (a different metric): "
            f"{len(own['sink_heads'])} of {own['n_heads']} heads above {own['threshold']} "
            f"({html.escape(own['threshold_source'])}).</li></ul>")


def sink_sections(sinks) -> list[tuple[str, str, go.Figure]]:
    """``(title, caption, figure)`` for the report, from a :class:`~rope_leak.output.records.SinkRecord` (or a sink
    analysis)."""
    record = as_sink_record(sinks)
    sections = [
        ("Position-0 trajectory by token", SECTION_CAPTIONS["trajectory"],
         trajectory_by_token(record.trajectory_within, record.trajectory_between)),
        ("Sink-reading heads", SECTION_CAPTIONS["sink_reading"],
         sink_reading_heatmaps(record.heads, record.reading_threshold, record.source_token_id,
                               record.reading_prompts)),
    ]
    if record.bos_table is not None:
        sections.append(("Position-0 (BOS) interventions", SECTION_CAPTIONS["bos"],
                         bos_interventions_figure(record.bos_table)))
    return sections


def sections_html(sinks, include_plotlyjs: bool | str = False) -> str:
    """HTML of the sink analysis (a :class:`~rope_leak.output.records.SinkRecord` or a sink analysis) for a report
    page: BOS status, both sink metrics, the figures of :func:`sink_sections`, the BOS table
    and the probe (or why it was not run)."""
    record = as_sink_record(sinks)
    parts = ["<h2>Sinks and position 0</h2>", bos_status_html(record.bos_status),
             sink_metrics_html(record.sink_metrics)]
    for index, (title, caption, fig) in enumerate(sink_sections(record)):
        div = pio.to_html(fig, full_html=False, include_plotlyjs=include_plotlyjs if index == 0 else False)
        parts.append(f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(caption)}</p>{div}")
    if record.bos_table is not None:
        parts.append("<h3>Position-0 intervention table</h3>" + bos_table_html(record.bos_table))
    status = record.probe_status or {}
    if record.probe is not None:
        parts.append("<h2>Fingerprint probe</h2><p class='note'>Cross-validated ridge probe from each "
                     f"feature set to the prompts' {html.escape(str(status.get('target')))} (out-of-fold "
                     "R², permutation p-value).</p>"
                     + record.probe.to_html(index=False, float_format=lambda x: f"{x:.4f}", border=0))
    else:
        parts.append("<h2>Fingerprint probe</h2><p class='flag'>"
                     + html.escape(status.get("reason", "not run")) + "</p>")
    return "".join(parts)


def sinks_html(sinks) -> str:
    """A standalone page with every sink section (plotly.js inlined: opens offline)."""
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>rope_leak sinks</title></head>"
            f"<body><h1>rope_leak: attention sinks and position 0</h1>{sections_html(sinks, True)}"
            "</body></html>")
