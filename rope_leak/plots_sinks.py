"""Plotly figures of the sinks analysis, and HTML sections the ``analyze`` report can
append (``sink_sections``/``sinks_html``). Kept apart from ``plots.py``/``report.py``.

Every function takes plain results (``Trajectories``, ``SinkReading``, a BOS table, a
``PatchingResult``) so it can be called from notebooks as well.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from rope_leak.metrics.sink_reading import SinkReading
from rope_leak.metrics.trajectory import Trajectories

DIVERGING = "RdBu_r"


def _labels(n_layers: int, n_heads: int) -> np.ndarray:
    return np.array([[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)])


def trajectory_by_token(causal: Trajectories, bidirectional: Trajectories | None = None) -> go.Figure:
    """Left: distance between the position-0 trajectories of different position-0 tokens
    (relative to the stream's norm). Right: cross-prompt std among prompts sharing the
    token — exactly 0 under the causal mask, not under the bidirectional ablation."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "different position-0 tokens: min distance / norm", "same position-0 token: cross-prompt std"])
    between = causal.between_token_distance()
    fig.add_scatter(x=between["depth"], y=between["relative_min_distance"], mode="lines+markers",
                    name="between tokens (causal)", row=1, col=1,
                    hovertemplate="depth %{x}<br>relative distance = %{y:.3g}<extra></extra>")
    for traj in [t for t in (causal, bidirectional) if t is not None]:
        spread = traj.within_token_spread().groupby("depth")["std"].max()
        fig.add_scatter(x=spread.index, y=spread.values, mode="lines+markers",
                        name=f"within token ({traj.condition})", row=1, col=2,
                        hovertemplate="depth %{x}<br>std = %{y:.3g}<extra></extra>")
    fig.update_xaxes(title_text="depth (resid_pre of layer; last = final resid_post)")
    tokens = ", ".join(str(t) for t in sorted(causal.groups()))
    fig.update_layout(title=f"Position-0 trajectory by token (tokens {tokens})",
                      legend=dict(orientation="h", y=-0.25))
    return fig


def sink_reading_heatmaps(reading: SinkReading, sink_scores: np.ndarray | None = None) -> go.Figure:
    """Relative change of each head's output when only position 0 is patched, the
    fraction of its output through key 0, and (if given) its sink score."""
    panels = [(f"relative change (sink-reading > {reading.threshold})", reading.relative_change),
              ("fraction of output through key 0", reading.key0_fraction)]
    if sink_scores is not None:
        panels.append(("sink score mean A[i,0]", np.asarray(sink_scores)))
    n_layers, n_heads = reading.relative_change.shape
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
    fig.update_layout(title=f"Sink-reading heads ({len(reading.heads())} of {n_layers * n_heads}; "
                            f"source token {reading.source_token_id}, {reading.n_prompts} prompts)",
                      height=max(350, 18 * n_layers + 150))
    return fig


def bos_interventions_figure(table: pd.DataFrame) -> go.Figure:
    """Fraction of ``L_resid`` removed and ``L_total`` relative to baseline, per
    replacement, with bootstrap CIs."""
    rows = table[table["replacement"] != "baseline"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "fraction of L_resid removed (early queries)", "L_total relative to baseline"])
    for col, metric in enumerate(("resid_removed_fraction", "leakage_relative"), start=1):
        error = None
        if f"{metric}_low" in rows:
            error = dict(type="data", symmetric=False, array=rows[f"{metric}_high"] - rows[metric],
                         arrayminus=rows[metric] - rows[f"{metric}_low"])
        fig.add_bar(x=rows["replacement"], y=rows[metric], error_y=error, name=metric, row=1, col=col,
                    hovertemplate="%{x}<br>%{y:.3f}<extra></extra>", showlegend=False)
    fig.add_hline(y=1.0, line_dash="dot", row=1, col=2)
    fig.update_layout(title="BOS interventions on the decomposition (95% bootstrap CIs over prompts)")
    return fig


def bos_table_figure(table: pd.DataFrame) -> go.Figure:
    """The BOS-intervention table as a plotly table (point estimate [CI])."""
    def cell(row, metric):
        low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
        ci = f" [{low:.3f}, {high:.3f}]" if low is not None and pd.notna(low) else ""
        return f"{row[metric]:.4f}{ci}"

    metrics = ["L_total", "L_resid", "L_mask", "resid_removed_fraction", "leakage_relative"]
    records = table.to_dict(orient="records")
    columns = [[r["replacement"] for r in records]] + [[cell(r, m) for r in records] for m in metrics]
    fig = go.Figure(go.Table(header=dict(values=["replacement", *metrics]), cells=dict(values=columns)))
    fig.update_layout(title="BOS interventions (mean over heads; point [95% CI])")
    return fig


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
    "trajectory": "Residual stream at position 0 through the layers. Prompts sharing the position-0 "
                  "token have identical trajectories under the causal mask (std exactly 0); different "
                  "tokens give different ones; the bidirectional ablation lets position 0 see the prompt.",
    "sink_reading": "A head is sink-reading when patching only position 0 of its layer input (from a "
                    "run with another position-0 token) changes its output at queries i ≥ 1 by more "
                    "than the threshold (relative norm). Key-0 fraction = share of the output's mass "
                    "A[i,0]|v_0 W_O| / Σ_j A[i,j]|v_j W_O|.",
    "bos": "Replacing what enters at position 0, the fraction of the residual-stream component "
           "L_resid removed at early queries and the total leakage relative to baseline.",
}


def sink_sections(result) -> list[tuple[str, str, go.Figure]]:
    """``(title, caption, figure)`` for the report, from a :class:`SinkAnalysis`."""
    sections = [
        ("Position-0 trajectory by token", SECTION_CAPTIONS["trajectory"],
         trajectory_by_token(result.trajectory, result.trajectory_bidirectional)),
        ("Sink-reading heads", SECTION_CAPTIONS["sink_reading"],
         sink_reading_heatmaps(result.reading, result.sink_scores)),
    ]
    table = result.bos_table()
    if table is not None:
        sections.append(("BOS interventions", SECTION_CAPTIONS["bos"], bos_interventions_figure(table)))
        sections.append(("BOS-intervention table", SECTION_CAPTIONS["bos"], bos_table_figure(table)))
    return sections


def sections_html(result, include_plotlyjs: bool | str = False) -> str:
    """HTML of :func:`sink_sections` (headings, captions, figures) for a report page."""
    parts = []
    for index, (title, caption, fig) in enumerate(sink_sections(result)):
        div = pio.to_html(fig, full_html=False, include_plotlyjs=include_plotlyjs if index == 0 else False)
        parts.append(f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(caption)}</p>{div}")
    if result.probe is not None:
        parts.append("<h2>Fingerprint probe</h2><p class='note'>Cross-validated ridge probe from each "
                     "feature set to the prompts' bag of tokens (out-of-fold R², permutation p-value).</p>"
                     + result.probe.to_html(index=False, float_format=lambda x: f"{x:.4f}", border=0))
    return "".join(parts)


def sinks_html(result) -> str:
    """A standalone page with every sink section."""
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>rope_leak sinks</title></head>"
            f"<body><h1>rope_leak: attention sinks and position 0</h1>{sections_html(result, 'cdn')}"
            "</body></html>")
