"""Figures and report sections for the across-architecture analyses: the model
comparison (``rope-leak compare``), the depth profile and the RoPE-controls
(additivity) check. Kept apart from :mod:`rope_leak.output.plots` / :mod:`rope_leak.output.report`;
every function returns a plotly figure or an HTML fragment that a report can include.
"""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from rope_leak.quantities import NOT_ESTIMABLE, PARTS, column

COMPONENTS = ("L_total", "L_mask", "L_resid")


def _err(table: pd.DataFrame, name: str, stem: str | None = None) -> dict | None:
    """Error bars of column ``name`` from its interval ``{stem}_ci_low`` / ``_ci_high``
    (``stem``: the quantity's name, default ``name``)."""
    stem = name if stem is None else stem
    lo, hi = f"{stem}_ci_low", f"{stem}_ci_high"
    if lo not in table or table[lo].isna().all():
        return None
    return dict(type="data", symmetric=False, array=(table[hi] - table[name]).to_numpy(),
                arrayminus=(table[name] - table[lo]).to_numpy())


def _share_bars(table: pd.DataFrame, x: pd.Series) -> list[go.Bar]:
    """The completed split's mask share of ``log A`` (when the table has it) and the
    ablation's composition, one bar each per row of ``table``; a composition that is not
    estimable is said at its bar's place, not left blank."""
    completed, composition = column("completed_mask_share"), column("composition")
    bars = []
    if completed in table:
        bars.append(go.Bar(name="completed split (mask share of log A)", x=x, y=table[completed],
                           error_y=_err(table, completed), marker_color="#2F4B7C", legendgroup="shares"))
    missing = table[composition].isna()
    bars.append(go.Bar(name="ablation composition (the paper's method)", x=x,
                       y=table[composition].where(~missing, 0.0), error_y=_err(table, composition, "composition"),
                       text=[NOT_ESTIMABLE if m else "" for m in missing], textposition="outside",
                       textangle=-90, marker_color="#BAB0AC", legendgroup="shares"))
    return bars


def comparison_figure(table: pd.DataFrame, layers: pd.DataFrame) -> go.Figure:
    """Three panels: per model, the completed split's mask share of ``log A`` beside the
    ablation's composition (95% CIs); the ablation's components (debiased means over heads,
    95% CIs); and the per-layer ``L_resid`` / ``L_mask`` over relative depth (open diamonds:
    the global layers of a model that also has sliding-window layers)."""
    fig = make_subplots(rows=1, cols=3, column_widths=[0.26, 0.32, 0.42],
                        subplot_titles=("Mask share: completed split vs ablation",
                                        "Ablation: absolute-position share",
                                        "Ablation by depth (dashed: L_mask)"))
    colors = ["#4C78A8", "#F58518", "#72B7B2", "#9D755D", "#FF9DA6", "#EECA3B"]  # one per model
    component_colors = ["#54A24B", "#E45756", "#B279A2"]  # none of the models' colours
    for trace in _share_bars(table, table["model"]):
        fig.add_trace(trace, row=1, col=1)
    for k, comp in enumerate(COMPONENTS):
        fig.add_trace(go.Bar(name=comp, x=table["model"], y=table[column(comp)],
                             error_y=_err(table, column(comp), comp), marker_color=component_colors[k],
                             legendgroup="components"), row=1, col=2)
    resid, mask = column("L_resid"), column("L_mask")
    for k, (model, part) in enumerate(layers.groupby("model", sort=False)):
        color = colors[k % len(colors)]
        fig.add_trace(go.Scatter(x=part["relative_depth"], y=part[resid], mode="lines+markers",
                                 name=f"{model} L_resid", line=dict(color=color)), row=1, col=3)
        fig.add_trace(go.Scatter(x=part["relative_depth"], y=part[mask], mode="lines",
                                 name=f"{model} L_mask", line=dict(color=color, dash="dash")),
                      row=1, col=3)
        if "kind" in part and (part["kind"] == "local").any() and (part["kind"] != "local").any():
            glob = part[part["kind"] != "local"]
            fig.add_trace(go.Scatter(x=glob["relative_depth"], y=glob[resid], mode="markers",
                                     name=f"{model} global layers (L_resid)",
                                     marker=dict(color=color, symbol="diamond-open", size=13,
                                                 line=dict(width=2))),
                          row=1, col=3)
    fig.update_layout(barmode="group", height=480, width=1350, template="plotly_white",
                      legend=dict(orientation="h", y=-0.22))
    fig.update_xaxes(title_text="relative depth (layer / (n_layers - 1))", row=1, col=3)
    return fig


def controls_figure(controls: pd.DataFrame) -> go.Figure:
    """Per RoPE control (``real`` first): the completed split's mask share of ``log A``
    beside the ablation's composition, with 95% CIs."""
    fig = go.Figure(_share_bars(controls, controls["control"]))
    fig.update_layout(title="RoPE controls: mask share under each control", barmode="group",
                      yaxis_title="mask share", template="plotly_white", height=380, width=720,
                      legend=dict(orientation="h", y=-0.2))
    return fig


