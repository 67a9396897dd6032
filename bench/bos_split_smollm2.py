"""BOS interventions on SmolLM2-135M read on the completed split's parts, at several prompt
counts (not a test).

For each P of --prompts: the first P chunks of the default run's corpus (Wikipedia, 256
tokens, seed 0; ``max(P, 64)`` chunks drawn, so P <= 64 are the default run's first P),
cut to their first 33 tokens, the baseline and each replacement of the position-0
embedding (another token: the most common token of the first 16 chunks at positions >= 1,
as the default run's sink analysis picks it from its 16 sink prompts; the mean embedding;
zeros; norm-matched noise), under the causal mask; the start cut with w = 8 on the early
queries 8 <= i < 32 (``rope_leak.analyses.bos_interventions``, what ``rope-leak analyze``
runs with ``--bos-prompts P``). Mean over heads, debiased, 95%
pivotal bootstrap CIs over prompt buckets; the ratio to the baseline with the paired
percentile CI, "not estimable" when the baseline's CI includes 0.

Writes ``docs/bos_split_smollm2.md`` (the tables, the command, date and machine) and
``docs/bos_split_smollm2_tables.csv`` (every column, one row per P and replacement).

    python -m bench.bos_split_smollm2 --prompts 16,64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.machine import header

SINK_PROMPTS = 16  # the default run's sink prompts, from which it picks the replacement token


def interval(row, name: str, fmt: str = "{:.0f}") -> str:
    low, high = row[f"{name}_low"], row[f"{name}_high"]
    if not (np.isfinite(low) and np.isfinite(high)):
        return fmt.format(row[name])
    return f"{fmt.format(row[name])} [{fmt.format(low)}, {fmt.format(high)}]"


def ratio(row, name: str, removed: bool = False, point: float | None = None) -> str:
    if not row[f"{name}_estimable"]:
        if point is None or not np.isfinite(point):
            return "not estimable"
        return f"not estimable (point {1 - point if removed else point:.2f})"
    value, low, high = row[name], row[f"{name}_low"], row[f"{name}_high"]
    if removed:
        value, low, high = 1 - value, 1 - high, 1 - low
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="16,64")
    parser.add_argument("--tokens", type=int, default=256, help="chunk length of the corpus (cut to 33 tokens)")
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="docs/bos_split_smollm2.md")
    args = parser.parse_args()
    import rope_leak as rl
    from rope_leak.analyses.bos_interventions import bos_interventions, default_replacement_token
    from rope_leak.engine.statistics import default_buckets

    rl.tune_allocator()
    model = rl.load_model("smollm2-135m")
    tables, seconds = [], {}
    for prompts in (int(p) for p in args.prompts.split(",")):
        corpus = rl.load_corpus(model, "wikipedia", n_prompts=max(prompts, 64), n_tokens=args.tokens, seed=0)
        started = time.perf_counter()
        result = bos_interventions(model, corpus.tokens[:prompts], token_id=default_replacement_token(corpus.tokens[:SINK_PROMPTS]),
                                   n_boot=args.n_boot, batch_size=args.batch_size,
                                   n_buckets=default_buckets(prompts))
        table = result.table()
        seconds[prompts] = time.perf_counter() - started
        table.insert(0, "prompts", prompts)
        tables.append(table)
        base = table.iloc[0]
        print(f"P={prompts}: scores' part at baseline {interval(base, 'scores_part_ss')}; "
              f"token removes {ratio(table.iloc[1], 'scores_part_relative', removed=True)} "
              f"({seconds[prompts]:.0f} s)", flush=True)
    lines = [
        "# BOS interventions on SmolLM2-135M, read on the completed split",
        "",
        *header("bench.bos_split_smollm2"),
        "",
        "SmolLM2-135M-Instruct (float32, CPU), the first P chunks of the default run's Wikipedia corpus "
        "cut to 33 tokens, causal mask. Each condition replaces the position-0 embedding before the "
        "forward pass (`token`: the most common token of the first 16 chunks, as the default run picks it, "
        "id in each heading; `mean`: the mean embedding; `zeros`; `noise`: norm-matched Gaussian noise). The "
        "completed split of `log A` with w = 8 on the early queries 8 <= i < 32: `SS(D y^S)` is the "
        "scores' part (what the residual stream carries), `SS(D m)` the start cut's. Debiased, mean over "
        f"heads, 95% pivotal bootstrap CIs over prompt buckets ({args.n_boot} resamples); ratios to the "
        "baseline with paired percentile CIs, *not estimable* when the baseline's CI includes 0 (the "
        "point ratio is then shown in parentheses, without a CI: not a number to read). "
        "\"removed\" is 1 − the ratio: the fraction of the baseline's part that the replacement takes away.",
        "",
    ]
    for table in tables:
        prompts = int(table["prompts"].iloc[0])
        lines += [f"## P = {prompts} ({seconds[prompts]:.0f} s; `token` = id {int(table['token_id'].iloc[0])})", "",
                  "| replacement | scores' part SS(D y^S) | removed of the scores' part | mask part SS(D m) | "
                  "mask part / baseline | scores SS_abs | L_total |",
                  "|---|---|---|---|---|---|---|"]
        base_part = table["scores_part_ss"].iloc[0]
        for _, row in table.iterrows():
            first = row["replacement"] == "baseline"
            lines.append(
                f"| {row['replacement']} | {interval(row, 'scores_part_ss')} | "
                f"{'–' if first else ratio(row, 'scores_part_relative', True, row['scores_part_ss'] / base_part)} | "
                f"{interval(row, 'mask_part_ss')} | {'1' if first else ratio(row, 'mask_part_relative')} | "
                f"{interval(row, 'scores_ss')} | {interval(row, 'L_total_debiased', '{:.3f}')} |")
        lines.append("")
    out = Path(args.out)
    out.write_text("\n".join(lines))
    pd.concat(tables, ignore_index=True).to_csv(out.with_name(out.stem + "_tables.csv"), index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
