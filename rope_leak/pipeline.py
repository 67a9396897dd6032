"""The whole run in one call, from a notebook or a script: what ``rope-leak analyze``,
``merge``, ``sinks`` and ``compare`` do, with the command line reduced to parsing
arguments and printing.

``run(model, corpus, out)`` loads the model and the corpus (or takes them as given),
runs the main analysis (checkpointed into ``out`` and resumed from there; one shard
with ``shard=(k, N)``), the sink analysis unless ``sinks=False``, and writes the result
files into ``out`` (each file atomically; the main results as one set, ``results.json``
last). Without ``out`` nothing is written and the results stay in memory::

    import rope_leak as rl
    result = rl.run("smollm2-135m", "wikipedia", "out/", prompts=64, tokens=256)
    result.analysis.head("L3H1")
    result.sinks.heads()
    result.files           # ['bos_interventions.csv', 'heads.csv', ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from rope_leak.analyses.analysis import Analysis, analyze, model_fingerprint, tokens_sha256
from rope_leak.analyses.architectures import compare_models, parse_model_spec
from rope_leak.analyses.bos_status import bos_status
from rope_leak.analyses.effects import LossEffects, loss_effects
from rope_leak.analyses.sinks import SinkAnalysis, analyze_sinks
from rope_leak.backends import load_model
from rope_leak.backends.loading import DEFAULT_MAX_N_CTX
from rope_leak.corpus import Corpus, load_corpus
from rope_leak.corpus.wikipedia import wikipedia_documents
from rope_leak.display import Displayable
from rope_leak.download_cache import atomic_write_text
from rope_leak.engine.pairs import PairSpec
from rope_leak.engine.run import run_statistics
from rope_leak.engine.start_cut import DEFAULT_WINDOW
from rope_leak.engine.statistics import RunStatistics, default_buckets
from rope_leak.output.results import (
    RESULT_FILES,
    SINK_FILES,
    check_output_dir,
    save_analysis,
    save_sinks,
    to_jsonable,
)
from rope_leak.output.shards import (
    CHECKPOINT_FILE,
    check_shard_output,
    load_shards,
    parse_shard,
    shard_prompts,
    write_shard,
)
from rope_leak.quantities import column
from rope_leak.run_config import RunConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPARE_FILES = ("comparison.csv", "comparison_layers.csv", "comparison.json", "comparison.html")

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    """The command line's log: ``rope-leak: message`` on stderr."""
    print(f"rope-leak: {message}", file=sys.stderr)


def _quiet(_message: str) -> None:
    pass


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}. Fix: pass one of them.")
    return name


def _is_model(model) -> bool:
    return isinstance(model, HookedTransformer)


def _model(model, *, device: str, dtype: str, n_tokens: int | None, log: Log):
    """``(model, name)``: a loaded HookedTransformer is used as is, a name or path is loaded."""
    if _is_model(model):
        return model, str(getattr(model, "rope_leak_source", {}).get("name") or model.cfg.model_name)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a HookedTransformer, a model name or a path, got "
                        f"{type(model).__name__}. Fix: pass e.g. 'smollm2-135m' or rl.load_model(...).")
    log(f"loading {model} ...")
    # the default context cap is 2048 tokens; longer prompts raise it explicitly
    long = n_tokens is not None and n_tokens > DEFAULT_MAX_N_CTX
    return load_model(model, device=device, dtype=DTYPES[dtype], n_ctx=n_tokens if long else None), str(model)


def _corpus(model, corpus, *, prompts: int, tokens: int, seed: int):
    """``(corpus, name)``: a Corpus is used as is, a source (``"wikipedia"``, a path, a list
    of documents) is cut into ``prompts`` x ``tokens`` chunks for ``model``."""
    if isinstance(corpus, Corpus):
        return corpus, str(corpus.source)
    if isinstance(corpus, torch.Tensor):
        raise TypeError("run takes a corpus source or a rope_leak.Corpus, not a token tensor (the "
                        "sink analysis and the provenance need the documents). Fix: pass "
                        "rl.load_corpus(...), or call rl.analyze(model, tokens) for a bare tensor.")
    loaded = load_corpus(model, corpus, n_prompts=prompts, n_tokens=tokens, seed=seed)
    return loaded, str(corpus) if isinstance(corpus, (str, os.PathLike)) else str(loaded.source)


