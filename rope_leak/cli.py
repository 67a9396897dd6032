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

import torch

from rope_leak.engine.pairs import PairSpec

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
_nonnegative_float = _number(float, 0, "a number")


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
    analyze.add_argument("--save-statistics", action="store_true",
                         help="also write statistics.npz, the run's sufficient statistics (O(n) "
                              "per head and prompt bucket), to merge or refit later")
    analyze.add_argument("--cell-maps", action="store_true",
                         help="also keep per-cell sums (O(n^2) per head): the cell-mean ceiling "
                              "M_cell in heads.csv, the permutation null and per-cell maps")
    analyze.add_argument("--no-sinks", action="store_true",
                         help="skip the sink analysis (sink reading, position-0 trajectories, "
                              "fingerprint probe, BOS interventions) and its report sections")
    analyze.add_argument("--sink-prompts", type=_positive_int, default=16,
                         help="prompts used by the sink analysis, the first of the corpus (default 16)")
    analyze.add_argument("--reading-prompts", type=_positive_int, default=4,
                         help="prompts used for sink reading, which reruns every layer (default 4)")
    analyze.add_argument("--bos-prompts", type=_positive_int, default=16,
                         help="prompts used by the BOS interventions, the first of the corpus; they run "
                              "only the first 32 tokens (default 16; each 16 more cost about 8%% of the "
                              "main pass at 64 x 256)")
    compare = sub.add_parser(
        "compare",
        help="compare models: L_total, L_mask, L_resid, composition, sink heads, depth slope (with CIs)",
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
    sinks = sub.add_parser("sinks", help="sink heads, position-0 trajectory, sink-reading heads, "
                           "fingerprint probe, BOS interventions")
    sinks.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"zoo name, HF folder, .gguf file or TransformerLens name (default {DEFAULT_MODEL})")
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
    _add_scale_arguments(analyze)
    _add_merge_parser(sub)
    return parser


def run_analyze(args: argparse.Namespace) -> int:
    from rope_leak.analysis import analyze
    from rope_leak.corpus import load_corpus
    from rope_leak.models import load_model
    from rope_leak.results import RESULT_FILES, check_output_dir, save_analysis
    from rope_leak.scale import CHECKPOINT_FILE, check_shard_output, parse_shard
    from rope_leak.sink_analysis import SINK_FILES

    shard = parse_shard(getattr(args, "shard", None))
    if shard is None:
        # Fail before the long run, not after.
        check_output_dir(args.out, args.overwrite, RESULT_FILES + (() if args.no_sinks else SINK_FILES))
    else:
        check_shard_output(args.out, args.overwrite)
    checkpoint = _checkpoint_path(args, CHECKPOINT_FILE)
    spec = PairSpec(include_sink=args.include_sink, min_query=args.min_query, max_query=args.max_query)
    started = time.perf_counter()
    print(f"rope-leak: loading {args.model} ...", file=sys.stderr)
    # the default context cap is 2048 tokens; longer prompts raise it explicitly
    model = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype],
                       n_ctx=args.tokens if args.tokens > 2048 else None)
    loaded = time.perf_counter()
    corpus = load_corpus(model, args.corpus, n_prompts=args.prompts, n_tokens=args.tokens, seed=args.seed)
    settings = {
        "model": args.model, "corpus": args.corpus, "prompts": args.prompts, "tokens": args.tokens,
        "seed": args.seed, "target": args.target, "pairs": spec.to_dict(), "dtype": args.dtype,
        "batch_size": args.batch_size, "no_sinks": args.no_sinks, "sink_prompts": args.sink_prompts,
        "bos_prompts": args.bos_prompts, "reading_prompts": args.reading_prompts,
        "save_statistics": args.save_statistics, "cell_maps": args.cell_maps,
    }
    provenance = {
        "model": dict(getattr(model, "rope_leak_source", {"name": args.model})),
        "corpus": corpus.to_dict(),
        "settings": settings,
    }
    resume = _resume_options(args, checkpoint)
    if shard is not None:
        return _run_shard(args, model, corpus, spec, settings, provenance, shard, resume)
    analysis = analyze(model, corpus.tokens, target=args.target, spec=spec, batch_size=args.batch_size,
                       progress=not args.no_progress, metadata={"settings": settings},
                       cell_maps=args.cell_maps, **resume)
    sinks, sections = None, ()
    main_done = time.perf_counter()
    if not args.no_sinks:
        from rope_leak.plots_sinks import sections_html
        from rope_leak.sink_analysis import analyze_sinks

        count = min(args.sink_prompts, len(corpus.tokens))
        print(f"rope-leak: sink analysis on {count} prompts ...", file=sys.stderr)
        # Sink scores and position-0 profiles come from the main pass (all prompts).
        sinks = analyze_sinks(model, corpus.tokens[:count], doc_ids=corpus.doc_ids[:count],
                              statistics=analysis.statistics, bos_status=analysis.bos,
                              bos_tokens=corpus.tokens[:args.bos_prompts],
                              reading_prompts=args.reading_prompts,
                              batch_size=args.batch_size, progress=not args.no_progress)
        sections = (sections_html(sinks, include_plotlyjs=False),)
    finished = time.perf_counter()
    run_info = {"seconds": finished - started, "load_seconds": loaded - started,
                "analysis_seconds": finished - loaded, "main_analysis_seconds": main_done - loaded,
                "sink_analysis_seconds": finished - main_done, "device": args.device,
                "threads": torch.get_num_threads()}
    out = save_analysis(analysis, args.out, provenance=provenance, run_info=run_info,
                        overwrite=args.overwrite, extra_sections=sections,
                        statistics=args.save_statistics)
    if sinks is not None:
        from rope_leak.sink_analysis import save_sinks

        save_sinks(sinks, out, provenance=provenance, overwrite=True)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # the results are written: nothing to resume
    s = analysis.summary()
    ci = lambda key: f"[{s[key + '_ci'][0]:.3f}, {s[key + '_ci'][1]:.3f}]"  # noqa: E731
    print(f"composition (mask share) = {s['composition']:.3f} {ci('composition')}; "
          f"mean L_total = {s['L_total']:.4f} {ci('L_total')}, L_resid = {s['L_resid']:.4f} "
          f"{ci('L_resid')}, L_mask = {s['L_mask']:.4f} {ci('L_mask')} (debiased, "
          f"{s['ci_level']:.0%} CIs); top heads: {', '.join(s['top_heads'])}")
    _print_bos(s["bos"])
    print(f"wrote {out}/report.html in {finished - started:.0f} s")
    return 0


