"""Shares of SmolLM2 under bfloat16 / float16 vs float32 (softmax and statistics stay
float32/float64 in the engine). Prints the max and mean |share gap| per target.

    python -m bench.precision --prompts 8 --tokens 128
"""

from __future__ import annotations

import argparse

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rope_leak.analyses.analysis import analyze  # noqa: E402
from rope_leak.backends import load_model  # noqa: E402
from rope_leak.corpus import load_corpus  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--dtypes", default="bfloat16")
    a = p.parse_args()
    model = load_model("smollm2-135m")
    tokens = load_corpus(model, "wikipedia", n_prompts=a.prompts, n_tokens=a.tokens).tokens
    ref = analyze(model, tokens, progress=False)
    print(f"SmolLM2-135M, {a.prompts} prompts x {a.tokens} tokens: |share(dtype) - share(float32)| "
          "over 270 heads")
    for name in a.dtypes.split(","):
        reduced = analyze(load_model("smollm2-135m", dtype=getattr(torch, name)), tokens, progress=False)
        for (cond, target), fit in sorted(ref.fits.items()):
            if target == "neg_log_z":
                continue
            gap = np.abs(reduced.fits[cond, target].share - fit.share)
            print(f"  {name:9s} {cond:13s} {target:12s} max {np.nanmax(gap):.4f}  mean {np.nanmean(gap):.4f}"
                  f"  (float32 mean share {np.nanmean(fit.share):+.4f})")


if __name__ == "__main__":
    main()