def _provenance(model, model_name: str, corpus: Corpus, settings: dict) -> dict:
    """Where the model and the corpus came from, and the run's settings."""
    return {
        "model": dict(getattr(model, "rope_leak_source", {"name": model_name})),
        "corpus": corpus.to_dict(),
        "settings": settings,
    }


def _files(out: Path | None, names: Iterable[str]) -> list[str]:
    return [] if out is None else sorted(n for n in set(names) if (out / n).exists())


@dataclass(repr=False)
class RunResult(Displayable):
    """What :func:`run` (or :func:`merge`) produced.

    ``analysis``: the main :class:`rope_leak.Analysis` (None for a shard, which holds
    only ``statistics``); ``sinks``: the :class:`~rope_leak.analyses.sinks.SinkAnalysis`
    or None; ``out`` and ``files``: the output folder and the names written there (empty
    without ``out``); ``model`` and ``corpus`` as used (None after a merge);
    ``run_info``: timings; ``shard``: ``(k, N)`` for a shard run."""

    analysis: Analysis | None = None
    sinks: SinkAnalysis | None = None
    out: Path | None = None
    files: list[str] = field(default_factory=list)
    model: HookedTransformer | None = None
    corpus: Corpus | None = None
    run_info: dict = field(default_factory=dict)
    shard: tuple[int, int] | None = None
    statistics: RunStatistics | None = None
    provenance: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The main analysis' :meth:`~rope_leak.Analysis.summary` (None for a shard)."""
        return None if self.analysis is None else self.analysis.summary()

    def _display_items(self):
        items: list[tuple[str, Any]] = []
        settings = self.provenance.get("settings", {})
        if settings.get("model"):
            items.append(("model", settings["model"]))
        if self.analysis is not None:
            a = self.analysis
            items.append(("analysis", f"{a.n_layers} layers x {a.n_heads} heads, {a.n_prompts} prompts"))
            items.append(("composition_crossfit", round(a.decomposition().composition(), 4)))
        if self.shard is not None:
            items.append(("shard", f"{self.shard[0]}/{self.shard[1]}"))
        if self.sinks is not None:
            items.append(("sink_heads", len(self.sinks.sink_heads())))
        elif self.shard is None:
            items.append(("sinks", "not run"))
        items.append(("out", None if self.out is None else str(self.out)))
        items.append(("files", len(self.files)))
        if "seconds" in self.run_info:
            items.append(("seconds", round(self.run_info["seconds"], 1)))
        return items


