"""Time LayerAccumulator.add_layer on SmolLM2-sized inputs (batch 8, 9 heads, n=256)."""
import argparse
import statistics as st
import time

import torch

from rope_leak.engine.accumulate import LayerAccumulator
from rope_leak.engine.pairs import PairDesign, PairSpec
from rope_leak.engine.statistics import TARGETS

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=8)
p.add_argument("--heads", type=int, default=9)
p.add_argument("--n", type=int, default=256)
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--layers", type=int, default=4)
a = p.parse_args()
torch.manual_seed(0)
n = a.n
s = torch.randn(a.batch, a.heads, n, n) * 3
s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
acc = LayerAccumulator(PairDesign(PairSpec(), n), a.layers, a.heads, 32, TARGETS)
ids = torch.arange(a.batch)
acc.add_layer(0, s, ids)
times = []
for _ in range(a.repeats):
    t = time.perf_counter()
    for l in range(a.layers):
        acc.add_layer(l, s, ids)
    times.append((time.perf_counter() - t) / a.layers)
print(f"add_layer per layer: min {min(times)*1e3:.1f} ms, median {st.median(times)*1e3:.1f} ms, max {max(times)*1e3:.1f} ms")
if a.repeats:
    with torch.profiler.profile() as prof:
        acc.add_layer(0, s, ids)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
