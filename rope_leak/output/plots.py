"""Plotly figures of an analysis. Heads are labelled ``L{layer}H{head}``; heatmaps that
are compared share one colour scale, centred on zero.

Each figure of a whole analysis takes its :class:`~rope_leak.output.records.AnalysisRecord`
(or the analysis, whose record it takes):

>>> plots.share_heatmaps(analysis).show()  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rope_leak.output.records import AnalysisRecord, as_analysis_record
from rope_leak.quantities import column

DIVERGING = "RdBu_r"


def _robust_range(*arrays: np.ndarray, quantile: float = 0.98) -> float:
    """A symmetric colour range set by the bulk of heads: the ``quantile`` of ``|value|``
    (outliers saturate and are marked, never set the scale)."""
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    values = np.abs(values[np.isfinite(values)])
    if not values.size:
        return 1.0
    top = float(np.quantile(values, quantile))
    return top if top > 0 else (float(values.max()) or 1.0)


def _quantile_range(*arrays: np.ndarray, low: float = 0.01, high: float = 0.99) -> tuple[float, float]:
    """A colour range ``(zmin, zmax)`` set by the bulk of the cells: their ``low`` and ``high``
    quantiles (a few extreme cells saturate and are marked, never set the scale)."""
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    lo, hi = (float(q) for q in np.quantile(values, [low, high]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _marks(fig: go.Figure, mask: np.ndarray, symbol: str, name: str, row: int, col: int,
           showlegend: bool, where: str = "L%{y}H%{x}", size: int = 7) -> None:
    """Markers on the cells where ``mask`` holds (outliers beyond the scale, degenerate heads);
    ``where`` names a cell in the hover text."""
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return
    fig.add_scatter(x=cols, y=rows, mode="markers", name=name, legendgroup=name,
                    showlegend=showlegend, marker=dict(symbol=symbol, size=size, color="black",
                                                        line=dict(width=1)),
                    hovertemplate=where + ": " + name + "<extra></extra>", row=row, col=col)


def _beyond(z: np.ndarray, zmin: float, zmax: float) -> np.ndarray:
    """Cells outside the colour range ``[zmin, zmax]`` (they saturate)."""
    z = np.asarray(z, dtype=float)
    return np.isfinite(z) & ((z > zmax) | (z < zmin))


def _head_axes(fig: go.Figure, n_layers: int, n_heads: int, **where) -> None:
    """Tick labels ``H0..`` / ``L0..`` on a layer x head heat map."""
    fig.update_xaxes(tickmode="array", tickvals=list(range(n_heads)),
                     ticktext=[f"H{h}" for h in range(n_heads)], **where)
    fig.update_yaxes(tickmode="array", tickvals=list(range(n_layers)),
                     ticktext=[f"L{l}" for l in range(n_layers)], **where)


def _labels(n_layers: int, n_heads: int) -> np.ndarray:
    return np.array([[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)])


def _bottom_legend(fig: go.Figure, plot_height: int, rows: int) -> None:
    """A horizontal legend of ``rows`` rows below the plots, in a margin of its own, so the
    plots keep ``plot_height`` pixels whatever the legend holds."""
    bottom = 70 + 21 * rows
    fig.update_layout(height=plot_height + bottom + 100, margin=dict(t=100, b=bottom),
                      legend=dict(orientation="h", yref="container", y=0, yanchor="bottom",
                                  x=0, xanchor="left"))


def share_heatmaps(analysis) -> go.Figure:
    """Layer x head maps of the headline target's debiased shares and of the completed
    split's parts. The two are in different units (a share of the head's scored variance;
    a fraction of its absolute-position sum of squares, which can exceed 1), so each has
    its own colour scale, set by the bulk of heads. Heads beyond a scale are marked ×,
    degenerate heads (scored variance below the floor; left blank) are marked ○, other
    blank heads (the completed split's heads left out: not estimable) −."""
    record = as_analysis_record(analysis)
    target = record.target
    degenerate = record.head_grid("degenerate")
    panels = [(f"L_total<br>({target}, causal)", record.head_grid(column("L_total", "debiased")), "share"),
              (f"ablation<br>L_mask ({target})", record.head_grid(column("L_mask", "debiased")), "share")]
    if column("completed_scores_part") in record.heads:
        panels += [("completed split:<br>scores' part (log A)", record.head_grid(column("completed_scores_part")),
                    "completed"),
                   ("completed split:<br>start cut (log A)", record.head_grid(column("completed_mask_part")),
                    "completed")]
    shown = [np.where(degenerate, np.nan, values) for _, values, _ in panels]
    groups = list(dict.fromkeys(group for _, _, group in panels))
    zmax = {g: _robust_range(*(v for v, (_, _, pg) in zip(shown, panels) if pg == g)) for g in groups}
    bars = {"share": "share of the head's<br>scored variance", "completed": "fraction of the<br>head's SS(D log A)"}
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels],
                        shared_yaxes=True, horizontal_spacing=0.03)
    n_layers, n_heads = degenerate.shape
    labels = _labels(n_layers, n_heads)
    for col, ((name, _, group), values) in enumerate(zip(panels, shown), start=1):
        last_of_group = col == max(k for k, p in enumerate(panels, start=1) if p[2] == group)
        place = groups.index(group)
        fig.add_trace(go.Heatmap(
            z=values, x=list(range(n_heads)), y=list(range(n_layers)), customdata=labels,
            zmin=-zmax[group], zmax=zmax[group], colorscale=DIVERGING, showscale=last_of_group,
            colorbar=dict(title=bars[group], len=0.45 if len(groups) > 1 else 1.0,
                          y=(0.77 - 0.52 * place) if len(groups) > 1 else 0.5),
            hovertemplate="%{customdata}<br>" + name.replace("<br>", " ") + " = %{z:.4f}<extra></extra>",
        ), row=1, col=col)
        _marks(fig, _beyond(values, -zmax[group], zmax[group]), "x-thin", "beyond the colour scale",
               1, col, col == 1)
        _marks(fig, degenerate, "circle-open", "degenerate (left out)", 1, col, col == 1)
        blank = "not estimable (blank)"
        _marks(fig, ~np.isfinite(values) & ~degenerate, "line-ew-open", blank, 1, col,
               not any(t.name == blank for t in fig.data))
        fig.update_xaxes(title_text="head", row=1, col=col)
        _head_axes(fig, n_layers, n_heads, row=1, col=col)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_yaxes(autorange="reversed")
    ranges = "; ".join(f"{'shares' if g == 'share' else 'completed split'} ±{zmax[g]:.3g}" for g in groups)
    fig.update_layout(title=f"Absolute-position share per head (debiased; colour scales: 98% of heads, {ranges})")
    _bottom_legend(fig, max(220, 18 * n_layers + 60), rows=1)
    fig.update_layout(margin=dict(t=120))
    return fig


