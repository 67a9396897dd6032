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
            colorbar=dict(title="ΔR²"),
            hovertemplate="%{customdata}<br>" + name.split(" ")[0] + " = %{z:.4f}<extra></extra>",
        ), row=1, col=col)
        fig.update_xaxes(title_text="head", row=1, col=col)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
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
    scores = analysis.sink_scores()
    n_layers, n_heads = scores.shape
    labels = np.array([[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)])
    fig = go.Figure(go.Heatmap(
        z=scores, customdata=labels, zmin=0, zmax=1, colorscale="Viridis",
        colorbar=dict(title="mean A[i,0]"),
        hovertemplate="%{customdata}<br>sink score = %{z:.3f}<extra></extra>",
    ))
    fig.update_layout(title=f"Sink score per head (mean attention to key 0 over queries i ≥ 1; "
                            f"sink heads > {analysis.sink_threshold})",
                      xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed",
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
                    row=1, col=2)
    fig.add_scatter(x=depth, y=causal["norm_other_positions"], name="mean |resid_i|, i ≥ 1",
                    mode="lines+markers", row=1, col=2)
    fig.update_xaxes(title_text="layer (resid_pre; last = final resid_post)")
    fig.update_yaxes(title_text="std (model units)", row=1, col=1)
    fig.update_yaxes(title_text="L2 norm", type="log", row=1, col=2)
    fig.update_layout(title="Position 0 is a closed system under the causal mask")
    return fig


def all_figures(analysis: Analysis) -> dict[str, go.Figure]:
    return {
        "shares": share_heatmaps(analysis),
        "composition": layer_composition(analysis),
        "sinks": sink_map(analysis),
        "position_zero": position_zero_trajectory(analysis),
    }
