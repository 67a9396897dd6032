"""Peak memory and statistics size against the prompt length n (not a test).

For each n, two fresh processes load SmolLM2-135M and the same P Wikipedia chunks of n
tokens: one runs the bare forward passes of both conditions (causal, bidirectional), the
other the analysis (statistics of every head under both masks with the start cut's on the
causal pass, every fit, the completed split and the inference; no sink analysis, no
report). Printed: the peak resident memory (VmHWM) of each, the analysis' excess over the
bare forward passes (target at n = 4096: at most 1 GiB), the size of the sufficient
statistics (the start cut's included), and the time ratio.

    python -m bench.memory_vs_n --prompts 4 --tokens 128,256,512,1024,2048,4096
    python -m bench.memory_vs_n --prompts 4 --tokens 4096 --append   # a row on its own

Writes the table, headed by the command, the date (UTC) and the machine, to --latest
(default ``bench/memory_vs_n_latest.txt``; ``--append`` adds a block to it); with
``--doc docs/memory.md`` it also replaces its block in that page.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def peak_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024


def child(mode: str, prompts: int, tokens: int) -> None:
    import numpy as np
    import torch

    from rope_leak.backends import load_model
    from rope_leak.corpus import load_corpus
    from rope_leak.engine.allocator import tune_allocator
    from rope_leak.engine.run import DEFAULT_CONDITIONS

    tune_allocator()
    model = load_model("smollm2-135m", n_ctx=max(2048, tokens))
    corpus = load_corpus(model, "wikipedia", n_prompts=prompts, n_tokens=tokens, seed=0)
    loaded = peak_mib()
    started = time.perf_counter()
    out = {"loaded_mib": loaded}
    if mode == "bare":
        with torch.no_grad():
            for k in range(prompts):
                for condition in DEFAULT_CONDITIONS.values():
                    with condition(model):
                        model(corpus.tokens[k:k + 1], return_type=None)
    else:
        from rope_leak.analyses.analysis import analyze

        analysis = analyze(model, corpus.tokens, batch_size=1, progress=False, n_boot=200)
        analysis.summary()
        held = {}  # every array the statistics hold, once (derived targets share row sums)
        for cond in analysis.statistics.conditions.values():
            for st in cond.targets.values():
                for array in (*st.arrays(), st.sumsq, st.count, st.cell_sum):
                    if array is not None:
                        held[id(array)] = array.nbytes
            if cond.start_cut is not None:
                for array in cond.start_cut.arrays().values():
                    if isinstance(array, np.ndarray):
                        held[id(array)] = array.nbytes
        out["statistics_mib"] = sum(held.values()) / 2**20
    out["seconds"] = time.perf_counter() - started
    out["peak_mib"] = peak_mib()
    print(json.dumps(out))


def run(mode: str, prompts: int, tokens: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--prompts", str(prompts),
                           "--tokens", str(tokens)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", default="128,256,512,1024,2048,4096")
    parser.add_argument("--child", choices=["bare", "analysis"])
    parser.add_argument("--latest", default=str(Path(__file__).with_name("memory_vs_n_latest.txt")),
                        help="the latest-output file ('' for none)")
    parser.add_argument("--append", action="store_true", help="append to --latest instead of replacing it")
    parser.add_argument("--doc", default=None, help="markdown page whose generated block to replace")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.prompts, int(args.tokens))
        return
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"rope_leak memory against n (SmolLM2-135M, P={args.prompts} Wikipedia chunks, batch 1, "
        "CPU float32; fresh process per cell; start cut on)")
    say("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    say(f"{'n':>6} {'loaded':>9} {'bare peak':>10} {'analysis peak':>14} {'excess':>9} "
        f"{'statistics':>11} {'time ratio':>11} {'bare [s]':>9} {'load':>6}   [MiB]")
    for n in (int(t) for t in args.tokens.split(",")):
        bare, analysis = run("bare", args.prompts, n), run("analysis", args.prompts, n)
        say(f"{n:>6} {bare['loaded_mib']:>9.0f} {bare['peak_mib']:>10.0f} {analysis['peak_mib']:>14.0f} "
            f"{analysis['peak_mib'] - bare['peak_mib']:>9.0f} {analysis['statistics_mib']:>11.1f} "
            f"{analysis['seconds'] / bare['seconds']:>11.2f} {bare['seconds']:>9.0f} "
            f"{os.getloadavg()[0]:>6.1f}")
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench.machine import publish

    publish(lines, "bench.memory_vs_n", latest=args.latest, doc=args.doc, append=args.append)

if __name__ == "__main__":
    main()