#: The y range of the per-layer mask-share panels; a share outside it is drawn as a triangle
#: at the edge (its value and CI on hover).
SHARE_AXIS = (-0.25, 1.25)


def layer_composition(analysis, target: str | None = None) -> go.Figure:
    """Per layer: the debiased components of ``target`` (default: the headline target)
    averaged over non-degenerate heads (bars) and the mask's share of log A by the
    completed split and by the ablation (lines, CIs)."""
    record = as_analysis_record(analysis)
    target = target or record.target
    table = record.layer_table(target)
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        f"mean debiased components ({target}; non-degenerate heads)",
        "mask's share of log A's absolute position (95% CI)"])
    for name, quantity in (("L_total (causal)", "L_total"), ("L_resid (bidirectional)", "L_resid"),
                           ("L_mask = L_total − L_resid", "L_mask")):
        fig.add_bar(x=table["layer"], y=table[column(quantity, "debiased")], name=name, row=1, col=1,
                    hovertemplate="layer %{x}<br>" + name + " = %{y:.4f}<extra></extra>")
    _composition_lines(fig, record, row=1, col=2)
    fig.update_layout(barmode="group", title=f"Decomposition by layer (target: {target})")
    _bottom_legend(fig, 320, rows=(len(fig.data) + 1) // 2)
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="mean ΔR² over heads", row=1, col=1)
    fig.update_yaxes(title_text="fraction from the mask", row=1, col=2)
    return fig