def run(
    model,
    corpus="wikipedia",
    out: str | os.PathLike | None = None,
    config: RunConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Log | None = None,
    **options,
) -> RunResult:
    """Everything ``rope-leak analyze`` does, from Python.

    Args:
        model: a zoo name (``"smollm2-135m"``), a Hugging Face folder, a ``.gguf`` file or a
            TransformerLens name (loaded on ``config.device`` in ``config.dtype``), or a
            loaded HookedTransformer (used as is; device and dtype are then its own).
        corpus: ``"wikipedia"``, a ``.txt`` / ``.jsonl`` file or folder, a list of
            documents (cut into ``prompts`` x ``tokens`` chunks with ``seed``), or a
            :class:`rope_leak.Corpus` (used as is).
        out: output folder; None keeps everything in memory (no checkpoints either).
        config: a :class:`~rope_leak.run_config.RunConfig` (default: its defaults), every
            option of the run; ``options``: overrides of its fields, e.g. ``prompts=16``,
            ``window=16`` or ``pairs=PairSpec(max_query=32)``.
        overwrite: replace results already in ``out`` (otherwise refused before loading).
        progress: progress bars of every long step; ``log``: a callable for status lines
            (default: none).

    The sink analysis runs on the first ``sink_prompts`` prompts (BOS interventions on the
    first ``bos_prompts``, sink reading on ``reading_prompts``); ``shard="k/N"`` runs only
    shard ``k`` of ``N`` and writes its statistics and ``shard.json`` (combine them with
    :func:`merge`); checkpoints go to ``out/checkpoint.npz`` and a rerun resumes from them.

    Returns:
        a :class:`RunResult`. Results written by the command line and by this function
        with the same arguments are byte-identical (``results.json``; timings are in
        ``run_info.json``).
    """
    config = (config or RunConfig()).replace(**options)
    log = log or _quiet
    device, dtype = config.device, _dtype_name(config.dtype)
    shard, out = _checked_output(config, out, overwrite)
    started = time.perf_counter()
    if _is_model(model):  # used as is: record its own device and dtype
        device, dtype = str(model.cfg.device), _dtype_name(model.cfg.dtype)
    n_tokens = getattr(corpus, "n_tokens", config.tokens)  # a Corpus brings its own length
    model, model_name = _model(model, device=device, dtype=dtype, n_tokens=n_tokens, log=log)
    loaded = time.perf_counter()
    corpus, corpus_name = _corpus(model, corpus, prompts=config.prompts, tokens=config.tokens,
                                  seed=config.seed)
    # what the run was given, with what the corpus and the model made of it
    settings = {"model": model_name, "corpus": corpus_name,
                **config.replace(prompts=corpus.n_prompts, tokens=corpus.n_tokens, seed=corpus.seed,
                                 device=device, dtype=dtype).settings()}
    settings.pop("device")  # where it ran is in run_info.json: the numbers do not depend on it
    provenance = _provenance(model, model_name, corpus, settings)
    resume = _resume_options(config, out, log)
    if shard is not None:
        stats = _run_shard(model, corpus, out, config.pairs, config.window, config.batch_size,
                           config.cell_maps, progress, settings, provenance, shard, resume, config.force)
        return RunResult(out=out, files=_files(out, ("statistics.npz", "shard.json")), model=model,
                         corpus=corpus, run_info={"seconds": time.perf_counter() - started},
                         shard=shard, statistics=stats, provenance=provenance)
    analysis = analyze(model, corpus.tokens, target=config.target, spec=config.pairs, window=config.window,
                       batch_size=config.batch_size, progress=progress, metadata={"settings": settings},
                       cell_maps=config.cell_maps, force=config.force, **resume)
    main_done = time.perf_counter()
    sink_result, sections = (_sink_step(model, corpus, analysis, config, progress=progress, log=log,
                                        report=out is not None)
                             if config.sinks else (None, ()))
    finished = time.perf_counter()
    run_info = {"seconds": finished - started, "load_seconds": loaded - started,
                "analysis_seconds": finished - loaded, "main_analysis_seconds": main_done - loaded,
                "sink_analysis_seconds": finished - main_done, "device": device,
                "threads": torch.get_num_threads()}
    if out is not None:
        _save_run(analysis, sink_result, out, provenance=provenance, run_info=run_info,
                  overwrite=overwrite, sections=sections, statistics=config.save_statistics)
    return RunResult(analysis=analysis, sinks=sink_result, out=out,
                     files=_files(out, (*RESULT_FILES, "run_info.json", *SINK_FILES)), model=model,
                     corpus=corpus, run_info=run_info, provenance=provenance)


def _checked_output(config: RunConfig, out: str | os.PathLike | None,
                    overwrite: bool) -> tuple[tuple[int, int] | None, Path | None]:
    """``(shard, out)``: the shard as ``(k, N)`` (None: the whole run) and the output
    folder, refused before the long run when it already holds results."""
    shard = config.shard
    if isinstance(shard, str):
        shard = parse_shard(shard)
    if shard is not None:
        shard = parse_shard(f"{shard[0]}/{shard[1]}")  # one check of the range
        if out is None:
            raise ValueError("a shard writes its statistics into a folder. Fix: pass out=... "
                             "(each shard its own folder).")
    if out is not None:
        out = Path(out)
        # Fail before the long run, not after.
        if shard is None:
            check_output_dir(out, overwrite, RESULT_FILES + (SINK_FILES if config.sinks else ()))
        else:
            check_shard_output(out, overwrite)
    return shard, out


