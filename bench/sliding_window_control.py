"""Control for the bidirectional swap of sliding-window layers (not a test).

``rope-leak compare`` swaps a sliding-window layer's causal window ``0 <= i - j < w`` for
the symmetric window ``|i - j| < w``. Beyond ``w`` tokens the symmetric window is cut by
the prompt's ends, so the number of visible keys still depends on the query's absolute
position (``i + w`` keys near the start, ``n - i + w - 1`` near the end): part of what
the swap leaves (``L_resid``) can then come from that denominator, not from the
residual stream. This script reruns the bidirectional condition with the window
dropped (``bidirectional(window="none")``: every key visible in every layer, a constant
count) on the same prompts as ``rope-leak compare`` (same corpus, P, n, seed, buckets),
and prints per layer the debiased ``L_resid`` under it, with the layer kind and a 95%
pivotal bucket-bootstrap CI, and the sliding-vs-global means and their difference.

    python -m bench.sliding_window_control --model gemma3-270m --prompts 8 --tokens 1024 \\
        --out docs/longctx/gemma3_window_none_layers.csv
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=None, help="CSV of the per-layer table (optional)")
    args = parser.parse_args()

    import numpy as np
    import pandas as pd

    import rope_leak as rl
    from rope_leak.analyses.architectures import model_layer_kinds
    from rope_leak.engine.run import run_statistics
    from rope_leak.fits.projection import BucketProjection
    from rope_leak.inference import bootstrap_statistic
    from rope_leak.interventions.mask import bidirectional

    rl.tune_allocator()
    started = time.perf_counter()
    model = rl.load_model(args.model)
    corpus = rl.load_corpus(model, "wikipedia", n_prompts=args.prompts, n_tokens=args.tokens,
                            seed=args.seed)
    stats = run_statistics(model, corpus.tokens, targets=("pattern",), batch_size=args.batch_size,
                           conditions={"bidirectional_none": partial(bidirectional, window="none")},
                           progress=False)
    target = stats.conditions["bidirectional_none"].targets["pattern"]
    kinds = model_layer_kinds(model)
    local = np.array([k == "local" for k in kinds])

    def per_layer(shares):
        layer = shares["s"].mean(2)  # [B, layer]
        return np.concatenate([layer, layer[:, local].mean(1, keepdims=True),
                               layer[:, ~local].mean(1, keepdims=True),
                               (layer[:, local].mean(1) - layer[:, ~local].mean(1))[:, None]], axis=1)

    point = per_layer({"s": BucketProjection.from_statistics(target).debiased_share(None)[0][None]})[0]
    boot = bootstrap_statistic({"s": target}, per_layer, n_boot=args.n_boot, seed=args.seed,
                               share="debiased", method="basic")
    n_layers = len(kinds)
    labels = [str(k) for k in range(n_layers)] + ["mean local", "mean global", "local - global"]
    table = pd.DataFrame({"layer": labels, "kind": kinds + ["local", "global", "difference"],
                          "L_resid_window_none": point, "ci_low": boot.ci_low, "ci_high": boot.ci_high})
    print(f"{args.model}, {args.prompts} x {args.tokens} Wikipedia chunks, target pattern, bidirectional "
          f"with the sliding window dropped (window='none'); debiased shares, 95% pivotal bucket "
          f"bootstrap ({args.n_boot} resamples, {target.n_buckets} buckets)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{time.perf_counter() - started:.0f} s, load average at end {load}")
    if args.out:
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
