"""The pre-flight memory estimate against measured peaks (not a test; writes docs/memory.md).

For each n, a fresh process loads SmolLM2-135M and one Wikipedia chunk of n tokens and
runs ``run_statistics`` (1 prompt, batch 1, the causal condition with its start cut, CPU
float32, the allocator tuned as the command line does). Its peak resident memory during
the run is read from ``VmHWM`` after resetting it (``/proc/self/clear_refs``) just before
the call, so the model's loading peak does not hide it. Compared with
:func:`rope_leak.engine.memory.estimate_memory`:

* run: what the run adds (peak minus the resident memory just before it) against the
  estimate's run part (attention + activations + statistics), the number the check
  compares with the memory available;
* total: the peak minus the process' resident memory before the model was loaded (Python,
  torch) against the estimate's total (model + run).

An n above 2048 whose whole run would take longer than ``--max-seconds`` (judged from the
n = 2048 time) is stopped after ``--stop-layers`` layers: each layer repeats the same peak,
and the statistics are allocated before the first, so the peak is the whole run's.

    python -m bench.memory_estimate                     # n = 512, 1024, 2048, 4096 (~6 min)
    python -m bench.memory_estimate --max-seconds 0     # whole runs at every n
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "memory.md"
MIB = 2**20


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class StopAfterLayers(Exception):
    """Raised from a hook to end a long run once its peak has been reached."""


def child(n: int, stop_layers: int = 0) -> None:
    import torch

    import rope_leak
    from rope_leak.engine.allocator import tune_allocator
    from rope_leak.engine.memory import estimate_memory
    from rope_leak.engine.run import run_statistics
    from rope_leak.interventions.mask import causal

    tune_allocator()
    torch.set_grad_enabled(False)
    runtime = status("VmRSS")
    model = rope_leak.load_model("smollm2-135m", n_ctx=max(2048, n))
    corpus = rope_leak.load_corpus(model, "wikipedia", n_prompts=4, n_tokens=n, seed=0)
    tokens = corpus.tokens[:1]
    estimate = estimate_memory(model, n, 1, n_prompts=1, conditions=["causal"])
    gc.collect()
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    started = time.perf_counter()
    if stop_layers:  # every layer repeats the same peak; the statistics exist from the start
        def stop(resid, hook):
            raise StopAfterLayers

        model.blocks[stop_layers].hook_resid_pre.add_hook(stop)
    try:
        run_statistics(model, tokens, conditions={"causal": causal}, batch_size=1, progress=False)
    except StopAfterLayers:
        pass
    seconds = time.perf_counter() - started
    print(json.dumps({
        "n": n, "runtime": runtime, "before": before, "peak": status("VmHWM"), "seconds": seconds,
        "model": estimate.model, "attention": estimate.attention, "activations": estimate.activations,
        "statistics": estimate.statistics, "run": estimate.run, "total": estimate.total,
        "layers": stop_layers or model.cfg.n_layers, "n_layers": model.cfg.n_layers,
    }))


def measure(n: int, stop_layers: int = 0) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--stop-layers", str(stop_layers)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


HEADER = ("| n | estimate: run | measured: run | ratio | estimate: total | measured: total | ratio "
          "| attention | activations | statistics | time [s] |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def row(r: dict) -> str:
    run, total = r["peak"] - r["before"], r["peak"] - r["runtime"]
    mib = lambda b: f"{b / MIB:.0f}"  # noqa: E731
    return (f"| {r['n']} | {mib(r['run'])} | {mib(run)} | {r['run'] / run:.2f} | {mib(r['total'])} | "
            f"{mib(total)} | {r['total'] / total:.2f} | {mib(r['attention'])} | {mib(r['activations'])} | "
            f"{mib(r['statistics'])} | {r['seconds']:.0f}{'' if r['layers'] == r['n_layers'] else ' *'} |")


DOC_TEXT = """# Memory: the estimate before a run, and what it is checked against

`run_statistics` (and so `rope-leak analyze`, `rope_leak.analyze`, `rope_leak.run`)
estimates the memory of the run before its first forward pass
(`rope_leak.engine.memory.estimate_memory`) and refuses a run that needs more than is
available, with a message that gives the estimate, what is available, and what fits
(the largest n at batch 1, the largest batch at this n):

```
$ prlimit --as=17179869184 rope-leak analyze --prompts 4 --tokens 16384 --batch-size 1 --no-sinks --out out16k
rope-leak: error: this run needs about 42.3 GiB (model 652 MiB, already loaded; one layer's attention
scores and patterns 38.2 GiB; other activations 888 MiB; statistics 2.5 GiB) for prompts of n = 16384
tokens at batch size 1 on cpu, but only 12.9 GiB is available (RLIMIT_AS 16.0 GiB less 3.1 GiB in use)
beyond the loaded model. What fits: n <= 8808 at batch 1; no batch size at n = 16384. Fix: lower --tokens
to 8808 or less (the largest n that fits at batch 1); or run on a device with more memory, or pass
--force (force=True) to run anyway.
```

