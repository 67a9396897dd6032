"""rope_leak: where does absolute position come from in RoPE language models?

The top-level names are the ones a session needs::

    model = load_model("smollm2-135m")
    corpus = load_corpus(model, "wikipedia", n_prompts=64, n_tokens=256)
    analysis = analyze(model, corpus)
    analysis.head("L3H1")
    analysis.completed_split()                     # the start cut: mask vs scores, per head
    analysis.record()                              # the plain tables output renders
    result = run("smollm2-135m", "wikipedia", "out/")   # what `rope-leak analyze` does
"""

from rope_leak.analyses.analysis import Analysis, analyze
from rope_leak.analyses.effects import loss_effects
from rope_leak.analyses.sinks import SinkAnalysis, analyze_sinks
from rope_leak.backends import load_hf_model, load_model, tiny_rope_model
from rope_leak.backends.requirements import NotRoPEModelError, require_rope
from rope_leak.corpus import Corpus, load_corpus
from rope_leak.engine.allocator import tune_allocator
from rope_leak.engine.memory import InsufficientMemoryError, estimate_memory
from rope_leak.engine.pairs import PairSpec
from rope_leak.engine.run import run_statistics
from rope_leak.engine.statistics import RunStatistics
from rope_leak.heads import HeadSpecError, head_label, normalize_heads, normalize_layers
from rope_leak.interventions.key_position_removal import remove_key_positions
from rope_leak.interventions.mask import bidirectional
from rope_leak.interventions.position_zero import replace_position_zero
from rope_leak.interventions.start_cut_removal import remove_start_cut
from rope_leak.output.records import AnalysisRecord, SinkRecord
from rope_leak.output.results import save_analysis, save_sinks
from rope_leak.pipeline import (
    CompareResult,
    EffectsRunResult,
    RunResult,
    compare,
    merge,
    run,
    run_effects,
    run_sinks,
)
from rope_leak.quantities import NOT_ESTIMABLE, QUANTITIES, column
from rope_leak.version import __version__ as __version__

__all__ = [
    "Analysis",
    "AnalysisRecord",
    "CompareResult",
    "EffectsRunResult",
    "Corpus",
    "HeadSpecError",
    "InsufficientMemoryError",
    "NOT_ESTIMABLE",
    "NotRoPEModelError",
    "PairSpec",
    "QUANTITIES",
    "RunResult",
    "RunStatistics",
    "SinkAnalysis",
    "SinkRecord",
    "analyze",
    "analyze_sinks",
    "bidirectional",
    "column",
    "compare",
    "estimate_memory",
    "head_label",
    "load_corpus",
    "load_hf_model",
    "load_model",
    "loss_effects",
    "merge",
    "normalize_heads",
    "normalize_layers",
    "remove_key_positions",
    "remove_start_cut",
    "replace_position_zero",
    "require_rope",
    "run",
    "run_effects",
    "run_sinks",
    "run_statistics",
    "save_analysis",
    "save_sinks",
    "tiny_rope_model",
    "tune_allocator",
]
