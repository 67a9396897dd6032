"""Figure of the composition against prompt length (not a test): reads the
``summary_P{P}_n{n}.json`` cells that ``bench/composition_vs_size.py --out`` wrote and
draws the ablation's pooled composition and the renormalisation split's mask share,
each with its 95% CI, against n. Writes ``composition_vs_n.html`` and, with Chromium
available, ``composition_vs_n.png`` into the same folder.

    python -m bench.plot_composition_vs_n docs/longctx --prompts 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

ROOT = Path(__file__).resolve().parents[1]


def cells(folder: Path, prompts: int) -> list[dict]:
    out = []
    for path in folder.glob(f"summary_P{prompts}_n*.json"):
        data = json.loads(path.read_text())
        s = data["summary"]
        split = s["renormalisation_split"]
        out.append({"n": data["n"], "ablation": s["composition"], "ablation_ci": s["composition_ci"],
                    "split": split["composition"], "split_ci": split["composition_ci"]})
    if not out:
        raise SystemExit(f"no summary_P{prompts}_n*.json in {folder}: run bench/composition_vs_size.py "
                         f"--out {folder} first.")
    return sorted(out, key=lambda c: c["n"])


def figure(rows: list[dict], prompts: int) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        "ablation: pooled composition (L_mask share)", "renormalisation split: mask share of log A"))
    n = [r["n"] for r in rows]
    for col, key, colour in ((1, "ablation", "#1f77b4"), (2, "split", "#d62728")):
        value = [r[key] for r in rows]
        low = [r[key] - r[f"{key}_ci"][0] for r in rows]
        high = [r[f"{key}_ci"][1] - r[key] for r in rows]
        fig.add_trace(go.Scatter(
            x=n, y=value, mode="lines+markers", line=dict(color=colour), showlegend=False,
            error_y=dict(type="data", symmetric=False, array=high, arrayminus=low),
            hovertemplate="n=%{x}: %{y:.2f}<extra></extra>"), row=1, col=col)
        for level in (0, 1):
            fig.add_hline(y=level, line=dict(color="grey", width=1, dash="dot"), row=1, col=col)
        fig.update_xaxes(type="log", tickvals=n, ticktext=[str(x) for x in n],
                         title_text="prompt length n (tokens)", row=1, col=col)
    fig.update_yaxes(title_text="share (95% CI over prompt buckets)", row=1, col=1)
    fig.update_layout(width=1000, height=420, template="plotly_white", margin=dict(t=80),
                      title=f"SmolLM2-135M, {prompts} Wikipedia chunks per length, target pattern")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    fig = figure(cells(args.folder, args.prompts), args.prompts)
    html = args.folder / "composition_vs_n.html"
    fig.write_html(html, include_plotlyjs="cdn")
    browser = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if browser:
        sys.path.insert(0, str(ROOT / "notebooks"))
        from execute import render_png

        render_png(json.loads(fig.to_json()), args.folder / "composition_vs_n.png", browser)
    print(f"wrote {html}" + (" and its PNG" if browser else " (no Chromium: no PNG)"))


if __name__ == "__main__":
    main()