(the issue's command, which used to run for 23 s and end with `DefaultCPUAllocator: can't
allocate memory: you tried to allocate 9663676416 bytes`; now refused once the model is
loaded, before the first forward pass).

`force=True` (`run_statistics(..., force=True)`; on the command line `--force`) runs
anyway, with a `MemoryWarning`. An allocation that fails during the passes anyway (other
processes took the memory, or the estimate was low) raises the same kind of error
(`InsufficientMemoryError`, a `MemoryError`): what failed (the size of the allocation,
the batch and condition) and what to lower, without the allocator's text.

## What is counted

With `E = batch x heads x n^2` (one layer's scores, all heads at once) and `e` the model
dtype's size in bytes:

* **the model**: parameters and buffers (already loaded: part of the total, not of what
  the run still needs);
* **one layer's attention**, the largest of its phases. TransformerLens 3.9 makes `q k^T`
  and its scaled copy, then the causally masked copy; after `hook_attn_scores` the masked
  scores stay alive beside the softmax, a `zeros_like` of it, the `isnan` mask and the
  NaN-zeroed pattern: `(4e + 1) E`, the peak for SmolLM2 (9 heads) from n = 2048 on. Within
  the hook, the start cut works in chunks of `K = n^2 min(batch x heads, max(1, 2^24 / n^2))`
  elements and holds a float64 `log A` and its square (`16 K`), SmolLM2's peak below n = 2048
  at batch 1. The CPU
  kernel makes no `O(n^2)` temporary; the pure-torch accumulator (CUDA, float64, no C
  compiler) a float32 pattern, a masked copy and per-prompt float64 copies (`8E + 16E/batch`);
  float16/bfloat16 scores a float32 upcast (`4E`). On the CPU, when one layer's scores are
  under 32 MiB glibc serves them from its heap, which they fragment: the phase counts 1.5
  times (measured at n = 256 and 512);
* **the other activations** of a forward pass, `O(batch x n x (d_model + d_mlp))`;
* **the statistics**: `[bucket, layer, head, 3n]` float64 sums per target and condition,
  row sums, and the start cut's per-prompt `[layer, head, n]` float64 rows (these grow with
  the number of prompts: 4.2 MiB per prompt for SmolLM2 at n = 2048);
* **checkpoint copies**: serialising a checkpoint holds about two more copies of the
  statistics, between batches.

What is available: on the CPU the smallest of `MemAvailable` (psutil, else
`/proc/meminfo`), the memory cgroup's limit less its usage, and `RLIMIT_AS` less the
address space in use (`RLIMIT_DATA` likewise); on CUDA `torch.cuda.mem_get_info` plus what
PyTorch's caching allocator holds unused.

## Estimate against measured peaks

{table_intro}

{table}

*run*: the peak resident memory during `run_statistics` less the resident memory just
before it (`VmHWM` reset through `/proc/self/clear_refs`), against the estimate's run part
(what the check compares with the memory available). *total*: the peak less the resident
memory of the process before the model was loaded (Python, torch), against the estimate's
total (model + run); the ~60-110 MiB it misses is what loading the model leaves in the
heap. Ratios are estimate / measured; MiB.
{notes}
Not measured here: CUDA (the estimate's pure-torch path and `mem_get_info` are the same
code, but no GPU was at hand), bfloat16/float16 and float64 models, batches above 1.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="512,1024,2048,4096")
    parser.add_argument("--max-seconds", type=float, default=240.0,
                        help="an n > 2048 whose whole run would take longer (the n = 2048 time x "
                             "(n / 2048)^2) stops after --stop-layers layers (0: always whole runs)")
    parser.add_argument("--stop-layers", type=int, default=4,
                        help="layers a long run goes through before it is stopped (default 4)")
    parser.add_argument("--child", type=int)
    parser.add_argument("--no-doc", action="store_true", help="print only; do not write docs/memory.md")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.stop_layers)
        return
    command = "python -m bench.memory_estimate " + " ".join(sys.argv[1:])
    load = os.getloadavg()
    print(f"$ {command.strip()}\nload average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(HEADER)
    rows, notes = [], []
    seconds = {}
    for n in (int(t) for t in args.tokens.split(",")):
        stop = 0
        if n > 2048 and args.max_seconds and 2048 in seconds:
            predicted = seconds[2048] * (n / 2048) ** 2  # the scores' work grows as n^2
            if predicted > args.max_seconds:
                stop = args.stop_layers
                notes.append(f"\\* n = {n}: the whole run would take about {predicted:.0f} s (n = 2048 took "
                             f"{seconds[2048]:.0f} s), so it was stopped after {stop} of the model's layers. "
                             "Each layer repeats the same peak and the statistics are allocated before "
                             "the first, so the peak is the whole run's; the time is that of the part run.")
                print(notes[-1])
        result = measure(n, stop)
        seconds[n] = result["seconds"]
        rows.append(row(result))
        print(rows[-1], flush=True)
    if args.no_doc:
        return
    today = datetime.date.today().isoformat()
    intro = (f"Measured with `{command.strip()}` on {today} (SmolLM2-135M, CPU float32, 1 Wikipedia "
             f"prompt, batch 1, the causal condition with its start cut; a fresh process per n; load "
             f"average {load[0]:.1f} at start, the machine shared with other runs).")
    text = DOC_TEXT.format(table_intro=intro, table=HEADER + "\n" + "\n".join(rows),
                           notes="".join(f"\n{note}\n" for note in notes))
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
