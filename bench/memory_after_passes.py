"""Peak memory of everything after the forward passes, at any n, without running them
(not a test).

Builds the accumulators of SmolLM2-135M's shape (30 layers x 9 heads) for the default run
(causal with the unmasked split targets, bidirectional; P prompts in P buckets), fills
them with random sums (every sum of squares large enough that every head has variance),
and runs what ``bench/memory_vs_n.py``'s analysis process runs after its passes: the
statistics' transfer, every fit, the inference of ``pattern`` and ``log_pattern``, the
renormalisation split and the summary. Prints the resident memory held by the
accumulators (what the analysis adds during its passes) and the peak over the baseline
after them, with the time of each step. The numbers are not meaningful; the memory and the
time are those of the real run's post-pass steps at that n.

    python -m bench.memory_after_passes --tokens 4096
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch


def rss_mib() -> tuple[float, float]:
    status = Path("/proc/self/status").read_text().splitlines()
    value = lambda key: next(int(l.split()[1]) for l in status if l.startswith(key)) / 1024  # noqa: E731
    return value("VmRSS"), value("VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    args = parser.parse_args()

    from rope_leak.analyses.analysis import Analysis
    from rope_leak.engine.accumulate import LayerAccumulator
    from rope_leak.engine.allocator import tune_allocator
    from rope_leak.engine.pairs import PairDesign, PairSpec
    from rope_leak.engine.run import default_buckets
    from rope_leak.engine.statistics import (
        SPLIT_TARGETS,
        TARGETS,
        ConditionStatistics,
        PositionZeroStatistics,
        RunStatistics,
    )

    tune_allocator()
    print(f"n={args.tokens}, {args.layers}x{args.heads} heads, P={args.prompts}; load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    base, _ = rss_mib()
    design = PairDesign(PairSpec(), args.tokens)
    buckets = default_buckets(args.prompts)
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for name, unmasked in (("causal", True), ("bidirectional", False)):
        targets = TARGETS if unmasked else tuple(t for t in TARGETS if t not in SPLIT_TARGETS)
        acc = LayerAccumulator(design, args.layers, args.heads, buckets, targets, unmasked=unmasked)
        for tensor in [*acc.xty.values(), acc.sink_sum]:
            tensor.copy_(torch.rand(tensor.shape, generator=gen, dtype=torch.float64))
        for tensor in (acc.row_sum, acc.full_row_sum):
            if tensor is not None:
                tensor.copy_(-torch.rand(tensor.shape, generator=gen, dtype=torch.float64))
        for tensor in acc.sumsq.values():
            tensor.fill_(float(design.n_cells) * 100.0)
        acc.count.fill_(args.prompts // buckets)
        runs[name] = acc
    held, _ = rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on
    steps = []

    def step(name, fn):
        started = time.perf_counter()
        out = fn()
        steps.append((name, time.perf_counter() - started, rss_mib()[1] - base))
        print(f"  {name:<26} {steps[-1][1]:7.1f} s   peak so far {steps[-1][2]:7.0f} MiB over baseline",
              flush=True)
        return out

    pz = PositionZeroStatistics()
    rng = np.random.default_rng(0)
    pz.add(rng.normal(size=(args.prompts, args.layers + 1, 64)), rng.random((args.prompts, args.layers + 1)))
    stats = step("statistics", lambda: RunStatistics(
        {name: ConditionStatistics(name, acc.to_statistics(), acc.sink_sum.numpy(), pz)
         for name, acc in runs.items()}, {}, list(range(args.prompts))))
    analysis = step("fits (Analysis)", lambda: Analysis(stats, n_boot=200, progress=False))
    step("inference pattern", analysis.inference)
    step("split", analysis.split)
    step("inference log_pattern", lambda: analysis.inference("log_pattern"))
    step("summary", analysis.summary)
    print(f"accumulators (held during the passes): {held - base:.0f} MiB; peak after the passes: "
          f"{rss_mib()[1] - base:.0f} MiB over the baseline; total {sum(s[1] for s in steps):.0f} s")


if __name__ == "__main__":
    main()
