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
    _add_scale_arguments(analyze)
    _add_merge_parser(sub)
    return parser


def run_analyze(args: argparse.Namespace) -> int:
    from rope_leak.analysis import analyze
    from rope_leak.corpus import load_corpus
    from rope_leak.models import load_model
    from rope_leak.results import check_output_dir, save_analysis
    from rope_leak.scale import CHECKPOINT_FILE, check_shard_output, parse_shard

    shard = parse_shard(getattr(args, "shard", None))
    if shard is None:
        check_output_dir(args.out, args.overwrite)  # fail before the long run, not after
    else:
        check_shard_output(args.out, args.overwrite)
    checkpoint = _checkpoint_path(args, CHECKPOINT_FILE)
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
    provenance = {
        "model": dict(getattr(model, "rope_leak_source", {"name": args.model})),
        "corpus": corpus.to_dict(),
        "settings": settings,
    }
    resume = _resume_options(args, checkpoint)
    if shard is not None:
        return _run_shard(args, model, corpus, spec, settings, provenance, shard, resume)
    analysis = analyze(model, corpus.tokens, target=args.target, spec=spec, batch_size=args.batch_size,
                       progress=not args.no_progress, metadata={"settings": settings}, **resume)
    finished = time.perf_counter()
    run_info = {"seconds": finished - started, "load_seconds": loaded - started,
                "analysis_seconds": finished - loaded, "device": args.device,
                "threads": torch.get_num_threads()}
    out = save_analysis(analysis, args.out, provenance=provenance, run_info=run_info,
                        overwrite=args.overwrite)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # the results are written: nothing to resume
    s = analysis.summary()
    print(f"composition (mask share) = {s['composition']:.3f}; mean L_total = {s['L_total']:.4f}, "
          f"L_resid = {s['L_resid']:.4f}, L_mask = {s['L_mask']:.4f}; top heads: "
          f"{', '.join(s['top_heads'])}")
    print(f"wrote {out}/report.html in {finished - started:.0f} s")
    return 0


# --------------------------------------------------------------------------------------
# Scale out and resume: `analyze --shard k/N`, checkpoints, `merge` (rope_leak.scale)
# --------------------------------------------------------------------------------------
def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


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
    from rope_leak.engine.run import run_statistics
    from rope_leak.scale import shard_prompts, write_shard

    prompts = shard_prompts(len(corpus.tokens), args.batch_size, shard)
    started = time.perf_counter()
    stats = run_statistics(model, corpus.tokens[prompts.start:prompts.stop], spec=spec,
                           batch_size=args.batch_size, prompt_ids=prompts,
                           progress=not args.no_progress, metadata={"settings": settings}, **resume)
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
    analysis = Analysis(stats, target=provenance["settings"]["target"])
    run_info = {"merged_shards": [str(s) for s in args.shards],
                "merge_seconds": time.perf_counter() - started}
    out = save_analysis(analysis, args.out, provenance=provenance, run_info=run_info,
                        overwrite=args.overwrite, report=not args.no_report)
    print(f"merged {len(args.shards)} shards ({analysis.n_prompts} prompts) into {out}")
    return 0


COMMANDS = {"analyze": run_analyze}
COMMANDS["merge"] = run_merge


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