def _composition_lines(fig: go.Figure, record: AnalysisRecord, row=None, col=None) -> None:
    """Per-layer mask shares with CIs. A layer whose share is not estimable (NaN: the
    ablation's pooled L_total's interval reaches 0) or whose CI is wider than 1 (its pooled
    total is about 0, so the ratio is noise) is marked at the bottom, not drawn.
    A share outside ``SHARE_AXIS`` is a triangle at that edge, its value and CI on hover."""
    layers = np.arange(record.n_layers)
    bottom, top = SHARE_AXIS
    off_axis = "off the axis (▲/▼ at the edge; value on hover)"

    def band(estimate, low, high, name, color):
        estimate, low, high = (np.asarray(a, dtype=float) for a in (estimate, low, high))
        ok = np.isfinite(estimate) & np.isfinite(low) & np.isfinite(high) & (high - low <= 1.0)
        outside = ok & ((estimate < bottom) | (estimate > top))
        drawn = ok & ~outside
        fig.add_scatter(
            x=layers, y=np.where(drawn, estimate, np.nan), mode="lines+markers", name=name,
            line=dict(color=color),
            error_y=dict(type="data", symmetric=False, array=np.where(drawn, high - estimate, np.nan),
                         arrayminus=np.where(drawn, estimate - low, np.nan)),
            hovertemplate="layer %{x}<br>" + name + " = %{y:.3f}<extra></extra>", row=row, col=col,
        )
        if outside.any():
            above = estimate[outside] > top
            fig.add_scatter(
                x=layers[outside], y=np.where(above, top - 0.03, bottom + 0.03), mode="markers",
                marker=dict(symbol=np.where(above, "triangle-up", "triangle-down"), size=10, color=color),
                customdata=np.stack([estimate[outside], low[outside], high[outside]], 1),
                name=off_axis, legendgroup=off_axis, showlegend=not any(t.name == off_axis for t in fig.data),
                hovertemplate=("layer %{x}<br>" + name + " = %{customdata[0]:.3f} "
                               "[%{customdata[1]:.3f}, %{customdata[2]:.3f}] (off the axis)<extra></extra>"),
                row=row, col=col)
        if (~ok).any():
            fig.add_scatter(x=layers[~ok], y=np.full((~ok).sum(), -0.15), mode="markers",
                            marker=dict(symbol="x-thin", size=9, color=color, line=dict(width=2, color=color)),
                            name=f"not estimable (pooled total about 0): {name.split(':')[0]}",
                            hovertemplate="layer %{x}: not estimable<extra></extra>", row=row, col=col)

    share = column("completed_mask_share")
    completed = record.layer_table()
    if share in completed:
        low, high = (completed.get(f"{share}_ci_{end}", completed[share]) for end in ("low", "high"))
        band(completed[share], low, high,
             "completed split: <D m, D log A> / SS(D log A)", "#636efa")
    if "log_pattern" in record.targets:
        ablation, composition = record.layer_table("log_pattern"), column("composition", "debiased")
        band(ablation[composition], ablation["composition_ci_low"], ablation["composition_ci_high"],
             "bidirectional ablation (the paper's method): L_mask / L_total (log A)", "#ef553b")
    for y in (0, 1):
        fig.add_hline(y=y, line_dash="dot", line_color="grey", row=row, col=col)
    fig.update_yaxes(range=list(SHARE_AXIS), row=row, col=col)


