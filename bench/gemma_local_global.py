"""Gemma-3-270M: the completed split's mask share of its sliding-window layers against its
global layers, with the interval of the difference (not a test).

For each ``PxN`` cell of ``--grid``: Gemma-3-270M on P Wikipedia chunks of n tokens (the
corpus ``rope-leak compare`` draws: seed 0), one causal pass, the completed split of
``log A`` (w = 32, queries w <= i <= n - 2; pooled over non-degenerate, estimable heads). Each
kind's pooled share and the difference come from the split's delete-one-bucket jackknife
(:meth:`rope_leak.fits.start_cut.CompletedSplit.group_difference`: every replicate
leaves the same bucket out of both kinds, so their correlation is in the interval).
Writes ``docs/compare/gemma_local_global.md`` and ``.json``.

    python -m bench.gemma_local_global --grid 8x1024,32x1024
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.machine import header, record

NAMES = ("mask_share", "cross", "mask_part", "scores_part")


def ci(values) -> str:
    return f"[{values[0]:.2f}, {values[1]:.2f}]"


def cell(model, prompts: int, tokens: int, batch_size: int, window: int) -> dict:
    import rope_leak as rl
    from rope_leak.analyses.architectures import model_layer_kinds
    from rope_leak.engine.run import run_statistics
    from rope_leak.fits.start_cut import completed_split
    from rope_leak.interventions.mask import causal

    started = time.perf_counter()
    corpus = rl.load_corpus(model, "wikipedia", n_prompts=prompts, n_tokens=tokens, seed=0)
    stats = run_statistics(model, corpus.tokens, conditions={"causal": causal}, targets=("log_pattern",),
                           batch_size=batch_size, progress=False, start_cut_window=window)
    split = completed_split(stats.conditions["causal"])
    local = np.array([k == "local" for k in model_layer_kinds(model)])
    out = {"prompts": prompts, "tokens": tokens, "window": window,
           "local_layers": np.flatnonzero(local).tolist(), "global_layers": np.flatnonzero(~local).tolist(),
           "model": {k: split.model_table()[k] for k in NAMES} | {f"{k}_ci": list(split.ci[k]) for k in NAMES},
           "heads_kept": int(split.keep.sum())}
    for name in NAMES:
        diff = split.group_difference(local, ~local, name)
        out[name] = {"local": diff["first"]["estimate"], "local_ci": list(diff["first"]["ci"]),
                     "global": diff["second"]["estimate"], "global_ci": list(diff["second"]["ci"]),
                     "local_minus_global": diff["estimate"], "local_minus_global_ci": list(diff["ci"]),
                     "local_heads": diff["first"]["heads"], "global_heads": diff["second"]["heads"]}
    # sensitivity: without the compensating heads (cross term below -0.5 x SS), and with each
    # global layer left out of its kind in turn
    heads = np.broadcast_to(local[:, None], split.keep.shape)
    compensating = split.compensating()
    out["compensating_heads"] = [f"L{l}H{h}" for l, h in zip(*np.nonzero(compensating))]
    sensitivity = {"without compensating heads": (heads & ~compensating, ~heads & ~compensating)}
    for layer in np.flatnonzero(~local):
        others = ~heads.copy()
        others[layer] = False
        sensitivity[f"global without layer {layer}"] = (heads, others)
    out["sensitivity"] = {}
    for label, (first, second) in sensitivity.items():
        diff = split.group_difference(first, second, "mask_share")
        out["sensitivity"][label] = {
            "local": diff["first"]["estimate"], "local_ci": list(diff["first"]["ci"]),
            "global": diff["second"]["estimate"], "global_ci": list(diff["second"]["ci"]),
            "local_minus_global": diff["estimate"], "local_minus_global_ci": list(diff["ci"]),
            "local_heads": diff["first"]["heads"], "global_heads": diff["second"]["heads"]}
    layers = split.layer_table()
    out["layers"] = [{"layer": l, "kind": "local" if local[l] else "global",
                      "mask_share": float(layers["mask_share"][l]),
                      "mask_share_ci": [float(v) for v in split.layer_ci["mask_share"][l]],
                      "cross": float(layers["cross"][l]), "heads_kept": int(split.keep[l].sum())}
                     for l in range(len(local))]
    out["seconds"] = time.perf_counter() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="8x1024,32x1024")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--out", default="docs/compare/gemma_local_global.md")
    args = parser.parse_args()
    import rope_leak as rl

    rl.tune_allocator()
    model = rl.load_model("gemma3-270m")
    cells = []
    for spec in args.grid.split(","):
        prompts, tokens = (int(x) for x in spec.split("x"))
        cells.append(cell(model, prompts, tokens, args.batch_size, args.window))
        c = cells[-1]["mask_share"]
        print(f"{spec}: local {c['local']:.3f} {ci(c['local_ci'])}, global {c['global']:.3f} "
              f"{ci(c['global_ci'])}, difference {c['local_minus_global']:.3f} "
              f"{ci(c['local_minus_global_ci'])} ({cells[-1]['seconds']:.0f} s)", flush=True)
    first = cells[0]
    lines = [
        "# Gemma-3-270M: sliding-window against global layers",
        "",
        *header("bench.gemma_local_global"),
        "",
        "Gemma-3-270M (float32, CPU) on Wikipedia chunks (the corpus of `rope-leak compare`, seed 0), "
        f"completed split of `log A` with w = {args.window} on queries w <= i <= n - 2, one causal pass. "
        f"Sliding-window (local) layers: {', '.join(map(str, first['local_layers']))} "
        f"({len(first['local_layers'])}); global layers: {', '.join(map(str, first['global_layers']))}. "
        "Each kind's share is pooled over its non-degenerate, estimable heads (sum <D m, D log A> / "
        "sum SS(D log A)); 95% delete-one-bucket jackknife intervals, the difference jackknifed "
        "replicate by replicate (the same bucket left out of both kinds).",
        "",
        "Mask share:",
        "",
        "| P | n | sliding-window layers | global layers | sliding-window − global | whole model | heads kept (local / global) | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        m = c["mask_share"]
        lines.append(f"| {c['prompts']} | {c['tokens']} | {m['local']:.2f} {ci(m['local_ci'])} | "
                     f"{m['global']:.2f} {ci(m['global_ci'])} | {m['local_minus_global']:.2f} "
                     f"{ci(m['local_minus_global_ci'])} | {c['model']['mask_share']:.2f} "
                     f"{ci(c['model']['mask_share_ci'])} | {m['local_heads']} / {m['global_heads']} | "
                     f"{c['seconds']:.0f} |")
    lines += ["", "Cross term (a fraction of SS(D log A)):", "",
              "| P | n | sliding-window layers | global layers | sliding-window − global | whole model |",
              "|---|---|---|---|---|---|"]
    for c in cells:
        m = c["cross"]
        lines.append(f"| {c['prompts']} | {c['tokens']} | {m['local']:.2f} {ci(m['local_ci'])} | "
                     f"{m['global']:.2f} {ci(m['global_ci'])} | {m['local_minus_global']:.2f} "
                     f"{ci(m['local_minus_global_ci'])} | {c['model']['cross']:.2f} {ci(c['model']['cross_ci'])} |")
    lines += ["", "Sensitivity of the mask share: without the compensating heads (cross term below "
              "-0.5 x their SS(D log A); both kinds), and with each global layer left out of its kind:", "",
              "| P | n | variant | sliding-window layers | global layers | sliding-window − global | "
              "heads kept (local / global) |", "|---|---|---|---|---|---|---|"]
    for c in cells:
        for label, m in c["sensitivity"].items():
            lines.append(f"| {c['prompts']} | {c['tokens']} | {label} | {m['local']:.2f} {ci(m['local_ci'])} | "
                         f"{m['global']:.2f} {ci(m['global_ci'])} | {m['local_minus_global']:.2f} "
                         f"{ci(m['local_minus_global_ci'])} | {m['local_heads']} / {m['global_heads']} |")
    lines += ["", "Compensating heads: " + "; ".join(
        f"{c['prompts']} x {c['tokens']}: {', '.join(c['compensating_heads']) or 'none'}" for c in cells)]
    last = cells[-1]
    lines += ["", f"Per layer at {last['prompts']} x {last['tokens']} (jackknife 95% CIs):", "",
              "| layer | kind | mask share | cross | heads kept |", "|---|---|---|---|---|"]
    for row in last["layers"]:
        share = "not estimable" if not row["heads_kept"] else f"{row['mask_share']:.2f} {ci(row['mask_share_ci'])}"
        cross = "–" if not row["heads_kept"] else f"{row['cross']:.2f}"
        lines.append(f"| {row['layer']} | {row['kind']} | {share} | {cross} | {row['heads_kept']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({**record("bench.gemma_local_global"), "cells": cells},
                                                   indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