def _resume_options(config: RunConfig, out: Path | None, log: Log) -> dict:
    """The checkpoint keywords of :func:`~rope_leak.engine.run.run_statistics` (none without
    ``out`` or with checkpoints off)."""
    if out is None or not (config.checkpoint_minutes or config.checkpoint_every):
        return {}
    checkpoint = out / CHECKPOINT_FILE
    if checkpoint.exists():
        log(f"resuming from {checkpoint}")
    return {"checkpoint": checkpoint, "checkpoint_every": config.checkpoint_every,
            "checkpoint_seconds": 60.0 * config.checkpoint_minutes}


def _sink_step(model: HookedTransformer, corpus: Corpus, analysis: Analysis, config: RunConfig, *,
               progress: bool, log: Log, report: bool) -> tuple[SinkAnalysis, tuple[str, ...]]:
    """The sink analysis of a run on its first ``sink_prompts`` prompts, and (``report``)
    its report sections."""
    count = min(config.sink_prompts, len(corpus.tokens))
    log(f"sink analysis on {count} prompts ...")
    # Sink scores and position-0 profiles come from the main pass (all prompts).
    sink_result = analyze_sinks(model, corpus.tokens[:count], doc_ids=corpus.doc_ids[:count],
                                statistics=analysis.statistics, bos_status=analysis.bos_status,
                                bos_tokens=corpus.tokens[:config.bos_prompts],
                                reading_prompts=config.reading_prompts,
                                batch_size=config.batch_size, progress=progress)
    if not report:
        return sink_result, ()
    # deferred: the report's figures import plotly (~1 s)
    from rope_leak.output.plots_sinks import sections_html

    return sink_result, (sections_html(sink_result, include_plotlyjs=False),)


def _save_run(analysis: Analysis, sink_result: SinkAnalysis | None, out: Path, *, provenance: dict,
              run_info: dict, overwrite: bool, sections: tuple[str, ...], statistics: bool) -> None:
    """Write a run's results and sink files into ``out`` in one commit, with the end of the
    checkpoint (a kill at any moment leaves the earlier folder or the new one, never half
    of each)."""
    save_analysis(analysis, out, provenance=provenance, run_info=run_info, overwrite=overwrite,
                  extra_sections=sections, statistics=statistics, sinks=sink_result,
                  extra_writer=None if sink_result is None else (
                      lambda folder: save_sinks(sink_result, folder, provenance=provenance, overwrite=True)),
                  replaces=(*SINK_FILES, CHECKPOINT_FILE))


def _run_shard(model, corpus, out, pairs, window, batch_size, cell_maps, progress, settings, provenance,
               shard, resume, force=False):
    prompts = shard_prompts(len(corpus.tokens), batch_size, shard)
    # What `analyze` records of a whole run, so that the merged results.json is the same.
    inputs = {"model": model_fingerprint(model), "tokens_sha256": tokens_sha256(corpus.tokens),
              "batch_size": batch_size, "on_missing_bos": "error", "prompt_ids": None,
              # of the whole corpus (a short causal prefix pass), so the merge reports it
              "bos_status": bos_status(model, corpus.tokens, batch_size=max(batch_size, 64))}
    stats = run_statistics(model, corpus.tokens[prompts.start:prompts.stop], spec=pairs,
                           batch_size=batch_size, prompt_ids=prompts,
                           n_buckets=default_buckets(len(corpus.tokens)),  # as the whole run's
                           cell_maps=cell_maps, progress=progress, start_cut_window=window, force=force,
                           metadata={"settings": settings, "inputs": inputs}, **resume)
    write_shard(stats, out, shard=shard, n_prompts=len(corpus.tokens), provenance=provenance,
                replaces=(CHECKPOINT_FILE,))  # the checkpoint goes in the same commit
    return stats


