"""Plotly figures of an analysis. Heads are labelled ``L{layer}H{head}``; heatmaps that
are compared share one colour scale, centred on zero."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rope_leak.analysis import Analysis

DIVERGING = "RdBu_r"


def _symmetric_range(*arrays: np.ndarray) -> float:
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    values = values[np.isfinite(values)]
    return float(np.abs(values).max()) if values.size and np.abs(values).max() > 0 else 1.0


def _head_axes(fig: go.Figure, n_layers: int, n_heads: int, **where) -> None:
    """Tick labels ``H0..`` / ``L0..`` on a layer x head heat map."""
    fig.update_xaxes(tickmode="array", tickvals=list(range(n_heads)),
                     ticktext=[f"H{h}" for h in range(n_heads)], **where)
    fig.update_yaxes(tickmode="array", tickvals=list(range(n_layers)),
                     ticktext=[f"L{l}" for l in range(n_layers)], **where)


def _labels(n_layers: int, n_heads: int) -> np.ndarray:
    return np.array([[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)])


def share_heatmaps(analysis: Analysis, target: str | None = None) -> go.Figure:
    """Layer x head maps of ``L_total``, ``L_resid`` and ``L_mask`` on one colour scale."""
    target = target or analysis.target
    dec = analysis.decomposition(target)
    panels = [("L_total (causal mask)", dec.total), ("L_resid (bidirectional)", dec.resid),
              ("L_mask = L_total - L_resid", dec.mask)]
    zmax = _symmetric_range(*(p[1] for p in panels))
    fig = make_subplots(rows=1, cols=3, subplot_titles=[p[0] for p in panels], shared_yaxes=True,
                        horizontal_spacing=0.04)
    n_layers, n_heads = dec.total.shape
    labels = np.array([[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)])
    for col, (name, values) in enumerate(panels, start=1):
        fig.add_trace(go.Heatmap(
            z=values, x=list(range(n_heads)), y=list(range(n_layers)), customdata=labels,
            zmin=-zmax, zmax=zmax, colorscale=DIVERGING, showscale=col == 3,
            colorbar=dict(title="ΔR² (fraction<br>of variance)"),
            hovertemplate="%{customdata}<br>" + name.split(" ")[0] + " = %{z:.4f}<extra></extra>",
        ), row=1, col=col)
        fig.update_xaxes(title_text="head", row=1, col=col)
        _head_axes(fig, n_layers, n_heads, row=1, col=col)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title=f"Absolute-position share per head (target: {target}; ΔR² = R²(M_abs) − R²(M_rel), cross-fitted)",
        height=max(350, 18 * n_layers + 150),
    )
    return fig


def layer_composition(analysis: Analysis, target: str | None = None) -> go.Figure:
    """Mean components per layer (stacked) and the layer's composition ratio."""
    target = target or analysis.target
    table = analysis.layers(target)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_bar(x=table["layer"], y=table["L_mask"], name="L_mask (causal mask)",
                hovertemplate="layer %{x}<br>mean L_mask = %{y:.4f}<extra></extra>")
    fig.add_bar(x=table["layer"], y=table["L_resid"], name="L_resid (residual stream)",
                hovertemplate="layer %{x}<br>mean L_resid = %{y:.4f}<extra></extra>")
    fig.add_scatter(x=table["layer"], y=table["composition"], name="composition L_mask/(L_mask+L_resid)",
                    mode="lines+markers", secondary_y=True,
                    hovertemplate="layer %{x}<br>composition = %{y:.3f}<extra></extra>")
    fig.update_layout(barmode="relative", title=f"Decomposition by layer (target: {target})",
                      legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="mean ΔR² over heads", secondary_y=False)
    fig.update_yaxes(title_text="composition (fraction from the mask)", secondary_y=True)
    return fig


def sink_map(analysis: Analysis) -> go.Figure:
    """Sink score per head under the causal mask and under the bidirectional ablation,
    on one 0..1 colour scale."""
    panels = [("causal mask", analysis.sink_scores("causal")),
              ("bidirectional ablation", analysis.sink_scores("bidirectional"))]
    n_layers, n_heads = panels[0][1].shape
    labels = _labels(n_layers, n_heads)
    fig = make_subplots(rows=1, cols=2, subplot_titles=[p[0] for p in panels], shared_yaxes=True,
                        horizontal_spacing=0.05)
    for col, (name, scores) in enumerate(panels, start=1):
        fig.add_trace(go.Heatmap(
            z=scores, customdata=labels, zmin=0, zmax=1, colorscale="Viridis", showscale=col == 2,
            colorbar=dict(title="mean A[i,0]<br>(attention<br>weight)"),
            hovertemplate="%{customdata}<br>sink score (" + name + ") = %{z:.3f}<extra></extra>",
        ), row=1, col=col)
        fig.update_xaxes(title_text="head", row=1, col=col)
        _head_axes(fig, n_layers, n_heads, row=1, col=col)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=f"Sink score per head (mean attention to key 0 over queries i ≥ 1; "
                            f"sink heads > {analysis.sink_threshold})",
                      height=max(350, 18 * n_layers + 150))
    return fig


