"""The README's headline figure (not a test): the completed split of SmolLM2-135M by layer.

Reads ``docs/completed_split_smollm2.json`` (written by ``python -m
bench.completed_split_smollm2``) and draws, for its first cell (64 x 256), each layer's
mask share and cross term, with the model-wide mask share and its CI in the title.
Writes ``docs/img/headline.png`` (headless Chromium) and ``docs/img/headline.html``.

    python -m bench.headline_figure
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import plotly.graph_objects as go

ROOT = Path(__file__).resolve().parents[1]


def figure(record: dict, cell: str) -> go.Figure:
    details = record[cell]["details"]
    split = record[cell]["completed_split"]
    layers = list(range(len(details["layer_mask_share"])))
    fig = go.Figure()
    fig.add_bar(x=layers, y=details["layer_mask_share"], name="mask share <D m, D log A> / SS(D log A)",
                marker_color="#636efa")
    fig.add_scatter(x=layers, y=details["layer_cross"], mode="lines+markers", name="cross term / SS(D log A)",
                    line=dict(color="#ef553b"))
    fig.add_hline(y=0, line_color="grey", line_dash="dot")
    fig.add_hline(y=1, line_color="grey", line_dash="dot")
    low, high = split["mask_share_ci"]
    prompts, tokens = cell.split("x")
    fig.update_layout(
        title=(f"SmolLM2-135M, {prompts} x {tokens} Wikipedia tokens: the causal mask's start cut makes "
               f"{split['mask_share']:.2f} [{low:.2f}, {high:.2f}] of the attention's absolute position"),
        xaxis_title="layer (heads pooled)", yaxis_title="fraction of SS(D log A)", width=1000, height=460,
        legend=dict(orientation="h", y=-0.2), template="plotly_white", title_font_size=14)
    return fig


def main() -> None:
    record = json.loads((ROOT / "docs" / "completed_split_smollm2.json").read_text())
    cell = next(iter(record))
    fig = figure(record, cell)
    out = ROOT / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    fig.write_html(out / "headline.html", include_plotlyjs="cdn")
    browser = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("no chromium found. Fix: install chromium, or set CHROMIUM to its path.")
    sys.path.insert(0, str(ROOT / "notebooks"))
    from execute import render_png  # the notebooks' renderer: one way to make PNGs

    render_png(json.loads(fig.to_json()), out / "headline.png", browser)
    print(f"wrote {out / 'headline.png'}")


if __name__ == "__main__":
    main()