def _print_bos(status: dict) -> None:
    from rope_leak.metrics.bos_status import bos_label, spread_text

    print(f"BOS: {bos_label(status)}. {status.get('implication', '')}")
    print(spread_text(status))


def run_compare(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rope_leak.analysis_arch import compare_models, parse_model_spec
    from rope_leak.cache import atomic_write_text
    from rope_leak.corpus import load_corpus
    from rope_leak.models import load_model
    from rope_leak.plots_arch import comparison_html

    for model_spec in args.models:
        parse_model_spec(model_spec)  # fail on a bad spec before any loading
    out = Path(args.out)
    files = ("comparison.csv", "comparison_layers.csv", "comparison.json", "comparison.html")
    if out.exists() and not args.overwrite and any((out / f).exists() for f in files):
        raise FileExistsError(f"{out} already holds comparison results. Fix: pass --overwrite "
                              "or choose another --out.")
    if args.n_boot < 0:
        raise ValueError(f"--n-boot must be >= 0, got {args.n_boot}.")
    spec = PairSpec(include_sink=args.include_sink, min_query=args.min_query, max_query=args.max_query)
    settings = {
        "models": list(args.models), "corpus": args.corpus, "prompts": args.prompts,
        "tokens": args.tokens, "seed": args.seed, "target": args.target, "pairs": spec.to_dict(),
        "dtype": args.dtype, "n_boot": args.n_boot, "batch_size": args.batch_size,
    }
    corpora: dict[str, dict] = {}

    def load(name: str):
        return load_model(name, device=args.device, dtype=DTYPES[args.dtype])

    def tokens_for(model):
        corpus = load_corpus(model, args.corpus, n_prompts=args.prompts, n_tokens=args.tokens,
                             seed=args.seed)
        corpora[str(model.cfg.model_name)] = corpus.to_dict()
        return corpus.tokens

    started = time.perf_counter()
    table, layers, info = compare_models(
        args.models, load=load, tokens_for=tokens_for, target=args.target, spec=spec,
        batch_size=args.batch_size, n_boot=args.n_boot, seed=args.seed,
        progress=not args.no_progress, log=lambda msg: print(f"rope-leak: {msg}", file=sys.stderr),
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.csv", table.to_csv(index=False))
    atomic_write_text(out / "comparison_layers.csv", layers.to_csv(index=False))
    payload = {"settings": settings, "models": table.to_dict(orient="records"), "details": info,
               "corpora": corpora,
               "ci": "95% percentile intervals over a bootstrap of prompt buckets within "
                     "cross-fitting folds; depth_slope_*_ci_*: t interval of the linregress slope "
                     "over layers, depth_slope_*_boot_*: bootstrap interval",
               "seconds": time.perf_counter() - started}
    atomic_write_text(out / "comparison.json",
                      json.dumps(_clean(payload), indent=2, sort_keys=True, allow_nan=False))
    atomic_write_text(out / "comparison.html", comparison_html(table, layers, settings))
    shown = table.assign(sink_heads=[f"{k} / {n}" for k, n in zip(table["sink_heads"], table["n_heads_total"])],
                         sink_heads_gu=[f"{k} / {n}" for k, n in zip(table["sink_heads_gu"], table["n_heads_total"])])
    cols = ["model", "bos", "n_ctx", "window", "L_total", "L_mask", "L_resid", "composition",
            "sink_heads", "sink_heads_gu", "depth_slope_L_resid"]
    print(shown[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if "L_resid_local_minus_global" in table:
        kind_rows = table[table["L_resid_local_minus_global"].notna()]

        def ci(r, name: str) -> str:
            return f"{r[name]:.4f} [{r[name + '_ci_low']:.4f}, {r[name + '_ci_high']:.4f}]"

        for _, r in kind_rows.iterrows():
            print(f"{r['model']}: L_resid over {int(r['n_local_layers'])} sliding-window layers {ci(r, 'L_resid_local')}, "
                  f"over {int(r['n_global_layers'])} global layers {ci(r, 'L_resid_global')}, "
                  f"difference {ci(r, 'L_resid_local_minus_global')}")
    print("sink_heads: rope_leak sink score (mean over i >= 1 of A[i,0]) > 0.3; sink_heads_gu: Gu et al. "
          "(ICLR 2025) alpha_0 > 0.3; both out of all heads")
    print(f"wrote {out}/comparison.html in {time.perf_counter() - started:.0f} s")
    return 0


def _clean(value):
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    import math

    import numpy as np

    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


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
        bos_bidirectional=args.bos_bidirectional,
        probe=not args.no_probe, n_boot=args.bootstrap, n_permutations=args.permutations,
        batch_size=args.batch_size, progress=not args.no_progress,
    )
    provenance = {"model": dict(getattr(model, "rope_leak_source", {"name": args.model})),
                  "corpus": corpus.to_dict(),
                  "settings": {k: v for k, v in vars(args).items() if k != "func"}}
    save_sinks(result, out, provenance=provenance, overwrite=args.overwrite)
    summary = result.summary()
    gu = summary["sink_metrics"]["gu_et_al_2025"]
    n_heads = gu["n_heads"]
    print(f"sink heads: {len(gu['sink_heads'])} of {n_heads} by Gu et al.'s alpha_0 > {gu['epsilon']} "
          f"(sink ratio {gu['sink_ratio']:.3f}); {len(summary['sink_heads'])} of {n_heads} by rope_leak's "
          f"score (mean over i >= 1 of A[i,0]) > {args.sink_threshold}; sink-reading heads "
          f"(> {args.reading_threshold}): {len(summary['sink_reading']['sink_reading_heads'])}")
    _print_bos(summary["bos_status"])
    check = summary["trajectory"]["max_within_token_deviation"]
    print("closed-system check (causal; each trajectory token put on 2 prompts): max deviation between "
          f"prompts sharing a token {'not estimable' if check is None else f'{check:.3g}'}")
    print(f"fingerprint probe: {'run' if summary['probe_status']['run'] else summary['probe_status']['reason']}")
    table = result.bos_table()
    if table is not None:
        fmt = lambda v: "not estimable" if v is None or v != v else f"{v:.3f}"  # noqa: E731
        for row in table.to_dict(orient="records")[1:]:
            print(f"  {row['replacement']:>6}: scores' absolute-position SS x {fmt(row.get('scores_ss_relative'))} "
                  f"[{fmt(row.get('scores_ss_relative_low'))}, {fmt(row.get('scores_ss_relative_high'))}], "
                  f"L_total x {fmt(row.get('leakage_relative'))} of baseline")
    print(f"wrote {out}/sinks.json in {time.perf_counter() - started:.0f} s")
    return 0


# --------------------------------------------------------------------------------------
# Scale out and resume: `analyze --shard k/N`, checkpoints, `merge` (rope_leak.scale)
# --------------------------------------------------------------------------------------
def _add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale out and resume")
    group.add_argument("--shard", default=None, metavar="k/N",
                       help="run only shard k of N (contiguous whole batches, global prompt "
                            "indices) and write its statistics.npz + shard.json, no report; "
                            "combine the shards with `rope-leak merge`")
    group.add_argument("--checkpoint-minutes", type=_nonnegative_float, default=10.0,
                       help="save resumable statistics to --out/checkpoint.npz at most this often "
                            "(default 10; 0 = only with --checkpoint-every). Rerun the same "
                            "command after an interruption to resume.")
    group.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                       help="also checkpoint after every K batches (default 0: off)")


def _checkpoint_path(args: argparse.Namespace, name: str):
    from pathlib import Path

    if getattr(args, "checkpoint_minutes", 0) or getattr(args, "checkpoint_every", 0):
        return Path(args.out) / name
    return None


def _resume_options(args: argparse.Namespace, checkpoint) -> dict:
    if checkpoint is None:
        return {}
    if checkpoint.exists():
        print(f"rope-leak: resuming from {checkpoint}", file=sys.stderr)
    return {"checkpoint": checkpoint, "checkpoint_every": getattr(args, "checkpoint_every", 0),
            "checkpoint_seconds": 60.0 * getattr(args, "checkpoint_minutes", 0.0)}


def _run_shard(args, model, corpus, spec, settings, provenance, shard, resume) -> int:
    from rope_leak.analysis import model_fingerprint, tokens_sha256
    from rope_leak.engine.run import default_buckets, run_statistics
    from rope_leak.scale import shard_prompts, write_shard

    prompts = shard_prompts(len(corpus.tokens), args.batch_size, shard)
    started = time.perf_counter()
    # What `analyze` records of a whole run, so that the merged results.json is the same.
    from rope_leak.metrics.bos_status import bos_status

    inputs = {"model": model_fingerprint(model), "tokens_sha256": tokens_sha256(corpus.tokens),
              "batch_size": args.batch_size, "on_missing_bos": "error", "prompt_ids": None,
              # of the whole corpus (a short causal prefix pass), so the merge reports it
              "bos": bos_status(model, corpus.tokens, batch_size=max(args.batch_size, 64))}
    stats = run_statistics(model, corpus.tokens[prompts.start:prompts.stop], spec=spec,
                           batch_size=args.batch_size, prompt_ids=prompts,
                           n_buckets=default_buckets(len(corpus.tokens)),  # as the whole run's
                           cell_maps=args.cell_maps,
                           progress=not args.no_progress,
                           metadata={"settings": settings, "inputs": inputs}, **resume)
    out = write_shard(stats, args.out, shard=shard, n_prompts=len(corpus.tokens), provenance=provenance)
    if resume:
        resume["checkpoint"].unlink(missing_ok=True)
    print(f"wrote shard {shard[0]}/{shard[1]} (prompts {prompts.start}..{prompts.stop - 1}) to {out} "
          f"in {time.perf_counter() - started:.0f} s; combine with `rope-leak merge`")
    return 0


def _add_merge_parser(sub) -> None:
    merge = sub.add_parser("merge", help="combine `analyze --shard` outputs into the full results")
    merge.add_argument("shards", nargs="+", metavar="SHARD_DIR", help="--out folders of the shards")
    merge.add_argument("--out", required=True, help="output folder for the merged results")
    merge.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    merge.add_argument("--no-report", action="store_true", help="skip report.html")


def run_merge(args: argparse.Namespace) -> int:
    from rope_leak.analysis import Analysis
    from rope_leak.results import check_output_dir, save_analysis
    from rope_leak.scale import load_shards

    check_output_dir(args.out, args.overwrite)
    started = time.perf_counter()
    stats, provenance = load_shards(args.shards)
    inputs = stats.metadata.pop("inputs", {})
    analysis = Analysis(stats, target=provenance["settings"]["target"], inputs=inputs,
                        bos=inputs.pop("bos", None))
    run_info = {"merged_shards": [str(s) for s in args.shards],
                "merge_seconds": time.perf_counter() - started}
    out = save_analysis(analysis, args.out, provenance=provenance, run_info=run_info,
                        overwrite=args.overwrite, report=not args.no_report)
    print(f"merged {len(args.shards)} shards ({analysis.n_prompts} prompts) into {out}")
    return 0


COMMANDS = {"analyze": run_analyze, "compare": run_compare, "sinks": run_sinks, "merge": run_merge}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from rope_leak.engine.allocator import tune_allocator

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
