"""How the headline numbers depend on the number of prompts P and their length n
(not a test). For each (P, n): SmolLM2-135M on P Wikipedia chunks of n tokens, target
``pattern``; prints the mean debiased L_total, L_resid and L_mask over heads, the
ablation's pooled composition and the renormalisation split's mask share, each with its
95% CI, the number of degenerate heads, the seconds the cell took and the load average
at its end.

    python -m bench.composition_vs_size --grid 16x128,32x128,64x128,16x256,16x512,16x1024
    python -m bench.composition_vs_size --grid 8x128,8x256,8x512,8x1024,8x2048 --n-boot 200 \\
        --batch-size 2 --out docs/composition_vs_n

With ``--out``, every cell also writes ``summary_P{P}_n{n}.json`` (``Analysis.summary()``)
and ``compare_P{P}_n{n}.csv`` / ``compare_layers_P{P}_n{n}.csv``: the same statistics
summarised as ``rope-leak compare`` does (means of per-head shares, composition from
their sums, per-layer values with CIs), so a cell can stand in a comparison table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="16x128,32x128,64x128,16x256,16x512,16x1024")
    parser.add_argument("--n-boot", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="folder for per-cell JSON / CSV (optional)")
    args = parser.parse_args()

    import rope_leak as rl
    from rope_leak.analyses.architectures import model_layer_kinds, summarize_model

    rl.tune_allocator()
    model = rl.load_model("smollm2-135m")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    print("SmolLM2-135M, Wikipedia chunks, target pattern, CPU float32; 95% CIs over prompt "
          "buckets (shares and ablation: bootstrap; split: jackknife); L_* are means of debiased "
          f"shares over non-degenerate heads; compositions pooled over them; n_boot={args.n_boot}")
    print(f"{'P':>4} {'n':>5} {'mean L_total':>24} {'mean L_resid':>24} {'mean L_mask':>25} "
          f"{'ablation composition':>21} {'split: mask share':>18} {'degen':>5} {'s':>6}  load avg")
    ci = lambda v: f"[{v[0]:.2f}, {v[1]:.2f}]"  # noqa: E731
    ci4 = lambda v: f"[{v[0]:.4f}, {v[1]:.4f}]"  # noqa: E731
    for cell in args.grid.split(","):
        prompts, tokens = (int(x) for x in cell.split("x"))
        started = time.perf_counter()
        corpus = rl.load_corpus(model, "wikipedia", n_prompts=prompts, n_tokens=tokens, seed=0)
        analysis = rl.analyze(model, corpus, progress=False, n_boot=args.n_boot,
                              batch_size=args.batch_size)
        s = analysis.summary()
        split = s.get("renormalisation_split", {})
        seconds = time.perf_counter() - started
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"{prompts:>4} {tokens:>5} "
              f"{s['L_total_debiased']:>7.4f} {ci4(s['L_total_debiased_ci']):>16} "
              f"{s['L_resid_debiased']:>7.4f} {ci4(s['L_resid_debiased_ci']):>16} "
              f"{s['L_mask_debiased']:>7.4f} {ci4(s['L_mask_debiased_ci']):>17} "
              f"{s['composition_debiased']:>6.2f} {ci(s['composition_debiased_ci']):>14} "
              f"{split.get('composition', float('nan')):>5.2f} "
              f"{ci(split.get('composition_ci', [float('nan')] * 2)):>12} "
              f"{len(s['heads_degenerate']):>5} {seconds:>6.0f}  {load}", flush=True)
        if out is not None:
            tag = f"P{prompts}_n{tokens}"
            (out / f"summary_{tag}.json").write_text(json.dumps(
                {"P": prompts, "n": tokens, "seconds": seconds, "load_average": os.getloadavg(),
                 "n_boot": args.n_boot, "summary": s}, indent=1, default=_plain))
            result = summarize_model(analysis.statistics, "smollm2-135m", n_boot=args.n_boot,
                                     kinds=model_layer_kinds(model))
            row = dict(result.row, n_prompts=prompts, n_tokens=tokens)
            import pandas as pd

            pd.DataFrame([row]).to_csv(out / f"compare_{tag}.csv", index=False)
            result.layers.to_csv(out / f"compare_layers_{tag}.csv", index=False)


def _plain(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    main()