def shard_range(result: RunResult) -> range:
    """Global prompt indices a shard :class:`RunResult` covered."""
    batch_size = result.provenance["settings"]["batch_size"]
    return shard_prompts(result.corpus.n_prompts, batch_size, result.shard)


@dataclass(repr=False)
class EffectsRunResult(Displayable):
    """What :func:`run_effects` produced: the analysis the interventions were fitted on,
    the :class:`~rope_leak.analyses.effects.LossEffects` on the held-out prompts, the
    output folder and the files written there, and timings."""

    analysis: Analysis
    effects: LossEffects
    out: Path | None = None
    files: list[str] = field(default_factory=list)
    run_info: dict = field(default_factory=dict)

    def _display_items(self):
        return [("effects", repr(self.effects)), ("out", None if self.out is None else str(self.out)),
                ("seconds", round(self.run_info.get("seconds", float("nan")), 1))]


def run_effects(
    model="smollm2-135m",
    corpus="wikipedia",
    out: str | os.PathLike | None = None,
    *,
    prompts: int = 64,
    heldout: int = 16,
    tokens: int = 256,
    seed: int = 0,
    window: int = DEFAULT_WINDOW,
    heads=None,
    layers: bool = True,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    n_boot: int = 200,
    overwrite: bool = False,
    progress: bool = True,
    log: Log | None = None,
) -> EffectsRunResult:
    """What ``rope-leak effects`` does: fit the analysis on ``prompts`` chunks, then run
    both interventions of :mod:`rope_leak.analyses.effects` on ``heldout`` further chunks
    (disjoint from the fitted ones) for every layer and for ``heads`` (default: the top
    heads). Writes the analysis' result files plus ``effects.csv``, with an effects section
    in ``report.html``."""
    log = log or _quiet
    dtype = _dtype_name(dtype)
    if heldout < 2:
        raise ValueError(f"heldout={heldout}: effects need at least 2 held-out prompts. Fix: --heldout 16.")
    if out is not None:
        out = Path(out)
        check_output_dir(out, overwrite, RESULT_FILES + ("effects.csv",))
    started = time.perf_counter()
    model, model_name = _model(model, device=device, dtype=dtype, n_tokens=tokens, log=log)
    corpus, corpus_name = _corpus(model, corpus, prompts=prompts + heldout, tokens=tokens, seed=seed)
    if corpus.n_prompts < prompts + heldout:
        raise ValueError(f"the corpus gave {corpus.n_prompts} chunks, fewer than {prompts} + {heldout} held "
                         "out. Fix: lower --prompts or --heldout.")
    fit, held = corpus.tokens[:prompts], corpus.tokens[prompts:prompts + heldout]
    settings = {"model": model_name, "corpus": corpus_name, "prompts": prompts, "heldout": heldout,
                "tokens": corpus.n_tokens, "seed": corpus.seed, "window": window, "batch_size": batch_size,
                "dtype": dtype, "heads": None if heads is None else str(heads), "layers": layers}
    log(f"fitting on {prompts} prompts ...")
    analysis = analyze(model, fit, window=window, batch_size=batch_size, n_boot=n_boot, progress=progress,
                       metadata={"settings": settings})
    fitted = time.perf_counter()
    log(f"loss effects on {heldout} held-out prompts ...")
    effects = loss_effects(model, analysis, fit, held, heads=heads, layers=layers, batch_size=batch_size,
                           progress=progress)
    finished = time.perf_counter()
    run_info = {"seconds": finished - started, "fit_seconds": fitted - started,
                "effects_seconds": finished - fitted, "device": device, "threads": torch.get_num_threads(),
                "baseline_loss": effects.baseline_loss, "baseline_loss_early": effects.baseline_loss_early}
    if out is not None:
        # deferred: the report's figures import plotly (~1 s)
        from rope_leak.output.effects_report import effects_section_html

        section = effects_section_html(effects.table, baseline_loss=effects.baseline_loss,
                                       n_prompts=effects.n_prompts)
        provenance = _provenance(model, model_name, corpus, settings)
        save_analysis(analysis, out, provenance=provenance, run_info=run_info, overwrite=overwrite,
                      statistics=False, extra_sections=(section,),
                      extra_files={"effects.csv": effects.table.to_csv(index=False, float_format="%.17g")})
    return EffectsRunResult(analysis, effects, out, _files(out, (*RESULT_FILES, "run_info.json", "effects.csv")),
                            run_info)


