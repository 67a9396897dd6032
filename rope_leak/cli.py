"""Command line: ``rope-leak analyze`` (and friends).

Every run writes into ``--out``: ``results.json``, ``heads.csv``, ``layers.csv``,
``statistics.npz``, ``report.html`` and ``run_info.json`` (timings).
``analyze --shard k/N`` writes only ``statistics.npz`` and ``shard.json``;
``rope-leak merge SHARD_DIR... --out DIR`` turns finished shards into the full results.
A long ``analyze`` checkpoints into ``--out`` and, rerun with the same arguments after
an interruption, resumes from there.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rope_leak import pipeline
from rope_leak.analyses.bos_status import bos_label, spread_text
from rope_leak.backends.zoo import DEFAULT_MODEL
from rope_leak.engine.allocator import tune_allocator
from rope_leak.engine.pairs import PairSpec
from rope_leak.quantities import column
from rope_leak.run_config import RunConfig, add_arguments


def _number(cast: type, minimum: float, kind: str):
    """An argparse ``type`` that parses ``cast`` and rejects values below ``minimum``."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from err
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _number(int, 1, "a whole number")


def _add_run_arguments(parser: argparse.ArgumentParser, groups=("run",)) -> None:
    """The corpus, the output options, and :class:`RunConfig`'s fields of ``groups``."""
    parser.add_argument("--corpus", default="wikipedia",
                        help="'wikipedia' (the embedded excerpt) or a .txt/.jsonl file or folder")
    add_arguments(parser, groups)
    parser.add_argument("--out", default="rope_leak_out", help="output folder (default rope_leak_out)")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rope-leak",
        description="Where does absolute position come from in a RoPE language model?",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_analyze_parser, _add_compare_parser, _add_sinks_parser, _add_effects_parser,
                _add_merge_parser):
        add(sub)
    return parser


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"zoo name, HF folder, .gguf file or TransformerLens name (default {DEFAULT_MODEL})")


def _add_analyze_parser(sub) -> None:
    analyze = sub.add_parser("analyze", help="per-head absolute-position share and its decomposition")
    _add_model_argument(analyze)
    _add_run_arguments(analyze, groups=("run", "analyze", "scale"))


def _add_compare_parser(sub) -> None:
    compare = sub.add_parser(
        "compare",
        help="compare models: the completed split, the ablation's components and composition, sink heads, "
             "depth slope (with CIs)",
        description=(
            "Run the same corpus through each model and write comparison.csv, "
            "comparison_layers.csv, comparison.json and comparison.html into --out. A model "
            "spec is NAME[+VARIANT]: NAME as for 'analyze --model'; VARIANT applies a RoPE "
            "change at inference to global layers: ntk<F> (NTK-by-parts, factor F, "
            "original context = cfg.n_ctx), linear<F> (position interpolation), base<B> "
            "(RoPE base B). Example: rope-leak compare smollm2-135m gemma3-270m smollm2-135m+ntk4"
        ),
    )
    compare.add_argument("models", nargs="+", metavar="MODEL", help="model specs (NAME[+VARIANT])")
    compare.add_argument("--n-boot", type=int, default=200,
                         help="bootstrap resamples of prompt buckets for CIs (0: none; default 200)")
    _add_run_arguments(compare)
    compare.set_defaults(out="rope_leak_compare")