def sink_map(analysis) -> go.Figure:
    """Sink score per head under the causal mask and under the bidirectional ablation,
    on one 0..1 colour scale."""
    record = as_analysis_record(analysis)
    panels = [("causal mask", record.head_grid("sink_score")),
              ("bidirectional ablation", record.head_grid("sink_score_bidirectional"))]
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
                            f"sink heads > {record.sink_threshold})",
                      height=max(350, 18 * n_layers + 150))
    return fig


def position_zero_trajectory(analysis) -> go.Figure:
    """Cross-prompt std of the position-0 residual stream through the layers."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "cross-prompt std of resid at position 0", "norm of resid: position 0 vs others (causal)"])
    profiles = as_analysis_record(analysis).position_zero
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


def target_comparison(analysis) -> go.Figure:
    """Mean debiased L_total / L_resid / L_mask over non-degenerate heads for each target
    (pattern, log pattern, scores), with bootstrap CIs: the mask part lives in the softmax
    denominator, so it vanishes for scores."""
    means = as_analysis_record(analysis).target_means
    fig = go.Figure()
    for component in ("L_total", "L_resid", "L_mask"):
        est = means[column(component, "debiased")].to_numpy()
        low, high = means[f"{component}_ci_low"].to_numpy(), means[f"{component}_ci_high"].to_numpy()
        fig.add_bar(x=means["target"], y=est, name=component,
                    error_y=dict(type="data", symmetric=False, array=high - est, arrayminus=est - low),
                    hovertemplate="target %{x}<br>mean " + component + " = %{y:.4f}<extra></extra>")
    fig.update_layout(barmode="group", title="Components by target (debiased; mean over non-degenerate heads, 95% CI)",
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


def _grid_heatmap(z, *, zmin, zmax, colorscale, name, unit, showscale=True, colorbar=None):
    n_q, n_k = z.shape
    return go.Heatmap(
        z=z, x=list(range(n_k)), y=list(range(n_q)), zmin=zmin, zmax=zmax, colorscale=colorscale,
        showscale=showscale, colorbar=dict(title=unit, **(colorbar or {})),
        hovertemplate="query i = %{y}<br>key j = %{x}<br>" + name + " = %{z:.4g}<extra></extra>",
    )


_GRID_BEYOND = "beyond the colour scale"


def _mark_beyond(fig: go.Figure, z: np.ndarray, zmin: float, zmax: float, col: int) -> None:
    """Marks the cells of a query x key map outside ``[zmin, zmax]`` (one legend entry)."""
    shown = any(t.name == _GRID_BEYOND and t.showlegend for t in fig.data)
    _marks(fig, _beyond(z, zmin, zmax), "x-thin", _GRID_BEYOND, 1, col, not shown,
           where="query i = %{y}, key j = %{x}", size=4)


def pattern_figure(patterns: dict[str, np.ndarray], title: str, zmax: float | None = None) -> go.Figure:
    """Query x key attention patterns side by side on one 0..zmax colour scale (keys right,
    queries down; masked entries are 0 under the causal mask). By default ``zmax`` is the
    99th percentile of the cells, so a few large weights (A[0,0] = 1) do not set the scale:
    they saturate and are marked ×, and the title states the range."""
    names = list(patterns)
    values = [np.asarray(patterns[n], dtype=float) for n in names]
    zmax = zmax if zmax is not None else _quantile_range(*values)[1]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True,
                        horizontal_spacing=0.05)
    for col, z in enumerate(values, start=1):
        fig.add_trace(_grid_heatmap(z, zmin=0, zmax=zmax, colorscale="Viridis", name="A[i,j]",
                                    unit="attention<br>weight", showscale=col == len(names)), row=1, col=col)
        _mark_beyond(fig, z, 0, zmax, col)
        fig.update_xaxes(title_text="key position j", row=1, col=col)
    fig.update_yaxes(title_text="query position i", row=1, col=1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=f"{title}<br><sup>colour scale 0 to {zmax:.3g} (99th percentile of the cells); "
                            "cells above it marked ×</sup>",
                      height=440, margin=dict(t=100), legend=dict(orientation="h", y=-0.2))
    return fig


def head_fit_figure(maps: dict, label: str) -> go.Figure:
    """One head: observed mean response per cell, its best relative fit ``M_rel`` (by offset),
    and the residuals left by ``M_rel`` and by ``M_abs`` (offset + absolute query and key).
    Observed and fit share one scale (1st to 99th percentile of their cells); the two
    residual maps share one symmetric scale (99th percentile of ``|residual|``), so what
    ``M_abs`` removes is visible by eye. Cells beyond a scale saturate and are marked ×."""
    target = maps.get("target", "pattern")
    unit = {"pattern": "attention<br>weight", "log_pattern": "log attention<br>weight",
            "scores": "logit"}.get(target, target)
    lo, hi = _quantile_range(maps["observed"], maps["fit_rel"])
    r = _robust_range(maps["resid_rel"], maps["resid_abs"], quantile=0.99)
    titles = ["observed (mean over prompts)", "M_rel fit: a[i−j]", "residual after M_rel",
              "residual after M_abs"]
    fig = make_subplots(rows=1, cols=4, subplot_titles=titles, shared_yaxes=True, horizontal_spacing=0.04)
    grids = [(maps["observed"], lo, hi, "Viridis", "observed", unit),
             (maps["fit_rel"], lo, hi, "Viridis", "M_rel fit", unit),
             (maps["resid_rel"], -r, r, DIVERGING, "observed − M_rel", "residual"),
             (maps["resid_abs"], -r, r, DIVERGING, "observed − M_abs", "residual")]
    bars = {2: dict(y=1.0, yanchor="top", len=0.48), 4: dict(y=0.0, yanchor="bottom", len=0.48)}
    for col, (z, zmin, zmax, colorscale, name, bar_title) in enumerate(grids, start=1):
        fig.add_trace(_grid_heatmap(z, zmin=zmin, zmax=zmax, colorscale=colorscale, name=name,
                                    unit=bar_title, showscale=col in bars, colorbar=bars.get(col)),
                      row=1, col=col)
        _mark_beyond(fig, z, zmin, zmax, col)
        fig.update_xaxes(title_text="key j", row=1, col=col)
    fig.update_yaxes(title_text="query i", row=1, col=1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=f"{label}: fit by offset vs by absolute position "
                            f"(target {target}, {maps.get('condition', 'causal')} mask; scored cells only)"
                            f"<br><sup>colour scales: {lo:.3g} to {hi:.3g} (1st–99th percentile), "
                            f"residuals ±{r:.3g} (99th percentile of |residual|); cells beyond marked ×</sup>",
                      height=460, margin=dict(t=100), legend=dict(orientation="h", y=-0.2))
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


def decompositions_by_layer(analysis) -> go.Figure:
    """Per-layer mask share of ``log A``'s absolute position by the two decompositions."""
    fig = go.Figure()
    _composition_lines(fig, as_analysis_record(analysis))
    fig.update_layout(title="Causal-mask share of log A's absolute position, by layer: the two decompositions",
                      xaxis_title="layer", yaxis_title="fraction from the causal mask")
    _bottom_legend(fig, 340, rows=len(fig.data))
    return fig


def all_figures(analysis) -> dict[str, go.Figure]:
    """Every figure of the report, by section name."""
    record = as_analysis_record(analysis)
    return {
        "shares": share_heatmaps(record),
        "composition": layer_composition(record),
        "decompositions": decompositions_by_layer(record),
        "targets": target_comparison(record),
        "sinks": sink_map(record),
        "position_zero": position_zero_trajectory(record),
    }
