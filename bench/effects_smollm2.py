"""Tables of a ``rope-leak effects`` run for docs/ (not a test).

Reads ``effects.csv`` and ``run_info.json`` from the folder ``rope-leak effects --out``
wrote, and writes ``docs/effects_smollm2.md`` (per-layer effects of both interventions,
over all predictions and at early queries, and the heads run alone) with the per-layer
figure as ``docs/img/effects.png`` (headless Chromium).

    rope-leak effects --out rope_leak_effects          # SmolLM2, fits on 64 x 256, 16 held out
    python -m bench.effects_smollm2 rope_leak_effects
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import pandas as pd

from rope_leak.output.effects_report import effects_figure, top_heads_table

ROOT = Path(__file__).resolve().parents[1]


def fmt(row) -> str:
    return f"{row['effect_nats']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "effects_smollm2.md")
    args = parser.parse_args()
    table = pd.read_csv(args.folder / "effects.csv")
    info = json.loads((args.folder / "run_info.json").read_text())
    results = json.loads((args.folder / "results.json").read_text())
    settings = results["provenance"]["settings"]
    layers = table[table["scope"] == "layer"]
    rows = []
    for layer, group in layers.groupby("layer"):
        cell = {(r["intervention"], r["queries"]): fmt(r) for _, r in group.iterrows()}
        rows.append(f"| {layer} | {cell[('start_cut_removed', 'all')]} | {cell[('start_cut_removed', 'early')]} | "
                    f"{cell[('key_positions_removed', 'all')]} | {cell[('key_positions_removed', 'early')]} |")
    excludes_zero = layers[(layers["ci_low"] > 0) | (layers["ci_high"] < 0)]
    heads = top_heads_table(table, k=30)
    head_lines = []
    if not heads.empty:
        for _, r in heads.iterrows():
            head_lines.append(
                f"| {r['label']} | {r['start_cut_removed: effect_nats']:+.4f} "
                f"[{r['start_cut_removed: ci_low']:+.4f}, {r['start_cut_removed: ci_high']:+.4f}] | "
                f"{r['key_positions_removed: effect_nats']:+.4f} "
                f"[{r['key_positions_removed: ci_low']:+.4f}, {r['key_positions_removed: ci_high']:+.4f}] |")
    n_passes = len(table) // 2
    minutes = info.get("effects_seconds", float("nan")) / 60
    lines = [
        "# Does the model use it? Loss effects on SmolLM2-135M",
        "",
        f"SmolLM2-135M-Instruct (float32, CPU). The completed split (w = {settings['window']}) and the "
        f"key effects were fitted on {settings['prompts']} Wikipedia chunks of {settings['tokens']} tokens; "
        f"the interventions ran on {settings['heldout']} further chunks (held out). Each entry: change in "
        "mean next-token loss in nats (positive: worse without it), with a 95% t interval over prompts; "
        "*all*: every prediction, *early*: queries i < 32. Definitions: `method.md`, \"Effects on the loss\".",
        "",
        f"Command: `rope-leak effects --out {args.folder.name}` then `python -m bench.effects_smollm2 "
        f"{args.folder.name}`; {datetime.date.today().isoformat()}; {platform.machine()}, "
        f"{info.get('threads')} threads. {n_passes} intervened passes over the held-out prompts took "
        f"{minutes:.1f} min ({60 * minutes / max(n_passes, 1):.0f} s each; the fit {info.get('fit_seconds', 0) / 60:.1f} min).",
        "",
        *([f"Baseline loss on the held-out prompts: {info['baseline_loss']:.4f} nats "
           f"({info['baseline_loss_early']:.4f} at early queries).", ""] if "baseline_loss" in info else []),
        "## Each layer's heads together",
        "",
        "| layer | start cut removed, all | start cut removed, early | key positions removed, all | "
        "key positions removed, early |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Layer entries whose interval excludes 0: {len(excludes_zero)} of {len(layers)}.",
        "",
        "![Per-layer loss effects](img/effects.png)",
        "",
        "## Heads run alone (largest |effect| first)",
        "",
        "| head | start cut removed, all | key positions removed, all |",
        "|---|---|---|",
        *head_lines,
    ]
    args.out.write_text("\n".join(lines) + "\n")
    fig = effects_figure(table)
    fig.update_layout(width=1100, height=480)
    browser = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if browser:
        sys.path.insert(0, str(ROOT / "notebooks"))
        from execute import render_png  # the notebooks' renderer: one way to make PNGs

        render_png(json.loads(fig.to_json()), ROOT / "docs" / "img" / "effects.png", browser)
    print(f"wrote {args.out}" + ("" if browser else " (no Chromium: no figure)"))


if __name__ == "__main__":
    main()