def _add_sinks_parser(sub) -> None:
    sinks = sub.add_parser("sinks", help="sink heads, position-0 trajectory, sink-reading heads, "
                           "fingerprint probe, BOS interventions")
    _add_model_argument(sinks)
    _add_run_arguments(sinks)
    sinks.set_defaults(prompts=32)
    sinks.add_argument("--sink-threshold", type=float, default=0.3,
                       help="threshold of rope_leak's sink score (mean A[i,0] over i >= 1; default 0.3, "
                            "Gu et al.'s eps); Gu et al.'s alpha_0 is reported beside it with eps = 0.3")
    sinks.add_argument("--reading-threshold", type=float, default=0.1,
                       help="relative output change that makes a head sink-reading (default 0.1)")
    sinks.add_argument("--source-token", type=int, default=None,
                       help="other position-0 token for patching/replacements (default: most common token)")
    sinks.add_argument("--reading-prompts", type=_positive_int, default=8,
                       help="prompts used for sink reading (default 8)")
    sinks.add_argument("--early-queries", type=_positive_int, default=32,
                       help="BOS interventions score queries i < this (default 32)")
    sinks.add_argument("--documents", type=_positive_int, default=None,
                       help="draw the prompts from only this many documents (the longest), so the "
                            "fingerprint probe can predict which document a prompt comes from")
    sinks.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default 200)")
    sinks.add_argument("--permutations", type=int, default=100,
                       help="permutations of the probe's null (default 100)")
    sinks.add_argument("--no-bos", action="store_true", help="skip the BOS interventions")
    sinks.add_argument("--bos-bidirectional", action="store_true",
                       help="also run the BOS interventions under the bidirectional ablation "
                            "(full-length prompts; about 6x the cost)")
    sinks.add_argument("--no-probe", action="store_true", help="skip the fingerprint probe")


def _add_effects_parser(sub) -> None:
    effects = sub.add_parser("effects", help="does the model use it? loss effects of removing each "
                             "layer's (and the top heads') start cut and absolute key effect")
    _add_model_argument(effects)
    _add_run_arguments(effects)
    effects.add_argument("--heldout", type=_positive_int, default=16,
                         help="held-out prompts the effects are measured on (default 16)")
    effects.add_argument("--heads", default=None,
                         help="heads to run alone, e.g. 'L3H1,L5H4' (default: top 10 by L_total and by "
                              "each part of the completed split; 'none': no single heads)")
    effects.add_argument("--no-layers", action="store_true", help="skip the per-layer effects")
    effects.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples of the fit (default 200)")
    effects.set_defaults(out="rope_leak_effects")


def _pairs(args: argparse.Namespace) -> PairSpec:
    return RunConfig.from_args(args).pairs


def run_options(args: argparse.Namespace) -> dict:
    """``rope-leak analyze`` arguments as keyword arguments of :func:`rope_leak.run`."""
    return {"model": args.model, "corpus": args.corpus, "out": args.out, "config": RunConfig.from_args(args),
            "overwrite": args.overwrite, "progress": not args.no_progress}


def run_analyze(args: argparse.Namespace) -> int:
    result = pipeline.run(**run_options(args), log=pipeline.stderr_log)
    if result.shard is not None:
        prompts = pipeline.shard_range(result)
        k, n = result.shard
        print(f"wrote shard {k}/{n} (prompts {prompts.start}..{prompts.stop - 1}) to {result.out} "
              f"in {result.run_info['seconds']:.0f} s; combine with `rope-leak merge`")
        return 0
    s = result.analysis.summary()
    ci = lambda key: f"[{s[key + '_ci'][0]:.3f}, {s[key + '_ci'][1]:.3f}]"  # noqa: E731
    completed = s.get("completed_split")
    if completed:
        cci = lambda key: f"[{completed[key + '_ci'][0]:.3f}, {completed[key + '_ci'][1]:.3f}]"  # noqa: E731
        print(f"completed split (w = {completed['window']}, log A): mask share = {completed['mask_share']:.3f} "
              f"{cci('mask_share')}, cross term = {completed['cross']:.3f} {cci('cross')} x SS(log A), "
              f"{len(completed['heads_compensating'])} compensating heads")
    else:
        print("completed split: not computed (prompts shorter than the window + 2)")
    composition = (f"{s['composition_debiased']:.3f} {ci('composition_debiased')}" if
                   s["composition_debiased_estimable"] else "not estimable (the pooled L_total's CI reaches 0)")
    print(f"ablation (the paper's method, {s['target']}): composition (mask share) = {composition}; "
          f"mean L_total = {s['L_total_debiased']:.4f} {ci('L_total_debiased')}, L_resid = "
          f"{s['L_resid_debiased']:.4f} {ci('L_resid_debiased')}, L_mask = {s['L_mask_debiased']:.4f} "
          f"{ci('L_mask_debiased')} (debiased, "
          f"{s['ci_level']:.0%} CIs); top heads: {', '.join(s['top_heads'])}")
    _print_bos_status(s["bos_status"])
    print(f"wrote {result.out}/report.html in {result.run_info['seconds']:.0f} s")
    return 0