def position_zero_trajectory(analysis: Analysis) -> go.Figure:
    """Cross-prompt std of the position-0 residual stream through the layers."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "cross-prompt std of resid at position 0", "norm of resid: position 0 vs others (causal)"])
    profiles = analysis.position_zero()
    for condition, profile in profiles.items():
        depth = list(range(len(profile["std"])))
        fig.add_scatter(x=depth, y=profile["std"], mode="lines+markers", name=f"std, {condition}",
                        hovertemplate="resid_pre %{x}<br>std = %{y:.3g}<extra></extra>", row=1, col=1)
    causal = profiles["causal"]
    depth = list(range(len(causal["norm_position_zero"])))
    fig.add_scatter(x=depth, y=causal["norm_position_zero"], name="|resid₀|", mode="lines+markers",
                    hovertemplate="resid_pre %{x}<br>|resid₀| = %{y:.3g}<extra></extra>", row=1, col=2)
    fig.add_scatter(x=depth, y=causal["norm_other_positions"], name="mean |resid_i|, i ≥ 1",
                    mode="lines+markers",
                    hovertemplate="resid_pre %{x}<br>mean |resid_i| = %{y:.3g}<extra></extra>", row=1, col=2)
    fig.update_xaxes(title_text="layer (resid_pre; last = final resid_post)")
    fig.update_yaxes(title_text="std (model units)", row=1, col=1)
    fig.update_yaxes(title_text="L2 norm (model units, log scale)", type="log", row=1, col=2)
    fig.update_layout(title="Position 0 is a closed system under the causal mask")
    return fig


def target_comparison(analysis: Analysis) -> go.Figure:
    """Mean L_total / L_resid / L_mask over heads for each target (pattern, log pattern,
    scores): the mask part lives in the softmax denominator, so it vanishes for scores."""
    fig = go.Figure()
    targets = analysis.targets
    for component in ("L_total", "L_resid", "L_mask"):
        values = [analysis.decomposition(t).summary()[component] for t in targets]
        fig.add_bar(x=targets, y=values, name=component,
                    hovertemplate="target %{x}<br>mean " + component + " = %{y:.4f}<extra></extra>")
    fig.update_layout(barmode="group", title="Components by target (mean over heads)",
                      xaxis_title="target (response y)", yaxis_title="mean ΔR² (fraction of variance)")
    return fig


def top_heads_figure(table, value: str, label: str = "label", ci: tuple[str, str] | None = None,
                     title: str = "Top heads") -> go.Figure:
    """Dot plot of ``table[value]`` per head, with error bars when ``ci`` names the columns
    of a confidence interval."""
    fig = go.Figure()
    error = None
    if ci is not None and all(c in table for c in ci):
        error = dict(type="data", symmetric=False, array=(table[ci[1]] - table[value]).to_numpy(),
                     arrayminus=(table[value] - table[ci[0]]).to_numpy())
    fig.add_scatter(x=table[label], y=table[value], mode="markers", error_y=error, name=value,
                    hovertemplate="%{x}<br>" + value + " = %{y:.4f}<extra></extra>")
    fig.update_layout(title=title, xaxis_title="head (L<layer>H<head>)",
                      yaxis_title=f"{value} (ΔR², fraction of variance)")
    return fig


def _grid_heatmap(z, *, zmin, zmax, colorscale, name, unit, showscale=True, colorbar_x=None):
    n_q, n_k = z.shape
    return go.Heatmap(
        z=z, x=list(range(n_k)), y=list(range(n_q)), zmin=zmin, zmax=zmax, colorscale=colorscale,
        showscale=showscale, colorbar=dict(title=unit, x=colorbar_x) if colorbar_x is not None else dict(title=unit),
        hovertemplate="query i = %{y}<br>key j = %{x}<br>" + name + " = %{z:.4g}<extra></extra>",
    )


def pattern_figure(patterns: dict[str, np.ndarray], title: str, zmax: float | None = None) -> go.Figure:
    """Query x key attention patterns side by side on one 0..zmax colour scale (keys right,
    queries down; masked entries are 0 under the causal mask)."""
    names = list(patterns)
    values = [np.asarray(patterns[n], dtype=float) for n in names]
    zmax = zmax if zmax is not None else max(float(np.nanmax(v)) for v in values)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True,
                        horizontal_spacing=0.05)
    for col, z in enumerate(values, start=1):
        fig.add_trace(_grid_heatmap(z, zmin=0, zmax=zmax, colorscale="Viridis", name="A[i,j]",
                                    unit="attention<br>weight", showscale=col == len(names)), row=1, col=col)
        fig.update_xaxes(title_text="key position j", row=1, col=col)
    fig.update_yaxes(title_text="query position i", row=1, col=1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, height=420)
    return fig


def head_fit_figure(maps: dict, label: str) -> go.Figure:
    """One head: observed mean response per cell, its best relative fit ``M_rel`` (by offset),
    and the residuals left by ``M_rel`` and by ``M_abs`` (offset + absolute query and key).
    Observed and fit share one scale; the two residual maps share one symmetric scale, so
    what ``M_abs`` removes is visible by eye."""
    target = maps.get("target", "pattern")
    unit = {"pattern": "attention<br>weight", "log_pattern": "log attention<br>weight",
            "scores": "logit"}.get(target, target)
    lo = float(np.nanmin([np.nanmin(maps["observed"]), np.nanmin(maps["fit_rel"])]))
    hi = float(np.nanmax([np.nanmax(maps["observed"]), np.nanmax(maps["fit_rel"])]))
    r = _symmetric_range(maps["resid_rel"], maps["resid_abs"])
    titles = ["observed (mean over prompts)", "M_rel fit: a[i−j]", "residual after M_rel",
              "residual after M_abs"]
    fig = make_subplots(rows=1, cols=4, subplot_titles=titles, shared_yaxes=True, horizontal_spacing=0.06)
    fig.add_trace(_grid_heatmap(maps["observed"], zmin=lo, zmax=hi, colorscale="Viridis", name="observed",
                                unit=unit, showscale=False), row=1, col=1)
    fig.add_trace(_grid_heatmap(maps["fit_rel"], zmin=lo, zmax=hi, colorscale="Viridis", name="M_rel fit",
                                unit=unit, colorbar_x=0.47), row=1, col=2)
    fig.add_trace(_grid_heatmap(maps["resid_rel"], zmin=-r, zmax=r, colorscale=DIVERGING,
                                name="observed − M_rel", unit="residual", showscale=False), row=1, col=3)
    fig.add_trace(_grid_heatmap(maps["resid_abs"], zmin=-r, zmax=r, colorscale=DIVERGING,
                                name="observed − M_abs", unit="residual"), row=1, col=4)
    for col in range(1, 5):
        fig.update_xaxes(title_text="key j", row=1, col=col)
    fig.update_yaxes(title_text="query i", row=1, col=1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=f"{label}: fit by offset vs by absolute position "
                            f"(target {target}, {maps.get('condition', 'causal')} mask; scored cells only)",
                      height=420)
    return fig


def offset_profiles(pattern: np.ndarray, offsets=(0, 1, 2, 4), title: str = "") -> go.Figure:
    """``A[i, i - d]`` against the query position ``i`` for a few offsets ``d``: flat lines
    would mean a purely relative pattern."""
    pattern = np.asarray(pattern, dtype=float)
    fig = go.Figure()
    for d in offsets:
        values = np.diagonal(pattern, offset=-d)
        fig.add_scatter(x=np.arange(d, d + len(values)), y=values, mode="lines+markers", name=f"i − j = {d}",
                        hovertemplate="query i = %{x}<br>A[i, i−" + str(d) + "] = %{y:.4f}<extra></extra>")
    fig.update_layout(title=title or "Attention at a fixed offset, by query position",
                      xaxis_title="query position i", yaxis_title="attention weight A[i, i−d]")
    return fig


def interventions_figure(table) -> go.Figure:
    """BOS interventions: fraction of the baseline L_resid each replacement removes, and the
    leakage (L_total) relative to baseline."""
    rows = table[table["condition"] != "baseline"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["fraction of L_resid removed",
                                                        "leakage relative to baseline"])
    fig.add_bar(x=rows["condition"], y=rows["L_resid_removed"], name="L_resid removed",
                hovertemplate="%{x}<br>removed %{y:.1%} of L_resid<extra></extra>", row=1, col=1)
    fig.add_bar(x=rows["condition"], y=rows["leakage_vs_baseline"], name="L_total / baseline",
                hovertemplate="%{x}<br>L_total = %{y:.1%} of baseline<extra></extra>", row=1, col=2)
    fig.update_yaxes(title_text="fraction (1 = all removed)", tickformat=".0%", row=1, col=1)
    fig.update_yaxes(title_text="L_total / L_total(baseline)", tickformat=".0%", row=1, col=2)
    fig.update_xaxes(title_text="what replaces the position-0 embedding")
    fig.update_layout(title=f"BOS interventions (early queries {table.attrs.get('early_queries', '')})",
                      showlegend=False)
    return fig


def all_figures(analysis: Analysis) -> dict[str, go.Figure]:
    return {
        "shares": share_heatmaps(analysis),
        "composition": layer_composition(analysis),
        "targets": target_comparison(analysis),
        "sinks": sink_map(analysis),
        "position_zero": position_zero_trajectory(analysis),
    }
