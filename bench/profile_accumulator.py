"""Time one hook call of the streaming pass on SmolLM2-sized scores (batch 8, 9 heads,
n = 256, random scores): the accumulator's work for one layer of one batch, under the
causal mask with the start cut (what ``analyze``'s causal pass does), without it, and
under the bidirectional mask.

    python -m bench.profile_accumulator [--batch 8 --heads 9 --n 256 --repeats 30] [--profile]

Prints the median, min and max milliseconds per call; ``--profile`` adds torch's profiler
table of the causal call with the start cut (what the torch bookkeeping around the kernel
costs, op by op).
"""
import argparse
import statistics as st
import time

import torch

from rope_leak.engine.accumulate import LayerAccumulator
from rope_leak.engine.kernel import load_kernel
from rope_leak.engine.pairs import PairDesign, PairSpec
from rope_leak.engine.start_cut import DEFAULT_WINDOW, StartCutAccumulator
from rope_leak.engine.statistics import TARGETS


def hook_call(scores: torch.Tensor, start_cut: bool, layers: int = 30, buckets: int = 32):
    """A function doing what one scores hook does with ``scores``."""
    batch, heads, n, _ = scores.shape
    design = PairDesign(PairSpec(), n)
    cut = StartCutAccumulator(design, layers, heads, buckets, DEFAULT_WINDOW, "cpu") if start_cut else None
    acc = LayerAccumulator(design, layers, heads, buckets, TARGETS,
                           start_cut=None if cut is None else (cut.window, cut.design))
    ids = torch.arange(batch)
    if cut is not None:
        cut.begin_batch(batch)

    def call() -> None:
        acc.add_layer(3, scores, ids)
        if cut is not None:
            cut.add_layer(3, scores, ids, acc.last_log_z, acc.last_start_cut_rows)
    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    n = a.n
    scores = 3 * torch.randn(a.batch, a.heads, n, n)
    causal = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    print(f"one hook call: batch {a.batch}, {a.heads} heads, n = {n}, torch threads {torch.get_num_threads()}, "
          f"{'fused C kernel' if load_kernel() is not None else 'pure-torch path'}")
    for name, x, start_cut in (("causal + start cut", causal, True), ("causal", causal, False),
                               ("bidirectional", scores, False)):
        call = hook_call(x, start_cut)
        for _ in range(3):
            call()
        times = []
        for _ in range(a.repeats):
            started = time.perf_counter()
            call()
            times.append(1e3 * (time.perf_counter() - started))
        print(f"  {name:<20} [ms]: median {st.median(times):.2f}  (min {min(times):.2f}, max {max(times):.2f})")
    if a.profile:
        call = hook_call(causal, True)
        call()
        with torch.profiler.profile() as prof:
            for _ in range(10):
                call()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