def _print_bos_status(bos_status: dict) -> None:
    print(f"BOS: {bos_label(bos_status)}. {bos_status.get('implication', '')}")
    print(spread_text(bos_status))


def run_compare(args: argparse.Namespace) -> int:
    result = pipeline.compare(args.models, args.corpus, args.out, prompts=args.prompts, tokens=args.tokens,
                              seed=args.seed, target=args.target, pairs=_pairs(args),
                              batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                              n_boot=args.n_boot, overwrite=args.overwrite,
                              progress=not args.no_progress, log=pipeline.stderr_log)
    table = result.table
    shown = table.assign(sink_heads=[f"{k} / {n}" for k, n in zip(table["sink_heads"], table["n_heads_total"])],
                         sink_heads_gu=[f"{k} / {n}" for k, n in zip(table["sink_heads_gu"], table["n_heads_total"])])
    cols = [c for c in ("model", "bos", "n_ctx", "window", column("completed_mask_share"), column("completed_cross"),
                        column("L_total"), column("L_mask"), column("L_resid"), column("composition"),
                        "sink_heads", "sink_heads_gu", column("depth_slope_L_resid")) if c in shown]
    print(shown[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    difference = column("L_resid", part="local_minus_global")
    if difference in table:

        def ci(r, part: str) -> str:
            stem = f"L_resid_{part}"
            return f"{r[column('L_resid', part=part)]:.4f} [{r[stem + '_ci_low']:.4f}, {r[stem + '_ci_high']:.4f}]"

        for _, r in table[table[difference].notna()].iterrows():
            print(f"{r['model']}: L_resid over {int(r['n_local_layers'])} sliding-window layers {ci(r, 'local')}, "
                  f"over {int(r['n_global_layers'])} global layers {ci(r, 'global')}, "
                  f"difference {ci(r, 'local_minus_global')}")
    print("completed_*: the completed split of log A (w = 32, the headline); L_*, composition: the "
          "bidirectional ablation (the paper's method; debiased, as `analyze` prints it)")
    print("sink_heads: rope_leak sink score (mean over i >= 1 of A[i,0]) > 0.3; sink_heads_gu: Gu et al. "
          "(ICLR 2025) alpha_0 > 0.3; both out of all heads")
    print(f"wrote {result.out}/comparison.html in {result.seconds:.0f} s")
    return 0


def run_sinks(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    sink_run = pipeline.run_sinks(
        args.model, args.corpus, args.out, prompts=args.prompts, tokens=args.tokens, seed=args.seed,
        documents=args.documents, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
        settings={k: v for k, v in vars(args).items() if k != "func"}, log=pipeline.stderr_log,
        sink_threshold=args.sink_threshold, reading_threshold=args.reading_threshold,
        source_token_id=args.source_token, reading_prompts=args.reading_prompts,
        early_queries=args.early_queries, run_bos_interventions=not args.no_bos, bos_bidirectional=args.bos_bidirectional,
        probe=not args.no_probe, n_boot=args.bootstrap, n_permutations=args.permutations,
        batch_size=args.batch_size, progress=not args.no_progress,
    )
    sink_analysis, out = sink_run.sinks, args.out
    summary = sink_analysis.summary()
    gu = summary["sink_metrics"]["gu_et_al_2025"]
    n_heads = gu["n_heads"]
    print(f"sink heads: {len(gu['sink_heads'])} of {n_heads} by Gu et al.'s alpha_0 > {gu['epsilon']} "
          f"(sink ratio {gu['sink_ratio']:.3f}); {len(summary['sink_heads'])} of {n_heads} by rope_leak's "
          f"score (mean over i >= 1 of A[i,0]) > {args.sink_threshold}; sink-reading heads "
          f"(> {args.reading_threshold}): {len(summary['sink_reading']['sink_reading_heads'])}")
    _print_bos_status(summary["bos_status"])
    check = summary["trajectory"]["max_within_token_deviation"]
    print("closed-system check (causal; each trajectory token put on 2 prompts): max deviation between "
          f"prompts sharing a token {'not estimable' if check is None else f'{check:.3g}'}")
    print(f"fingerprint probe: {'run' if summary['probe_status']['run'] else summary['probe_status']['reason']}")
    bos_table = sink_analysis.bos_table()
    if bos_table is not None:
        fmt = lambda v: "not estimable" if v is None or v != v else f"{v:.3f}"  # noqa: E731
        for row in bos_table.to_dict(orient="records")[1:]:
            print(f"  {row['replacement']:>6}: scores' absolute-position SS x {fmt(row.get('scores_ss_relative'))} "
                  f"[{fmt(row.get('scores_ss_relative_low'))}, {fmt(row.get('scores_ss_relative_high'))}], "
                  f"L_total x {fmt(row.get('L_total_relative'))} of baseline")
    print(f"wrote {out}/sinks.json in {time.perf_counter() - started:.0f} s")
    return 0


# --------------------------------------------------------------------------------------
# Scale out and resume: `analyze --shard k/N`, checkpoints, `merge` (rope_leak.output.shards)
# --------------------------------------------------------------------------------------
def _add_merge_parser(sub) -> None:
    merge = sub.add_parser("merge", help="combine `analyze --shard` outputs into the full results")
    merge.add_argument("shards", nargs="+", metavar="SHARD_DIR", help="--out folders of the shards")
    merge.add_argument("--out", required=True, help="output folder for the merged results")
    merge.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    merge.add_argument("--no-report", action="store_true", help="skip report.html")


def run_merge(args: argparse.Namespace) -> int:
    result = pipeline.merge(args.shards, args.out, overwrite=args.overwrite, report=not args.no_report)
    print(f"merged {len(args.shards)} shards ({result.analysis.n_prompts} prompts) into {result.out}")
    return 0


def _heads_option(text: str | None):
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    return [part.strip() for part in text.split(",") if part.strip()]


def run_effects_command(args: argparse.Namespace) -> int:
    result = pipeline.run_effects(args.model, args.corpus, args.out, prompts=args.prompts,
                                  heldout=args.heldout, tokens=args.tokens, seed=args.seed,
                                  window=args.window, heads=_heads_option(args.heads),
                                  layers=not args.no_layers, batch_size=args.batch_size,
                                  device=args.device, dtype=args.dtype, n_boot=args.n_boot,
                                  overwrite=args.overwrite, progress=not args.no_progress,
                                  log=pipeline.stderr_log)
    table = result.effects.table
    layers = table[(table["scope"] == "layer") & (table["queries"] == "all")]
    for intervention, rows in layers.groupby("intervention", sort=False):
        worst = rows.loc[rows["effect_nats"].abs().idxmax()] if len(rows) else None
        if worst is not None:
            print(f"{intervention}: largest per-layer effect {worst['label']} {worst['effect_nats']:+.4f} nats "
                  f"[{worst['ci_low']:+.4f}, {worst['ci_high']:+.4f}]")
    print(f"baseline loss {result.effects.baseline_loss:.4f} nats on {result.effects.n_prompts} held-out prompts; "
          f"wrote {result.out}/effects.csv and report.html in {result.run_info['seconds']:.0f} s")
    return 0


COMMANDS = {"analyze": run_analyze, "compare": run_compare, "sinks": run_sinks, "merge": run_merge,
            "effects": run_effects_command}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_allocator()  # process-wide malloc thresholds for long streaming passes (ROPE_LEAK_MALLOC=0: off)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("rope-leak: interrupted; nothing was written for the unfinished run.", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, FloatingPointError) as err:  # FloatingPointError: NaN/inf attention
        print(f"rope-leak: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
