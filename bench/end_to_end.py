"""End-to-end cost of the default `rope-leak analyze` against the bare forward passes of
its main analysis (a script, not a test).

In one process, on the same corpus: `rope-leak analyze` as a user runs it (load from the
cache, main analysis, sink analysis, report and result files; ``cli.main``), and the bare
forward passes of the main analysis (every batch under the causal and the bidirectional
mask, no hooks, after a warm-up). Printed: both times, the ratio (target <= 1.5), and the
phases of the analyze run (from its run_info.json). Variants alternate over --repeats.

    python -m bench.end_to_end                          # default analyze: 64 prompts x 256 tokens
    python -m bench.end_to_end --prompts 16 --tokens 128

Writes the printed lines, headed by the command, the date (UTC) and the machine, to
--latest (default ``bench/end_to_end_latest.txt``); with ``--doc docs/benchmarks.md`` it
also replaces its block in that page.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def bare_forward(model, tokens, batch_size: int) -> tuple[float, float]:
    """Wall and CPU (process) seconds of the bare forward passes."""
    from rope_leak.engine.run import DEFAULT_CONDITIONS

    started, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size]
            for condition in DEFAULT_CONDITIONS.values():
                with condition(model):
                    model(batch, return_type=None)
    return time.perf_counter() - started, time.process_time() - cpu


def end_to_end(prompts: int, tokens: int, batch_size: int, out: Path) -> tuple[float, float, dict]:
    from rope_leak.cli import main

    args = ["analyze", "--prompts", str(prompts), "--tokens", str(tokens), "--batch-size", str(batch_size),
            "--out", str(out), "--overwrite", "--no-progress"]
    started, cpu = time.perf_counter(), time.process_time()
    code = main(args)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    if code != 0:
        raise SystemExit(f"rope-leak analyze failed with exit code {code}")
    return seconds, cpu, json.loads((out / "run_info.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the printed lines to this file")
    parser.add_argument("--latest", default="bench/end_to_end_latest.txt",
                        help="the latest-output file ('' for none)")
    parser.add_argument("--append", action="store_true", help="append to --latest instead of replacing it")
    parser.add_argument("--doc", default=None, help="markdown page whose generated block to replace")
    args = parser.parse_args()

    from rope_leak.backends import load_model
    from rope_leak.corpus import load_corpus

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    model = load_model("smollm2-135m")
    tokens = load_corpus(model, "wikipedia", n_prompts=args.prompts, n_tokens=args.tokens, seed=0).tokens
    bare_forward(model, tokens[: args.batch_size], args.batch_size)  # warm-up
    say(f"rope_leak end to end (SmolLM2-135M-Instruct, {args.prompts} x {args.tokens} Wikipedia chunks, "
        f"CPU float32, torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f})")
    bare, full, bare_cpu, full_cpu, infos = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            seconds, cpu, info = end_to_end(args.prompts, args.tokens, args.batch_size, Path(tmp) / "out")
            full.append(seconds)
            full_cpu.append(cpu)
            infos.append(info)
            seconds, cpu = bare_forward(model, tokens, args.batch_size)
            bare.append(seconds)
            bare_cpu.append(cpu)
    ratios = [f / b for f, b in zip(full, bare)]
    cpu_ratios = [f / b for f, b in zip(full_cpu, bare_cpu)]
    fmt = lambda xs: " / ".join(f"{x:.1f}" for x in (min(xs), statistics.median(xs), max(xs)))  # noqa: E731
    say(f"  bare forward passes of the main analysis (causal + bidirectional) [s]: {fmt(bare)}")
    say(f"  rope-leak analyze end to end (load, main analysis, sink analysis, report) [s]: {fmt(full)}")
    for key in ("load_seconds", "main_analysis_seconds", "sink_analysis_seconds"):
        say(f"    {key.removesuffix('_seconds').replace('_', ' '):>15} [s]: {fmt([i[key] for i in infos])}")
    say(f"    {'save + report':>15} [s]: {fmt([f - i['seconds'] for f, i in zip(full, infos)])}")
    say(f"  ratio end to end / bare forward, wall time (min / median / max): "
        f"{' / '.join(f'{r:.2f}' for r in (min(ratios), statistics.median(ratios), max(ratios)))}   target <= 1.5")
    say(f"  CPU time of this process [s]: bare {fmt(bare_cpu)}, end to end {fmt(full_cpu)}")
    say(f"  ratio end to end / bare forward, CPU time (min / median / max): "
        f"{' / '.join(f'{r:.2f}' for r in (min(cpu_ratios), statistics.median(cpu_ratios), max(cpu_ratios)))}"
        "   (less sensitive to other processes on a shared machine)")
    say(f"  load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    from bench.machine import publish

    publish(lines, "bench.end_to_end", latest=args.latest, doc=args.doc, append=args.append)


if __name__ == "__main__":
    main()
