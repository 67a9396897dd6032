"""Peak memory of everything after the forward passes, at any n, without running them
(not a test).

Builds the accumulators of SmolLM2-135M's shape (30 layers x 9 heads) for the default run
(every target under the causal and the bidirectional mask, and the start cut's statistics
on the causal pass with w = 32; P prompts in P buckets), fills them with random sums (every
sum of squares large enough that every head has variance), and runs what
``bench/memory_vs_n.py``'s analysis process runs after its passes: the statistics'
transfer, every fit, the inference of ``pattern`` and ``log_pattern``, the completed split
(with its jackknife) and the summary. Prints the resident memory held by the accumulators
(what the analysis adds during its passes) and the peak over the baseline after them, with
the time of each step. The numbers are not meaningful; the memory and the time are those of
the real run's post-pass steps at that n.

    python -m bench.memory_after_passes --tokens 4096
    python -m bench.memory_after_passes --tokens 256 --prompts 64 --append

Writes the printed lines, headed by the command, the date (UTC) and the machine, to
--latest (default ``bench/memory_after_passes_latest.txt``; ``--append`` adds a block).
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
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--latest", default=str(Path(__file__).with_name("memory_after_passes_latest.txt")),
                        help="the latest-output file ('' for none)")
    parser.add_argument("--append", action="store_true", help="append to --latest instead of replacing it")
    args = parser.parse_args()

    from rope_leak.analyses.analysis import Analysis
    from rope_leak.engine.accumulate import LayerAccumulator
    from rope_leak.engine.allocator import tune_allocator
    from rope_leak.engine.pairs import PairDesign, PairSpec
    from rope_leak.engine.start_cut import StartCutAccumulator
    from rope_leak.engine.statistics import (
        TARGETS,
        ConditionStatistics,
        PositionZeroStatistics,
        RunStatistics,
        default_buckets,
    )

    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    tune_allocator()
    say(f"n={args.tokens}, {args.layers}x{args.heads} heads, P={args.prompts}, start cut w={args.window}; "
        "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    base, _ = rss_mib()
    design = PairDesign(PairSpec(), args.tokens)
    buckets = default_buckets(args.prompts)
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for name in ("causal", "bidirectional"):
        acc = LayerAccumulator(design, args.layers, args.heads, buckets, TARGETS)
        for tensor in [*acc.xty.values(), acc.sink_sum]:
            tensor.copy_(torch.rand(tensor.shape, generator=gen, dtype=torch.float64))
        if acc.row_sum is not None:
            acc.row_sum.copy_(-torch.rand(acc.row_sum.shape, generator=gen, dtype=torch.float64))
        for tensor in acc.sumsq.values():
            tensor.fill_(float(design.n_cells) * 100.0)
        acc.count.fill_(args.prompts // buckets)
        runs[name] = acc
    cut = StartCutAccumulator(design, args.layers, args.heads, buckets, args.window)
    cut.load_state({
        "profile_sum": torch.rand(cut.profile_sum.shape, generator=gen, dtype=torch.float64).numpy(),
        "log_pattern_xty": torch.rand(cut.xty.shape, generator=gen, dtype=torch.float64).numpy(),
        "log_pattern_sumsq": np.full(cut.sumsq.shape, float(cut.design.n_cells) * 100.0),
        "log_pattern_count": np.full(buckets, args.prompts // buckets),
        "log_rho": -torch.rand((args.prompts,) + cut.shape, generator=gen, dtype=torch.float64).numpy(),
        "prompt_ids": np.arange(args.prompts)})
    held, _ = rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on
    steps = []

    def step(name, fn):
        started = time.perf_counter()
        out = fn()
        steps.append((name, time.perf_counter() - started, rss_mib()[1] - base))
        say(f"  {name:<26} {steps[-1][1]:7.1f} s   peak so far {steps[-1][2]:7.0f} MiB over baseline")
        return out

    pz = PositionZeroStatistics()
    rng = np.random.default_rng(0)
    pz.add(rng.normal(size=(args.prompts, args.layers + 1, 64)), rng.random((args.prompts, args.layers + 1)))
    stats = step("statistics", lambda: RunStatistics(
        {name: ConditionStatistics(name, acc.to_statistics(), acc.sink_sum.numpy(), pz,
                                   cut.to_statistics() if name == "causal" else None)
         for name, acc in runs.items()}, {}, list(range(args.prompts))))
    analysis = step("fits (Analysis)", lambda: Analysis(stats, n_boot=200, progress=False))
    step("inference pattern", analysis.inference)
    step("completed split", analysis.completed_split)
    step("inference log_pattern", lambda: analysis.inference("log_pattern"))
    step("summary", analysis.summary)
    say(f"accumulators (held during the passes): {held - base:.0f} MiB; peak after the passes: "
        f"{rss_mib()[1] - base:.0f} MiB over the baseline; total {sum(s[1] for s in steps):.0f} s")
    if args.latest:
        import sys

        root = str(Path(__file__).resolve().parents[1])
        if root not in sys.path:
            sys.path.insert(0, root)
        from bench.machine import write_latest

        write_latest(args.latest, lines, module="bench.memory_after_passes", append=args.append)
        print(f"wrote {args.latest}")

if __name__ == "__main__":
    main()
