"""Benchmark of rope_leak on the embedded model (a script, not a test).

Prints, measured in one run on the same batches (compared variants interleaved, every
figure min / median / max over --repeats):

1. analysis time (all heads, causal + bidirectional, all targets: ``analyze``, i.e. the
   streamed statistics and every head's fitted shares) / time of the bare forward passes
   of the same batches (one per batch and condition, no hooks), at each --prompts.
   Target <= 1.10 (median). The inference that the report adds on top (bootstrap CIs, the
   completed split, diagnostics: a fixed cost, independent of the prompt count) is
   timed apart and shown as a second ratio, not hidden.
2. the common way (``run_with_cache`` of every pattern and score, then per-head numpy
   least squares over the per-pair rows, cross-fitted like rope_leak) / rope_leak, with
   the max abs difference of their shares (on a smaller corpus: the common way is slow).
3. peak memory (VmHWM of a fresh subprocess per configuration) at P=16 vs P=64 (target
   ratio <= 1.1) and n=128 vs n=256.
4. the machine.

    python -m bench.benchmark                  # defaults below, ~45 min on 2 cores
    python -m bench.benchmark --quick          # a few minutes
    python -m bench.benchmark --out bench/latest.txt
    python -m bench.benchmark --prompts 64 --parts 1   # the analysis / bare-forward ratio only

Writes its report, headed by the command, the date (UTC) and the machine, to --latest
(default ``bench/ratio_latest.txt`` when only part 1 runs, else ``bench/latest.txt``); with
``--doc docs/benchmarks.md`` it also replaces its block in that page.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402


def spread(values, fmt="{:.3f}") -> str:
    values = list(values)
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from rope_leak.engine.kernel import load_kernel

    return {
        "cpu": cpu,
        "logical cores (os.cpu_count)": os.cpu_count(),
        "usable cores (affinity)": len(os.sched_getaffinity(0)),
        "torch threads": torch.get_num_threads(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "accumulation path": "fused C kernel" if load_kernel() is not None else "pure torch",
    }


def load(prompts: int, tokens: int, seed: int = 0):
    from rope_leak.backends import load_model
    from rope_leak.corpus import load_corpus

    model = load_model("smollm2-135m")
    corpus = load_corpus(model, "wikipedia", n_prompts=prompts, n_tokens=tokens, seed=seed)
    return model, corpus.tokens


def bare_forward(model, tokens, batch_size: int) -> float:
    from rope_leak.engine.run import DEFAULT_CONDITIONS

    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size]
            for condition in DEFAULT_CONDITIONS.values():
                with condition(model):
                    model(batch, return_type=None)
    return time.perf_counter() - started


def rope_leak_analysis(model, tokens, batch_size: int):
    from rope_leak.analyses.analysis import analyze

    started = time.perf_counter()
    analysis = analyze(model, tokens, batch_size=batch_size, progress=False)
    return time.perf_counter() - started, analysis


def report_inference(analysis) -> float:
    """Time of what the report adds: debiased shares with bootstrap CIs (headline and
    log_pattern targets), the completed split, diagnostics and the tables."""
    started = time.perf_counter()
    analysis.heads()
    analysis.layers()
    analysis.summary()
    return time.perf_counter() - started


def common_way(model, tokens, batch_size: int) -> tuple[float, dict]:
    """Cache every score and pattern, then fit each head by numpy lstsq on per-pair rows."""
    from transformer_lens.utilities import get_act_name

    from rope_leak.engine.pairs import PairDesign, PairSpec
    from rope_leak.engine.run import DEFAULT_CONDITIONS

    started = time.perf_counter()
    n_layers, n = model.cfg.n_layers, tokens.shape[1]
    design = PairDesign(PairSpec(), n)
    qs, ks = design.cells
    X = design.design_matrix()
    X_rel = X[:, design.relative_columns]
    folds = np.arange(len(tokens)) % 2
    shares = {}
    for cname, condition in DEFAULT_CONDITIONS.items():
        caches = []
        names = lambda name: name.endswith("hook_attn_scores") or name.endswith("hook_pattern")  # noqa: E731
        for start in range(0, len(tokens), batch_size):
            with condition(model), torch.no_grad():
                _, cache = model.run_with_cache(tokens[start:start + batch_size], names_filter=names)
            caches.append(cache)
        for layer in range(n_layers):
            s = torch.cat([c[get_act_name("attn_scores", layer)] for c in caches]).double()
            pattern = torch.cat([c[get_act_name("pattern", layer)] for c in caches]).double()
            values = {"pattern": pattern, "log_pattern": s - torch.logsumexp(s, -1, keepdim=True),
                      "scores": s}
            for target, y in values.items():
                rows = y[:, :, qs, ks].numpy()  # [prompt, head, cell]
                for head in range(rows.shape[1]):
                    r2 = {"rel": [], "abs": []}
                    for fit_fold in (0, 1):
                        train, test = rows[folds == fit_fold, head], rows[folds != fit_fold, head]
                        sst = ((test - test.mean()) ** 2).sum()
                        for model_name, design_x in (("rel", X_rel), ("abs", X)):
                            beta = np.linalg.lstsq(np.tile(design_x, (len(train), 1)), train.ravel(),
                                                   rcond=None)[0]
                            sse = ((test - design_x @ beta) ** 2).sum()
                            r2[model_name].append(1 - sse / sst)
                    shares.setdefault((cname, target), np.zeros((n_layers, rows.shape[1])))[layer, head] = (
                        np.mean(r2["abs"]) - np.mean(r2["rel"]))
        del caches
    return time.perf_counter() - started, shares


def memory_child(prompts: int, tokens: int, batch_size: int) -> None:
    model, toks = load(prompts, tokens)
    from rope_leak.analyses.analysis import analyze

    analyze(model, toks, batch_size=batch_size, progress=False)
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"peak_rss_mib": hwm / 1024}))


def peak_memory(prompts: int, tokens: int, batch_size: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(prompts), str(tokens), "--batch-size",
         str(batch_size)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default="16,64",
                   help="prompt counts for the time ratio, comma-separated (default 16,64)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per prompt (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--common-prompts", type=int, default=8, help="prompts for the common-way comparison")
    p.add_argument("--common-tokens", type=int, default=32, help="tokens for the common-way comparison")
    p.add_argument("--memory", default="16x256,64x256,16x128",
                   help="PxN configurations for peak memory ('' to skip)")
    p.add_argument("--memory-repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="--prompts 8 --tokens 128 --repeats 2 --memory 16x128,64x128,16x64 "
                   "--memory-repeats 1")
    p.add_argument("--parts", default="1,2,3", help="which parts to run (default all: 1,2,3)")
    p.add_argument("--out", default=None, help="also write the report to this file")
    p.add_argument("--latest", default=None,
                   help="the latest-output file (default bench/ratio_latest.txt for --parts 1, "
                   "else bench/latest.txt; '' for none)")
    p.add_argument("--append", action="store_true", help="append to --latest instead of replacing it")
    p.add_argument("--doc", default=None, help="markdown page whose generated block to replace")
    p.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    from rope_leak.engine.allocator import tune_allocator

    tune_allocator()  # as the rope-leak command line does; both timed paths share it
    if a.memory_child:
        return memory_child(*a.memory_child, a.batch_size)
    if a.quick:
        a.prompts, a.tokens, a.repeats = "8", 128, 2
        a.memory, a.memory_repeats = "16x128,64x128,16x64", 1

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say("rope_leak benchmark (SmolLM2-135M-Instruct, embedded Wikipedia chunks, CPU float32)")
    for key, value in machine().items():
        say(f"  {key}: {value}")
    say("  figures: min / median / max over repeats; variants interleaved within each repeat")
    say()

    # 1. analysis / bare forward, at each prompt count
    sizes = [int(x) for x in str(a.prompts).split(",")]
    model, all_tokens = load(max(sizes), a.tokens)
    rope_leak_analysis(model, all_tokens[: a.batch_size], a.batch_size)  # warm-up (kernel build, caches)
    for number, prompts in enumerate(sizes):
        tokens = all_tokens[:prompts]
        bare, full, inference = [], [], []
        for r in range(a.repeats):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for which in order:
                if which == 0:
                    bare.append(bare_forward(model, tokens, a.batch_size))
                else:
                    seconds, analysis = rope_leak_analysis(model, tokens, a.batch_size)
                    full.append(seconds)
                    inference.append(report_inference(analysis))
                    del analysis
        ratios = [f / b for f, b in zip(full, bare)]
        with_inference = [(f + i) / b for f, i, b in zip(full, inference, bare)]
        say(f"1{'abcdefgh'[number]}. analysis / bare forward  (P={prompts}, n={a.tokens}, batch {a.batch_size}, "
            f"causal + bidirectional, {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, all targets)")
        say(f"   bare forward passes  [s]: {spread(bare, '{:.1f}')}")
        say(f"   rope_leak analyze    [s]: {spread(full, '{:.1f}')}")
        say(f"   ratio (per repeat)      : {spread(ratios)}   target <= 1.10 (median)")
        say(f"   + report inference   [s]: {spread(inference, '{:.1f}')}   (bootstrap CIs, split, "
            "diagnostics; fixed cost)")
        say(f"   ratio with inference    : {spread(with_inference)}")
        say()
    tokens = all_tokens

    parts = {int(x) for x in a.parts.split(",") if x}
    if 3 not in parts:
        a.memory = ""
    # 2. common way / rope_leak
    if 2 in parts:
        ctokens = tokens[: a.common_prompts, : a.common_tokens]
        if len(ctokens) < a.common_prompts:
            _, ctokens = load(a.common_prompts, a.common_tokens)
        common_t, ours_t = [], []
        for _ in range(a.repeats):
            ours, analysis = rope_leak_analysis(model, ctokens, a.batch_size)
            common, shares = common_way(model, ctokens, a.batch_size)
            ours_t.append(ours)
            common_t.append(common)
        # Both take float32 patterns (TransformerLens' softmax vs the kernel's), so shares agree
        # to float32 rounding times the head's SSE/SST: near-degenerate heads (a fold with
        # almost no variance) magnify it. Reported absolute, relative, and where.
        gaps = {k: np.abs(analysis.fits[k].share - v) for k, v in shares.items()}
        relative = {k: g / np.maximum(np.abs(v), 1e-3) for (k, g), v in zip(gaps.items(), shares.values())}
        worst_key = max(gaps, key=lambda k: np.nanmax(gaps[k]))
        worst = np.unravel_index(np.nanargmax(gaps[worst_key]), gaps[worst_key].shape)
        say(f"2. common way / rope_leak  (P={a.common_prompts}, n={a.common_tokens}; run_with_cache of every "
            "score and pattern, numpy lstsq per head, fold, model, target and condition)")
        say(f"   common way           [s]: {spread(common_t, '{:.2f}')}")
        say(f"   rope_leak            [s]: {spread(ours_t, '{:.2f}')}")
        say(f"   ratio (per repeat)      : {spread([c / o for c, o in zip(common_t, ours_t)], '{:.1f}')}")
        say(f"   max |share difference|  : {float(np.nanmax(gaps[worst_key])):.2e} (all heads, 3 targets, "
            f"2 conditions), at {worst_key[0]} {worst_key[1]} L{worst[0]}H{worst[1]} whose share is "
            f"{float(shares[worst_key][worst]):.4g}")
        say(f"   max relative difference : {max(float(np.nanmax(r)) for r in relative.values()):.2e} "
            "(|difference| / max(|share|, 1e-3); both use float32 patterns)")
        say()

    # 3. peak memory
    configs = [tuple(int(x) for x in c.split("x")) for c in a.memory.split(",") if c]
    if configs:
        del model
        peaks = {c: [] for c in configs}
        for _ in range(a.memory_repeats):
            for c in configs:
                peaks[c].append(peak_memory(*c, a.batch_size))
        say("3. peak memory (VmHWM of a fresh process: model + corpus + analysis)")
        for c, v in peaks.items():
            say(f"   P={c[0]:>3}, n={c[1]:>3}    [MiB]: {spread(v, '{:.0f}')}")
        by = {(pp, nn): v for (pp, nn), v in peaks.items()}
        pairs = [((pp, nn), (qq, nn)) for (pp, nn) in by for (qq, mm) in by if mm == nn and qq > pp]
        for small, large in pairs:
            r = [x / y for x, y in zip(by[large], by[small])]
            say(f"   P={large[0]} / P={small[0]} at n={small[1]}: {spread(r)}   target <= 1.1")
        pairs = [((pp, nn), (pp, mm)) for (pp, nn) in by for (qq, mm) in by if qq == pp and mm > nn]
        for small, large in pairs:
            r = [x / y for x, y in zip(by[large], by[small])]
            say(f"   n={large[1]} / n={small[1]} at P={small[0]}: {spread(r)}")
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.machine import publish

    latest = a.latest
    if latest is None:
        latest = str(ROOT / "bench" / ("ratio_latest.txt" if parts == {1} else "latest.txt"))
    publish(lines, "bench.benchmark", latest=latest, doc=a.doc,
            key="bench.benchmark" + (" --parts 1" if parts == {1} else ""), append=a.append)


if __name__ == "__main__":
    main()
