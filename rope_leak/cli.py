"""Command line: ``rope-leak analyze`` (and friends).

Every run writes into ``--out``: ``results.json``, ``heads.csv``, ``layers.csv``,
``statistics.npz``, ``report.html`` and ``run_info.json`` (timings).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from rope_leak.engine.pairs import PairSpec

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default="wikipedia",
                        help="'wikipedia' (the embedded excerpt) or a .txt/.jsonl file or folder")
    parser.add_argument("--prompts", type=_positive_int, default=64, help="number of chunks P (default 64)")
    parser.add_argument("--tokens", type=_positive_int, default=256, help="tokens per chunk n (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--target", choices=("pattern", "log_pattern", "scores"), default="pattern",
                        help="response whose share is headlined (all three are computed)")
    parser.add_argument("--include-sink", action="store_true", help="score key 0 as well")
    parser.add_argument("--min-query", type=int, default=1)
    parser.add_argument("--max-query", type=int, default=None, help="score only queries i < this")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="rope_leak_out", help="output folder (default rope_leak_out)")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rope-leak",
        description="Where does absolute position come from in a RoPE language model?",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    analyze = sub.add_parser("analyze", help="per-head absolute-position share and its decomposition")
    analyze.add_argument("--model", default=DEFAULT_MODEL,
                         help=f"zoo name, HF folder, .gguf file or TransformerLens name (default {DEFAULT_MODEL})")
    _add_run_arguments(analyze)
    sinks = sub.add_parser("sinks", help="sink heads, position-0 trajectory, sink-reading heads, "
                           "fingerprint probe, BOS interventions")
    sinks.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"zoo name, HF folder, .gguf file or TransformerLens name (default {DEFAULT_MODEL})")
    _add_run_arguments(sinks)
    sinks.set_defaults(prompts=32)
    sinks.add_argument("--sink-threshold", type=float, default=0.3,
                       help="sink score threshold (mean A[i,0] over i >= 1; default 0.3)")
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
    sinks.add_argument("--no-probe", action="store_true", help="skip the fingerprint probe")
    return parser


def run_analyze(args: argparse.Namespace) -> int:
    from rope_leak.analysis import analyze
    from rope_leak.corpus import load_corpus
    from rope_leak.models import load_model
    from rope_leak.results import check_output_dir, save_analysis

    check_output_dir(args.out, args.overwrite)  # fail before the long run, not after
    spec = PairSpec(include_sink=args.include_sink, min_query=args.min_query, max_query=args.max_query)
    started = time.perf_counter()
    print(f"rope-leak: loading {args.model} ...", file=sys.stderr)
    model = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
    loaded = time.perf_counter()
    corpus = load_corpus(model, args.corpus, n_prompts=args.prompts, n_tokens=args.tokens, seed=args.seed)
    settings = {
        "model": args.model, "corpus": args.corpus, "prompts": args.prompts, "tokens": args.tokens,
        "seed": args.seed, "target": args.target, "pairs": spec.to_dict(), "dtype": args.dtype,
        "batch_size": args.batch_size,
    }
    analysis = analyze(model, corpus.tokens, target=args.target, spec=spec, batch_size=args.batch_size,
                       progress=not args.no_progress, metadata={"settings": settings})
    finished = time.perf_counter()
    provenance = {
        "model": dict(getattr(model, "rope_leak_source", {"name": args.model})),
        "corpus": corpus.to_dict(),
        "settings": settings,
    }
    run_info = {"seconds": finished - started, "load_seconds": loaded - started,
                "analysis_seconds": finished - loaded, "device": args.device,
                "threads": torch.get_num_threads()}
    out = save_analysis(analysis, args.out, provenance=provenance, run_info=run_info,
                        overwrite=args.overwrite)
    s = analysis.summary()
    ci = lambda key: f"[{s[key + '_ci'][0]:.3f}, {s[key + '_ci'][1]:.3f}]"  # noqa: E731
    print(f"composition (mask share) = {s['composition']:.3f} {ci('composition')}; "
          f"mean L_total = {s['L_total']:.4f} {ci('L_total')}, L_resid = {s['L_resid']:.4f} "
          f"{ci('L_resid')}, L_mask = {s['L_mask']:.4f} {ci('L_mask')} (debiased, "
          f"{s['ci_level']:.0%} CIs); top heads: {', '.join(s['top_heads'])}")
    print(f"wrote {out}/report.html in {finished - started:.0f} s")
    return 0


def run_sinks(args: argparse.Namespace) -> int:
    from rope_leak.corpus import load_corpus
    from rope_leak.models import load_model
    from rope_leak.sink_analysis import analyze_sinks, save_sinks

    out = args.out
    started = time.perf_counter()
    print(f"rope-leak: loading {args.model} ...", file=sys.stderr)
    model = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
    source = args.corpus
    if args.documents is not None:
        if args.corpus != "wikipedia":
            raise ValueError("--documents works with --corpus wikipedia only. Fix: drop --documents.")
        from rope_leak.corpus.wikipedia import wikipedia_documents

        documents = sorted(wikipedia_documents(), key=lambda d: len(d.text))
        source = documents[-args.documents:]
    corpus = load_corpus(model, source, n_prompts=args.prompts, n_tokens=args.tokens, seed=args.seed)
    result = analyze_sinks(
        model, corpus.tokens, doc_ids=corpus.doc_ids, sink_threshold=args.sink_threshold,
        reading_threshold=args.reading_threshold, source_token_id=args.source_token,
        reading_prompts=args.reading_prompts, early_queries=args.early_queries, bos=not args.no_bos,
        probe=not args.no_probe, n_boot=args.bootstrap, n_permutations=args.permutations,
        batch_size=args.batch_size, progress=not args.no_progress,
    )
    provenance = {"model": dict(getattr(model, "rope_leak_source", {"name": args.model})),
                  "corpus": corpus.to_dict(),
                  "settings": {k: v for k, v in vars(args).items() if k != "func"}}
    save_sinks(result, out, provenance=provenance, overwrite=args.overwrite)
    summary = result.summary()
    print(f"sink heads (> {args.sink_threshold}): {len(summary['sink_heads'])}; sink-reading heads "
          f"(> {args.reading_threshold}): {len(summary['sink_reading']['sink_reading_heads'])}; "
          f"max within-token std of the position-0 trajectory: "
          f"{summary['trajectory']['max_within_token_deviation']:.3g}")
    table = result.bos_table()
    if table is not None:
        for row in table.to_dict(orient="records")[1:]:
            print(f"  {row['replacement']:>12}: L_resid removed {row['resid_removed_fraction']:+.3f} "
                  f"[{row.get('resid_removed_fraction_low', float('nan')):+.3f}, "
                  f"{row.get('resid_removed_fraction_high', float('nan')):+.3f}], "
                  f"leakage {row['leakage_relative']:.3f}")
    print(f"wrote {out}/sinks.json in {time.perf_counter() - started:.0f} s")
    return 0


COMMANDS = {"analyze": run_analyze, "sinks": run_sinks}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("rope-leak: interrupted; nothing was written for the unfinished run.", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError) as err:
        print(f"rope-leak: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