def merge(shards: Sequence[str | os.PathLike], out: str | os.PathLike, *, overwrite: bool = False,
          report: bool = True) -> RunResult:
    """Combine the folders of finished shard runs (``run(..., shard=(k, N))``) into the full
    results in ``out``, as one run over the whole corpus would have written them."""
    check_output_dir(out, overwrite)
    started = time.perf_counter()
    stats, provenance = load_shards(shards)
    inputs = stats.metadata.pop("inputs", {})
    analysis = Analysis(stats, target=provenance["settings"]["target"], inputs=inputs,
                        bos_status=inputs.pop("bos_status", None))
    run_info = {"merged_shards": [str(s) for s in shards],
                "merge_seconds": time.perf_counter() - started}
    out = save_analysis(analysis, out, provenance=provenance, run_info=run_info,
                        overwrite=overwrite, report=report)
    return RunResult(analysis=analysis, out=out, files=_files(out, (*RESULT_FILES, "run_info.json")),
                     run_info=run_info, provenance=provenance)


def run_sinks(
    model,
    corpus="wikipedia",
    out: str | os.PathLike | None = None,
    *,
    prompts: int = 32,
    tokens: int = 256,
    seed: int = 0,
    documents: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    settings: dict | None = None,
    log: Log | None = None,
    **options,
) -> RunResult:
    """Everything ``rope-leak sinks`` does: the sink analysis alone
    (:func:`rope_leak.analyses.sinks.analyze_sinks`; ``options`` go there, e.g.
    ``reading_prompts``, ``run_bos_interventions=False``, ``progress=False``), written into ``out`` when given.

    ``documents``: draw the prompts from only this many documents of the Wikipedia
    sample (the longest), so the fingerprint probe can predict the document.
    ``settings``: what to record as the run's settings (default: these arguments)."""
    log = log or _quiet
    dtype = _dtype_name(dtype)
    if documents is not None:
        if corpus != "wikipedia":
            raise ValueError("documents= works with the 'wikipedia' corpus only. Fix: drop documents "
                             "(--documents), or pass corpus='wikipedia'.")
        corpus = sorted(wikipedia_documents(), key=lambda d: len(d.text))[-documents:]
    started = time.perf_counter()
    model, model_name = _model(model, device=device, dtype=dtype, n_tokens=None, log=log)
    corpus, _ = _corpus(model, corpus, prompts=prompts, tokens=tokens, seed=seed)
    result = analyze_sinks(model, corpus.tokens, doc_ids=corpus.doc_ids, **options)
    if settings is None:
        settings = {"model": model_name, "corpus": str(corpus.source), "prompts": corpus.n_prompts,
                    "tokens": corpus.n_tokens, "seed": corpus.seed, "documents": documents,
                    "dtype": dtype, **{k: v for k, v in options.items() if k != "progress"}}
    provenance = _provenance(model, model_name, corpus, settings)
    if out is not None:
        out = save_sinks(result, out, provenance=provenance, overwrite=overwrite)
    return RunResult(sinks=result, out=None if out is None else Path(out),
                     files=_files(None if out is None else Path(out), SINK_FILES), model=model,
                     corpus=corpus, run_info={"seconds": time.perf_counter() - started},
                     provenance=provenance)


@dataclass(repr=False)
class CompareResult(Displayable):
    """What :func:`compare` produced: ``table`` (one row per model spec), ``layers`` (one
    row per spec and layer), ``info`` (per spec: depth-slope fits, timings), and the
    output folder and files (empty without ``out``)."""

    table: pd.DataFrame
    layers: pd.DataFrame
    info: dict
    settings: dict
    out: Path | None = None
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def _display_items(self):
        items: list[tuple[str, Any]] = [("models", list(self.table["model"]))]
        for name in ("completed_mask_share", "composition"):
            if column(name) in self.table:
                items.append((column(name), [round(float(v), 3) for v in self.table[column(name)]]))
        items += [("out", None if self.out is None else str(self.out)), ("files", len(self.files))]
        return items


