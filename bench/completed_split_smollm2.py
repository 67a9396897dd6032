"""The completed split on SmolLM2-135M against the prompt length n (not a test).

For each ``PxN`` cell of ``--grid``: SmolLM2-135M on P Wikipedia chunks of n tokens, the
completed split of ``log A`` (w = 32, queries w <= i <= n - 2; pooled over non-degenerate,
estimable heads; jackknife 95% CIs) beside the bidirectional ablation's composition of
``log A`` (the paper's method; bootstrap CIs). For the first cell also: the headline's
sensitivity to the window (w = 16, 64), the cross term per layer, and for every layer
whose cross term exceeds 0.5 x SS(log A), the heads responsible and what drives them.
Writes ``docs/completed_split_smollm2.md`` (and ``.json``).

    python -m bench.completed_split_smollm2 --grid 64x256,16x128,16x512,16x1024,16x2048
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import rope_leak as rl
from rope_leak.engine.run import run_statistics
from rope_leak.fits.start_cut import completed_split
from rope_leak.heads import head_label
from rope_leak.interventions.mask import causal
from rope_leak.output.results import to_jsonable

LARGE_CROSS = 0.5


def ci(values) -> str:
    return f"[{values[0]:.2f}, {values[1]:.2f}]"


def driver(split, tail_split, sink_score: float, layer: int, head: int) -> str:
    """What drives a head's cross term: the tail of its profile (the term moves by more than
    half when the horizon is cut to 4 w), a sink, or its scores counteracting the cut."""
    cross = split.head_table()["cross"][layer, head]
    cut = tail_split.head_table()["cross"][layer, head]
    if np.isfinite(cut) and abs(cut - cross) > 0.5 * abs(cross):
        return f"profile tail (cross {cross:.2f} -> {cut:.2f} with the horizon at 4 w)"
    if sink_score > 0.3:
        return f"sink (mean A[i, 0] = {sink_score:.2f})"
    return f"scores counteracting the cut (horizon at 4 w: cross {cut:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="64x256,16x128,16x512,16x1024,16x2048")
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default="docs/completed_split_smollm2.md")
    args = parser.parse_args()
    rl.tune_allocator()
    model = rl.load_model("smollm2-135m")
    rows, record, details = [], {}, []
    for index, cell in enumerate(args.grid.split(",")):
        prompts, tokens = (int(x) for x in cell.split("x"))
        if tokens > model.cfg.n_ctx:
            model = rl.load_model("smollm2-135m", n_ctx=tokens)
        started = time.perf_counter()
        corpus = rl.load_corpus(model, "wikipedia", n_prompts=prompts, n_tokens=tokens, seed=0)
        analysis = rl.analyze(model, corpus, progress=False, n_boot=args.n_boot, batch_size=args.batch_size)
        s = analysis.summary()
        c = s["completed_split"]
        inference = analysis.inference("log_pattern")
        ablation = inference.composition
        ablation_text = (f"{float(ablation.estimate):.2f} {ci([float(ablation.low), float(ablation.high)])}"
                         if inference.composition_estimable else
                         f"not estimable (point {inference.composition_point:.2f})")
        seconds = time.perf_counter() - started
        rows.append(f"| {prompts} | {tokens} | {c['mask_share']:.2f} {ci(c['mask_share_ci'])} | "
                    f"{c['cross']:.2f} {ci(c['cross_ci'])} | {c['mask_part']:.2f} | {c['scores_part']:.2f} | "
                    f"{c['heads_kept']} | {len(c['heads_compensating'])} | {len(c['heads_not_estimable'])} | "
                    f"{ablation_text} | {seconds:.0f} |")
        record[cell] = {"completed_split": c, "ablation_log_pattern": [float(ablation.estimate),
                        float(ablation.low), float(ablation.high)],
                        "ablation_log_pattern_estimable": inference.composition_estimable,
                        "ablation_log_pattern_point": inference.composition_point, "seconds": seconds}
        print(rows[-1], flush=True)
        if index == 0:
            details = first_cell_details(model, corpus, analysis, args.batch_size)
            record[cell]["details"] = details["record"]
    today = datetime.date.today().isoformat()
    lines = [
        "# The completed split on SmolLM2-135M",
        "",
        "SmolLM2-135M-Instruct (float32, CPU) on Wikipedia chunks, `log A`, completed split with "
        "w = 32 on queries w <= i <= n - 2 (pooled over non-degenerate, estimable heads; 95% jackknife CIs "
        "over prompt buckets), beside the bidirectional ablation's mask share of `log A` (the "
        "paper's method; 95% bootstrap CIs; biased by the end of the prompt at long n, see "
        "`method.md`; *not estimable* where the pooled L_total's interval reaches 0, the point "
        "ratio in parentheses is then no number to read). Parts and cross term are fractions of "
        "SS(D log A).",
        "",
        f"Command: `python -m bench.completed_split_smollm2 --grid {args.grid}`; {today}; "
        f"{platform.machine()}, {torch.get_num_threads()} threads.",
        "",
        "| P | n | mask share | cross | mask part | scores' part | heads kept | compensating | "
        "not estimable | ablation mask share | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *details.get("lines", []),
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(to_jsonable(record), indent=1, allow_nan=False))
    print(f"wrote {args.out}")


def first_cell_details(model, corpus, analysis, batch_size) -> dict:
    split = analysis.completed_split()
    causal_stats = analysis.statistics.conditions["causal"]
    tail = completed_split(causal_stats, horizon=4 * split.window, jackknife=False)
    lines = [f"## Details at {corpus.n_prompts} x {corpus.n_tokens}", "",
             "Sensitivity to the window (the same prompts, causal pass only):", "",
             "| w | mask share | cross |", "|---|---|---|"]
    sensitivity = {}
    for window in (16, 32, 64):
        if corpus.n_tokens < window + 2:
            continue
        if window == split.window:
            other = split
        else:
            stats = run_statistics(model, corpus.tokens, conditions={"causal": causal}, targets=("log_pattern",),
                                   batch_size=batch_size, progress=False, start_cut_window=window)
            other = completed_split(stats.conditions["causal"])
        table = other.model_table()
        sensitivity[window] = table
        lines.append(f"| {window} | {table['mask_share']:.2f} {ci(other.ci['mask_share'])} | "
                     f"{table['cross']:.2f} {ci(other.ci['cross'])} |")
    layer = split.layer_table()
    lines += ["", "Per layer (w = 32): mask share and cross term, pooled over the layer's heads.", "",
              "| layer | mask share | cross | compensating heads |", "|---|---|---|---|"]
    compensating = split.compensating()
    for l in range(len(layer["cross"])):
        names = ", ".join(head_label(l, h) for h in np.flatnonzero(compensating[l])) or "–"
        lines.append(f"| {l} | {layer['mask_share'][l]:.2f} | {layer['cross'][l]:.2f} | {names} |")
    sink = analysis.sink_scores()
    table = split.head_table()
    large = [l for l in range(len(layer["cross"])) if abs(layer["cross"][l]) > LARGE_CROSS]
    lines += ["", f"Layers whose cross term exceeds {LARGE_CROSS} x SS(log A), the heads with the "
              "largest |cross| x SS(log A) in them, and what drives each:", ""]
    if not large:
        lines.append("None.")
    for l in large:
        weight = np.where(split.keep[l], np.abs(split.cross[l]), 0.0)
        for h in np.argsort(-weight)[:3]:
            if weight[h] <= 0:
                continue
            lines.append(f"- {head_label(l, h)}: mask part {table['mask_part'][l, h]:.2f}, scores' part "
                         f"{table['scores_part'][l, h]:.2f}, cross {table['cross'][l, h]:.2f}; imputed past "
                         f"{split.imputed_past_mass[l, h]:.1f} x window; "
                         f"{driver(split, tail, float(sink[l, h]), l, h)}")
    return {"lines": lines, "record": {"window_sensitivity": sensitivity,
                                       "layer_cross": layer["cross"].tolist(),
                                       "layer_mask_share": layer["mask_share"].tolist()}}


if __name__ == "__main__":
    main()