def _table_html(table: pd.DataFrame, digits: int = 4) -> str:
    return table.to_html(index=False, float_format=lambda v: f"{v:.{digits}f}", border=0,
                         classes="rl-table")


def controls_section(controls: pd.DataFrame, include_plotlyjs: bool | str = "cdn") -> str:
    """HTML section: the controls table, a verdict sentence, and the figure."""
    tol = float(controls["tolerance"].iloc[0]) if "tolerance" in controls else float("nan")
    agrees = controls["agrees_with_real"]
    unknown = controls.loc[agrees.isna(), "control"].tolist()
    off = controls.loc[agrees.notna() & (agrees == False), "control"].tolist()  # noqa: E712
    if unknown:
        verdict = (f"The ablation's composition of {', '.join(unknown)} is not estimable (the pooled "
                   "L_total's interval reaches 0), so the additivity check cannot be read there.")
        if off:
            verdict += f" Controls {', '.join(off)} differ from the real composition by more than {tol:.2f}."
    elif off:
        verdict = (f"Controls {', '.join(off)} differ from the real composition by more than "
                   f"{tol:.2f}: additivity is questionable; read L_mask / L_resid with care.")
    else:
        verdict = f"All controls agree with the real composition within {tol:.2f}: consistent with additivity."
    violated = controls.loc[controls["additivity_violated"], "control"].tolist()
    if violated:
        verdict += (f" Mean L_mask < 0 (additivity violated) under: {', '.join(violated)}.")
    fig = pio.to_html(controls_figure(controls), full_html=False, include_plotlyjs=include_plotlyjs)
    return (f"<section><h2>RoPE controls (additivity check)</h2><p>{html.escape(verdict)}</p>"
            f"{_table_html(controls)}{fig}</section>")


def kind_summary_html(table: pd.DataFrame) -> str:
    """Sliding-window against global layers (models with both kinds): per component the
    mean of the per-layer values over each kind and their difference, with 95% CIs."""
    difference = column("L_resid", part="local_minus_global")
    if difference not in table:
        return ""
    rows = []
    for _, r in table[table[difference].notna()].iterrows():
        for comp in COMPONENTS:
            cells = [f"{r[column(comp, part=part)]:.4f} [{r[f'{comp}_{part}_ci_low']:.4f}, "
                     f"{r[f'{comp}_{part}_ci_high']:.4f}]" for part in PARTS]
            rows.append({"model": r["model"], "component": comp,
                         "layers (sliding / global)": f"{int(r['n_local_layers'])} / "
                                                      f"{int(r['n_global_layers'])}",
                         "sliding": cells[0], "global": cells[1], "sliding - global": cells[2]})
    if not rows:
        return ""
    return ("<h2>Sliding-window vs global layers</h2><p>Mean over layers of each kind of the "
            "per-layer head-mean component; 95% pivotal bucket-bootstrap CIs (one resample for "
            "both kinds).</p>" + pd.DataFrame(rows).to_html(index=False, border=0, classes="rl-table"))


def comparison_html(table: pd.DataFrame, layers: pd.DataFrame, settings: dict | None = None) -> str:
    """A standalone HTML page for ``rope-leak compare``."""
    fig = pio.to_html(comparison_figure(table, layers), full_html=False, include_plotlyjs=True)
    table = table.copy()
    for name in ("sink_heads", "sink_heads_gu"):
        if name in table and "n_heads_total" in table:
            table[name] = [f"{k} / {n}" for k, n in zip(table[name], table["n_heads_total"])]
    cols = [c for c in ("model", "bos", "n_ctx", "window", column("completed_mask_share"),
                        column("completed_cross"), column("L_total"), column("L_mask"), column("L_resid"),
                        column("composition"), "sink_heads", "sink_heads_gu", column("depth_slope_L_resid"),
                        column("depth_slope_L_mask"), "additivity_violated")
            if c in table]
    settings_html = (f"<pre>{html.escape(str(settings))}</pre>" if settings else "")
    kind_html = kind_summary_html(table)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>rope-leak compare</title>"
            "<style>body{font-family:sans-serif;margin:2em} .rl-table td,.rl-table th"
            "{padding:2px 8px;text-align:right}</style></head><body>"
            "<h1>rope-leak compare</h1>" + settings_html + _table_html(table[cols]) + kind_html + fig +
            "<p>completed_*: the completed split of log A (the headline; 95% jackknife CIs over "
            "prompt buckets). L_*, composition: the bidirectional ablation (the paper's method; "
            "out of distribution, and biased by the end of the prompt at long n). Its shares are "
            "debiased; CIs: 95% pivotal (basic) intervals of a bootstrap of prompt "
            "buckets, one joint resample for both masks (sink-head counts: percentile); see "
            "comparison.csv for all interval columns. sink_heads: rope_leak's sink score (mean over "
            "queries i ≥ 1 of A[i,0]) above 0.3; sink_heads_gu: Gu et al. (ICLR 2025) α₀ (query 0 "
            "included) above ε = 0.3; both out of all heads. n_ctx: the context the loaded model "
            "accepts (capped at 2048 unless raised); window: sliding window of the local layers.</p>"
            "</body></html>")