def compare(
    models: Sequence[str],
    corpus="wikipedia",
    out: str | os.PathLike | None = None,
    *,
    prompts: int = 64,
    tokens: int = 256,
    seed: int = 0,
    target: str = "pattern",
    pairs: PairSpec = PairSpec(),
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    n_boot: int = 200,
    overwrite: bool = False,
    progress: bool = True,
    log: Log | None = None,
) -> CompareResult:
    """Everything ``rope-leak compare`` does: run the same corpus through each model spec
    (``NAME[+VARIANT]``, see :func:`rope_leak.analyses.architectures.parse_model_spec`) and write
    ``comparison.csv``, ``comparison_layers.csv``, ``comparison.json`` and
    ``comparison.html`` into ``out`` (each atomically) when given."""
    models = list(models)
    for model_spec in models:
        parse_model_spec(model_spec)  # fail on a bad spec before any loading
    dtype = _dtype_name(dtype)
    if out is not None:
        out = Path(out)
        if out.exists() and not overwrite and any((out / f).exists() for f in COMPARE_FILES):
            raise FileExistsError(f"{out} already holds comparison results. Fix: pass --overwrite "
                                  "(overwrite=True) or choose another --out.")
    if n_boot < 0:
        raise ValueError(f"--n-boot must be >= 0, got {n_boot}.")
    settings = {
        "models": models, "corpus": str(corpus), "prompts": prompts,
        "tokens": tokens, "seed": seed, "target": target, "pairs": pairs.to_dict(),
        "dtype": dtype, "n_boot": n_boot, "batch_size": batch_size,
    }
    corpora: dict[str, dict] = {}

    def tokens_for(model):
        loaded = load_corpus(model, corpus, n_prompts=prompts, n_tokens=tokens, seed=seed)
        corpora[str(model.cfg.model_name)] = loaded.to_dict()
        return loaded.tokens

    started = time.perf_counter()
    table, layers, info = compare_models(
        models, load=lambda name: load_model(name, device=device, dtype=DTYPES[dtype]),
        tokens_for=tokens_for, target=target, spec=pairs, batch_size=batch_size, n_boot=n_boot,
        seed=seed, progress=progress, log=log or _quiet,
    )
    result = CompareResult(table, layers, info, settings, seconds=time.perf_counter() - started)
    if out is not None:
        _write_comparison(result, out, corpora, started)
    return result


def _write_comparison(result: CompareResult, out: Path, corpora: dict[str, dict], started: float) -> None:
    """Write :data:`COMPARE_FILES` into ``out`` (each atomically) and record them in ``result``."""
    # deferred: the figures import plotly (~1 s)
    from rope_leak.output.plots_architectures import comparison_html

    table, layers, settings = result.table, result.layers, result.settings
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.csv", table.to_csv(index=False))
    atomic_write_text(out / "comparison_layers.csv", layers.to_csv(index=False))
    payload = {"settings": settings, "models": table.to_dict(orient="records"), "details": result.info,
               "corpora": corpora,
               "ci": "completed_*_ci_*: 95% delete-one-bucket jackknife intervals; the ablation's "
                     "*_ci_low / *_ci_high (of the *_debiased value): 95% pivotal intervals of a "
                     "bootstrap of prompt buckets, one joint resample for both masks; "
                     "depth_slope_*_t_*: t interval of the linregress slope over layers",
               "seconds": time.perf_counter() - started}
    atomic_write_text(out / "comparison.json",
                      json.dumps(to_jsonable(payload), indent=2, sort_keys=True, allow_nan=False))
    atomic_write_text(out / "comparison.html", comparison_html(table, layers, settings))
    result.out, result.files = out, _files(out, COMPARE_FILES)
