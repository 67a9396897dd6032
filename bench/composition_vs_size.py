"""How the headline compositions depend on the number of prompts P and their length n
(not a test). For each (P, n): SmolLM2-135M on P Wikipedia chunks of n tokens, target
``pattern``; prints the ablation's pooled composition and the renormalisation split's
mask share, each with its 95% CI, and the mean debiased L_total.

    python bench/composition_vs_size.py --grid 16x128,32x128,64x128,16x256,16x512,16x1024
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="16x128,32x128,64x128,16x256,16x512,16x1024")
    parser.add_argument("--n-boot", type=int, default=500)
    args = parser.parse_args()

    import rope_leak as rl

    rl.tune_allocator()
    model = rl.load_model("smollm2-135m")
    print("SmolLM2-135M, Wikipedia chunks, target pattern, CPU float32; 95% CIs over prompt "
          "buckets (ablation: bootstrap; split: jackknife); compositions pooled over "
          "non-degenerate heads")
    print(f"{'P':>4} {'n':>5} {'mean L_total':>13} {'ablation composition':>28} "
          f"{'split: mask share of log A':>30} {'degenerate':>10} {'s':>6}")
    for cell in args.grid.split(","):
        prompts, tokens = (int(x) for x in cell.split("x"))
        started = time.perf_counter()
        corpus = rl.load_corpus(model, "wikipedia", n_prompts=prompts, n_tokens=tokens, seed=0)
        analysis = rl.analyze(model, corpus, progress=False, n_boot=args.n_boot)
        s = analysis.summary()
        split = s.get("renormalisation_split", {})
        ci = lambda v: f"[{v[0]:.2f}, {v[1]:.2f}]"  # noqa: E731
        print(f"{prompts:>4} {tokens:>5} {s['L_total_debiased']:>13.4f} "
              f"{s['composition']:>10.2f} {ci(s['composition_ci']):>17} "
              f"{split.get('composition', float('nan')):>12.2f} "
              f"{ci(split.get('composition_ci', [float('nan')] * 2)):>17} "
              f"{len(s['heads_degenerate']):>10} {time.perf_counter() - started:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
