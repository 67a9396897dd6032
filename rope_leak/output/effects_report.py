"""The report section on loss effects: per-layer effects of both interventions with CIs,
and the heads run alone. Takes the effects table (a DataFrame), nothing else."""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

LABELS = {"start_cut_removed": "start cut removed (the mask's part)",
          "key_positions_removed": "key positions removed (the scores' part)"}
COLOURS = {"start_cut_removed": "#636efa", "key_positions_removed": "#ef553b"}

CAPTION = ("Change in mean next-token loss (nats) on held-out prompts when each layer's heads "
           "run, all together, without their start cut (the pattern renormalised as if the "
           "sequence had a past, whose mass goes to a virtual key holding the head's mean value) "
           "or without their identified absolute key effect (subtracted from the scores before "
           "the softmax). Left: all predictions; right: early queries (i < 32). Bars: 95% t "
           "intervals over prompt buckets. Positive: the model is worse without it.")


def effects_figure(table: pd.DataFrame) -> go.Figure:
    """Per-layer effects (the ``scope == "layer"`` rows) of both interventions."""
    layers = table[table["scope"] == "layer"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["all predictions", "early queries (i < 32)"],
                        shared_yaxes=False, horizontal_spacing=0.08)
    for col, queries in enumerate(("all", "early"), start=1):
        for intervention, label in LABELS.items():
            rows = layers[(layers["intervention"] == intervention) & (layers["queries"] == queries)]
            fig.add_scatter(
                x=rows["layer"], y=rows["effect_nats"], mode="markers+lines", name=label,
                legendgroup=intervention, showlegend=col == 1, line=dict(color=COLOURS[intervention]),
                error_y=dict(type="data", symmetric=False, array=rows["ci_high"] - rows["effect_nats"],
                             arrayminus=rows["effect_nats"] - rows["ci_low"]),
                hovertemplate="layer %{x}<br>" + label + ": %{y:.4f} nats<extra></extra>", row=1, col=col)
        fig.add_hline(y=0, line_dash="dot", line_color="grey", row=1, col=col)
        fig.update_xaxes(title_text="layer (its heads together)", row=1, col=col)
    fig.update_yaxes(title_text="Δ loss (nats)", row=1, col=1)
    fig.update_layout(title="Does the model use its heads' absolute position? Effect on the held-out loss",
                      height=460, legend=dict(orientation="h", y=-0.2))
    return fig


def top_heads_table(table: pd.DataFrame, k: int = 15) -> pd.DataFrame:
    """The heads run alone, largest |effect| first (all predictions), both interventions."""
    heads = table[(table["scope"] == "head") & (table["queries"] == "all")]
    if heads.empty:
        return heads
    wide = heads.pivot(index="label", columns="intervention", values=["effect_nats", "ci_low", "ci_high"])
    wide.columns = [f"{intervention}: {stat}" for stat, intervention in wide.columns]
    order = wide.filter(like="effect_nats").abs().max(axis=1).sort_values(ascending=False).index
    return wide.loc[order].head(k).reset_index()


def effects_section_html(table: pd.DataFrame, *, baseline_loss: float, n_prompts: int,
                         include_plotlyjs: bool | str = False) -> str:
    """The report section: caption, figure and the top heads' table."""
    div = pio.to_html(effects_figure(table), full_html=False, include_plotlyjs=include_plotlyjs)
    heads = top_heads_table(table)
    heads_html = ("<p class='note'>No head was run alone.</p>" if heads.empty else
                  heads.to_html(index=False, float_format=lambda x: f"{x:.4f}", border=0, na_rep="n/a"))
    return (f"<section id='effects'><h2>Does the model use it? Effects on the loss</h2>"
            f"<p class='note'>{html.escape(CAPTION)} Baseline loss {baseline_loss:.4f} nats on "
            f"{n_prompts} held-out prompts.</p>{div}<h3>Heads run alone</h3>{heads_html}</section>")
