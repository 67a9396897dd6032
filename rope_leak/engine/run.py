"""One streaming pass over a corpus: for each batch, each condition runs one forward
pass whose hooks reduce the attention scores to sufficient statistics on the fly.

Nothing of the size of the corpus' patterns is ever kept, so memory does not grow
with the number of prompts, and runs over disjoint prompts merge by addition.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name

from rope_leak.backends.bridge import is_bridge, layer_kinds, window_size
from rope_leak.backends.requirements import require_rope
from rope_leak.engine.accumulate import LayerAccumulator
from rope_leak.engine.memory import allocation_failure, check_memory, is_allocation_failure
from rope_leak.engine.pairs import PairDesign, PairSpec, start_cut_spec
from rope_leak.engine.start_cut import DEFAULT_WINDOW, StartCutAccumulator, check_window
from rope_leak.engine.statistics import (
    DEFAULT_BUCKETS,
    TARGETS,
    ConditionStatistics,
    PositionZeroStatistics,
    RunStatistics,
    StatisticsFileError,
    default_buckets,
    required_targets,
)
from rope_leak.interventions.conditions import Condition
from rope_leak.interventions.mask import bidirectional, causal


class StartCutSkippedWarning(UserWarning):
    """Prompts too short for the start cut's window: no completed split."""


DEFAULT_CONDITIONS: dict[str, Condition] = {"causal": causal, "bidirectional": bidirectional}
class PositionZeroAccumulator:
    """:class:`PositionZeroStatistics`, accumulated on the model's device (float64)."""

    def __init__(self) -> None:
        self.state: dict[str, Tensor] = {}
        self.count = 0

    def add(self, resid0: Float[Tensor, "batch layer d"], other_norm: Float[Tensor, "batch layer"]) -> None:
        resid0, other_norm = resid0.double(), other_norm.double()
        st = self.state
        if not st:
            st["reference"] = resid0[0].clone()
            for key in ("dev_sum", "dev_sumsq"):
                st[key] = torch.zeros_like(st["reference"])
            for key in ("norm_sum", "other_norm_sum"):
                st[key] = torch.zeros(resid0.shape[1], dtype=torch.float64, device=resid0.device)
            st["value_min"], st["value_max"] = resid0.min(0).values, resid0.max(0).values
        st["value_min"] = torch.minimum(st["value_min"], resid0.min(0).values)
        st["value_max"] = torch.maximum(st["value_max"], resid0.max(0).values)
        dev = resid0 - st["reference"]
        st["dev_sum"] += dev.sum(0)
        st["dev_sumsq"] += (dev * dev).sum(0)
        st["norm_sum"] += resid0.norm(dim=-1).sum(0)
        st["other_norm_sum"] += other_norm.sum(0)
        self.count += resid0.shape[0]

    def statistics(self) -> PositionZeroStatistics:
        if not self.state:
            return PositionZeroStatistics()
        arrays = {k: v.cpu().numpy() for k, v in self.state.items()}
        ref = arrays["reference"]
        arrays["max_abs_dev"] = np.maximum(np.abs(arrays["value_max"] - ref),
                                           np.abs(arrays["value_min"] - ref)).max(-1)
        return PositionZeroStatistics(count=self.count, **arrays)

    def restore(self, saved: PositionZeroStatistics, device) -> None:
        self.count = saved.count
        self.state = {} if saved.reference is None else {
            key: torch.as_tensor(getattr(saved, key), dtype=torch.float64, device=device)
            for key in ("reference", "dev_sum", "dev_sumsq", "norm_sum", "other_norm_sum",
                        "value_min", "value_max")
        }


class ConditionRun:
    """Hooks and accumulators of one condition.

    With ``start_cut_window`` set (a condition under the model's own mask), the scores
    hook also accumulates the start cut's window masses and profile
    (:mod:`rope_leak.engine.start_cut`). Nothing is copied to the host until
    :meth:`statistics`.
    """

    def __init__(
        self, model: HookedTransformer, design: PairDesign, targets: tuple[str, ...], n_buckets: int,
        cell_maps: bool = False, start_cut_window: int | None = None,
    ) -> None:
        self.model = model
        self.start_cut = None if start_cut_window is None else StartCutAccumulator(
            design, model.cfg.n_layers, model.cfg.n_heads, n_buckets, start_cut_window, model.cfg.device)
        self.acc = LayerAccumulator(
            design, model.cfg.n_layers, model.cfg.n_heads, n_buckets, targets, model.cfg.device,
            cell_maps=cell_maps,
            start_cut=None if self.start_cut is None else (self.start_cut.window, self.start_cut.design),
        )
        self.position_zero = PositionZeroAccumulator()
        self._prompt_ids: Tensor | None = None
        # per batch: position 0's residual stream before each layer and after the last,
        # and the mean norm of the other positions (written in place, layer by layer)
        self._resid0: Tensor | None = None
        self._other_norm: Tensor | None = None

    def hooks(self) -> list[tuple[str, Callable]]:
        n_layers = self.model.cfg.n_layers
        hooks: list[tuple[str, Callable]] = []
        for layer in range(n_layers):
            hooks.append((get_act_name("attn_scores", layer), self._scores_hook(layer)))
            hooks.append((get_act_name("resid_pre", layer), self._resid_hook(layer)))
        hooks.append((get_act_name("resid_post", n_layers - 1), self._resid_hook(n_layers)))
        return hooks

    def _scores_hook(self, layer: int) -> Callable:
        def hook(scores: Tensor, hook) -> None:
            scores = scores.detach()
            self.acc.add_layer(layer, scores, self._prompt_ids)
            if self.start_cut is not None:
                self.start_cut.add_layer(layer, scores, self._prompt_ids, self.acc.last_log_z,
                                         self.acc.last_start_cut_rows)
        return hook

    def _resid_hook(self, index: int) -> Callable:
        def hook(resid: Tensor, hook) -> None:
            resid = resid.detach()
            # Written into buffers made once per batch: a small tensor kept per layer would
            # sit between the forward pass' freed activations and fragment the heap (at
            # n = 2048, about 200 MB of extra resident memory).
            self._resid0[:, index].copy_(resid[:, 0])
            self._other_norm[:, index] = resid[:, 1:].float().norm(dim=-1).mean(-1)
        return hook

    def run_batch(self, tokens: Int[Tensor, "batch pos"], prompt_ids: Int[Tensor, " batch"]) -> None:
        self.forward(tokens, prompt_ids)

    def forward(self, tokens: Int[Tensor, "batch pos"], prompt_ids: Int[Tensor, " batch"],
                return_type: str | None = None):
        """One batch through the model with this condition's hooks (the condition itself
        is the caller's); the statistics take it in. Returns the model's output."""
        device = self.model.cfg.device
        self._prompt_ids = prompt_ids.to(device)
        n_layers, d_model = self.model.cfg.n_layers, self.model.cfg.d_model
        self._resid0 = torch.empty((len(tokens), n_layers + 1, d_model), dtype=torch.float32, device=device)
        self._other_norm = torch.empty((len(tokens), n_layers + 1), dtype=torch.float32, device=device)
        if self.start_cut is not None:
            self.start_cut.begin_batch(len(tokens))
        with torch.no_grad(), self.model.hooks(fwd_hooks=self.hooks()):
            out = self.model(tokens.to(device), return_type=return_type)
        self.acc.add_prompts(self._prompt_ids)
        if self.start_cut is not None:
            self.start_cut.end_batch(self._prompt_ids)
        self.position_zero.add(self._resid0, self._other_norm)
        self._resid0 = self._other_norm = None
        if self.acc.count.device.type == "cpu":  # free on CPU; on a GPU it waits for the end
            self.acc.check_finite()
        return out

    def restore(self, saved: ConditionStatistics, state: dict[str, np.ndarray]) -> None:
        """Continue from statistics saved by an earlier (interrupted) run."""
        prefix = "start_cut/"
        self.acc.load_state({k: v for k, v in state.items() if not k.startswith(prefix)})
        if self.start_cut is not None:
            self.start_cut.load_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self.position_zero.restore(saved.position_zero, self.model.cfg.device)

    def state(self) -> dict[str, Tensor]:
        """Every running sum (for checkpoints)."""
        out = dict(self.acc.state())
        if self.start_cut is not None:
            out.update({f"start_cut/{k}": v for k, v in self.start_cut.state().items()})
        return out

    def statistics(self, name: str) -> ConditionStatistics:
        return ConditionStatistics(
            name, self.acc.to_statistics(), self.acc.sink_sum.cpu().numpy(),
            self.position_zero.statistics(),
            None if self.start_cut is None else self.start_cut.to_statistics(),
        )


def check_tokens(model: HookedTransformer, tokens: Tensor) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        raise ValueError(
            "tokens must be a 2-D integer tensor [prompt, pos]. Fix: build them with "
            "rope_leak.corpus.load_corpus(...).tokens."
        )
    if tokens.shape[1] < 3:
        raise ValueError(f"prompts of {tokens.shape[1]} tokens are too short: use n >= 3.")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(
            f"prompts of {tokens.shape[1]} tokens exceed the model's context of "
            f"{model.cfg.n_ctx}. Fix: use n <= {model.cfg.n_ctx}."
        )
    if tokens.min() < 0 or tokens.max() >= model.cfg.d_vocab:
        raise ValueError(f"token ids must lie in 0..{model.cfg.d_vocab - 1}.")
    return tokens.long()


def restrict_to_window(model: HookedTransformer, spec: PairSpec, n_tokens: int) -> PairSpec:
    """With sliding-window layers and prompts longer than the window, pairs further apart
    than the window have no score in those layers: score only ``i - j < window`` in every
    layer, so that all layers and both conditions are fitted on the same cells."""
    if is_bridge(model):
        kinds, window = layer_kinds(model), window_size(model)
    else:
        kinds = [getattr(block.attn, "attn_type", "global") for block in model.blocks]
        window = getattr(model.cfg, "window_size", None)
    if "local" not in kinds or window is None or n_tokens <= window:
        return spec
    if spec.max_offset is not None and spec.max_offset <= window:
        return spec
    warnings.warn(
        f"prompts of {n_tokens} tokens exceed the sliding window ({window}) of the model's local "
        f"layers: scoring only pairs with i - j < {window}.", stacklevel=3,
    )
    return dataclasses.replace(spec, max_offset=int(window))


def run_statistics(
    model: HookedTransformer,
    tokens: Int[Tensor, "prompt pos"],
    *,
    conditions: Mapping[str, Condition] | None = None,
    targets: Iterable[str] = TARGETS,
    spec: PairSpec = PairSpec(),
    batch_size: int = 8,
    n_buckets: int | None = None,
    prompt_ids: Iterable[int] | None = None,
    progress: bool = True,
    metadata: dict | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 0,
    checkpoint_seconds: float = 0.0,
    cell_maps: bool = False,
    start_cut_window: int | None = DEFAULT_WINDOW,
    start_cut_conditions: Iterable[str] = ("causal",),
    force: bool = False,
    memory_budget: int | None = None,
) -> RunStatistics:
    """Stream ``tokens`` through ``model`` under each condition and accumulate statistics.

    Args:
        conditions: ``{name: model -> context manager}``; default causal and bidirectional.
        targets: responses to accumulate (see :data:`TARGETS`; ``log_pattern`` brings
            ``scores`` with it).
        spec: which (query, key) pairs are scored.
        n_buckets: prompt buckets (the bootstrap's and the nulls' resampling units); default
            :func:`default_buckets` of the number of prompts, or 32 when ``prompt_ids`` are
            given (shards of one corpus must all use the same value).
        cell_maps: also keep per-cell sums (``O(n^2)`` per head: ``M_cell``, the
            permutation null, per-cell maps). Off by default: every fit needs ``O(n)``.
        start_cut_window: the start cut's reference window ``w``
            (:mod:`rope_leak.engine.start_cut`); None: no start cut.
        start_cut_conditions: conditions (run under the model's own mask) that accumulate
            the start cut's statistics.
        prompt_ids: global index of each prompt (for shards; default ``0..P-1``). A prompt's
            index fixes its fold (parity) and bucket, so shards merge exactly.
        checkpoint: a file to resume from when it exists (after checking that it was
            written by a run with the same metadata, conditions, targets, pairs and prompts),
            and to save the statistics to, atomically, after every ``checkpoint_every``
            batches, or once ``checkpoint_seconds`` have passed since the last save
            (0: never). Checkpoints fall between whole batches. A resumed run skips the batches already done and ends with
            statistics identical to an uninterrupted run's (same batches, same order of
            float64 additions). The caller removes the file once its results are written.
        force: run even when the memory estimate (:mod:`rope_leak.engine.memory`) exceeds
            what is available; by default such a run is refused before its first forward
            pass with :class:`~rope_leak.engine.memory.InsufficientMemoryError`, which says
            what fits (the largest n at batch 1, the largest batch at this n).
        memory_budget: bytes available to the run beyond the loaded model, instead of what
            the machine reports (for tests).

    An allocation that fails during the passes anyway raises
    :class:`~rope_leak.engine.memory.InsufficientMemoryError` too (what failed, what to lower).
    """
    require_rope(model, "run_statistics")
    tokens = check_tokens(model, tokens)
    conditions = dict(DEFAULT_CONDITIONS if conditions is None else conditions)
    if not conditions:
        raise ValueError("no conditions to run.")
    ids = torch.arange(len(tokens)) if prompt_ids is None else torch.as_tensor(list(prompt_ids))
    if len(ids) != len(tokens):
        raise ValueError(f"{len(ids)} prompt ids for {len(tokens)} prompts.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    spec = restrict_to_window(model, spec, tokens.shape[1])
    design = PairDesign(spec, tokens.shape[1])
    targets = required_targets(targets)
    if n_buckets is None:  # shards (prompt ids given) must agree whatever their size
        n_buckets = DEFAULT_BUCKETS if prompt_ids is not None else default_buckets(len(tokens))
    start_cut_window = _start_cut_window(start_cut_window, spec, tokens.shape[1])
    with_start_cut = set(start_cut_conditions) if start_cut_window is not None else set()
    # Before anything large is allocated: refuse a run that cannot fit (force: warn, go on).
    memory_settings = dict(
        n_prompts=len(tokens), conditions=list(conditions), targets=targets, n_buckets=n_buckets,
        cell_maps=cell_maps, start_cut_window=start_cut_window, start_cut_conditions=with_start_cut,
        checkpoint=checkpoint is not None and bool(checkpoint_every or checkpoint_seconds),
        max_offset=spec.max_offset)
    estimate = check_memory(model, tokens.shape[1], batch_size, memory_budget=memory_budget, force=force,
                            **memory_settings)
    runs = {name: ConditionRun(model, design, targets, n_buckets, cell_maps=cell_maps,
                               start_cut_window=start_cut_window if name in with_start_cut else None)
            for name in conditions}
    done = _resume(runs, checkpoint, metadata, design, n_buckets, ids, batch_size)
    checkpoints = None if checkpoint is None else _Checkpoints(checkpoint, checkpoint_every, checkpoint_seconds)
    failure, where = _stream(model, tokens, ids, conditions, runs, metadata, done, batch_size=batch_size,
                             progress=progress, checkpoints=checkpoints)
    if failure is not None:  # out of the except block: the failed frames' tensors are freed
        runs.clear()
        raise allocation_failure(failure, where=where, estimate=estimate, model=model,
                                 estimate_kwargs=memory_settings)
    return _snapshot(runs, metadata, ids.tolist())


def _start_cut_window(window: int | None, spec: PairSpec, n_tokens: int) -> int | None:
    """``window``, checked against the prompts and the pairs; None (with a
    :class:`StartCutSkippedWarning`) when the prompts are too short for it."""
    if window is not None and n_tokens < window + 2:
        warnings.warn(
            f"prompts of {n_tokens} tokens are too short for the start cut's window of "
            f"{window} keys (it needs n >= w + 2): the completed split is not computed. "
            "Fix: use longer prompts, or a smaller window (--window).", StartCutSkippedWarning,
            stacklevel=3)  # the caller of run_statistics
        return None
    if window is not None:
        check_window(window, n_tokens)
        start_cut_spec(spec, window, n_tokens)  # refuses pairs that end before query w
    return window


def _snapshot(runs: dict[str, ConditionRun], metadata: dict | None, prompts: Iterable[int],
              with_state: bool = False) -> RunStatistics:
    """The statistics of ``runs`` so far, over ``prompts``; ``with_state``: with every
    running sum too (a checkpoint)."""
    state = {f"{name}/{key}": value.cpu().numpy() for name, run in runs.items()
             for key, value in run.state().items()} if with_state else {}
    return RunStatistics(
        {name: run.statistics(name) for name, run in runs.items()},
        dict(metadata or {}),
        sorted(int(i) for i in prompts),
        state,
    )


def _resume(runs: dict[str, ConditionRun], checkpoint, metadata: dict | None, design: PairDesign,
            n_buckets: int, ids: Tensor, batch_size: int) -> set[int]:
    """Restore ``runs`` from ``checkpoint`` when it exists (refused when written with
    other settings); the prompts it already holds. A checkpoint that cannot be read is
    ignored with a warning (the run starts over and rewrites it)."""
    if checkpoint is None or not Path(checkpoint).exists():
        return set()
    try:
        saved = RunStatistics.load(checkpoint, kind="checkpoint")
    except StatisticsFileError as err:  # a crash mid-write cannot cause this (atomic)
        warnings.warn(f"{err} Starting the run over; the checkpoint will be rewritten.",
                      stacklevel=3)  # the caller of run_statistics
        return set()
    _check_resumable(saved, checkpoint, dict(metadata or {}), runs, design, n_buckets, ids, batch_size)
    for name, run in runs.items():
        run.restore(saved.conditions[name], {k.split("/", 1)[1]: v for k, v in saved.state.items()
                                             if k.startswith(name + "/")})
    return set(saved.prompts_done)


class _Checkpoints:
    """Where a run saves its resumable statistics, and when: after every ``every``
    batches, or once ``seconds`` have passed since the last save (0: never)."""

    def __init__(self, path: str | Path, every: int, seconds: float) -> None:
        self.path, self.every, self.seconds = path, every, seconds
        self.since, self.last_save = 0, time.monotonic()

    def due(self) -> bool:
        """Count one batch done; whether a save is due."""
        self.since += 1
        return bool((self.every and self.since >= self.every) or (
            self.seconds and time.monotonic() - self.last_save >= self.seconds))

    def saved(self) -> None:
        self.since, self.last_save = 0, time.monotonic()


def _stream(model: HookedTransformer, tokens: Tensor, ids: Tensor, conditions: dict[str, Condition],
            runs: dict[str, ConditionRun], metadata: dict | None, done: set[int], *, batch_size: int,
            progress: bool, checkpoints: _Checkpoints | None) -> tuple[str | None, str]:
    """Every batch not in ``done`` through every condition (``done`` grows with them),
    checkpointing between batches. Returns ``(failure, where)``: the message of an
    allocation that failed (None: all went through) and the step it failed in."""
    starts = list(range(0, len(tokens), batch_size))
    bar = tqdm(total=len(tokens) * len(conditions), disable=not progress,
               desc="forward passes", unit="prompt", initial=len(done) * len(conditions))
    if checkpoints is not None:
        checkpoints.saved()  # the clock starts with the passes
    where, failure = "the first forward pass", None
    try:
        with bar:
            for k, start in enumerate(starts):
                batch, batch_ids = tokens[start:start + batch_size], ids[start:start + batch_size]
                if done and int(batch_ids[0]) in done:
                    continue  # resumed: done before the checkpoint (whole batches only)
                for name, condition in conditions.items():
                    bar.set_postfix_str(name)
                    where = (f"the forward pass of prompts {int(batch_ids[0])}..{int(batch_ids[-1])} "
                             f"under condition {name!r}")
                    with condition(model):
                        runs[name].run_batch(batch, batch_ids)
                    bar.update(len(batch))
                done.update(int(i) for i in batch_ids)
                if checkpoints is not None and checkpoints.due() and k + 1 < len(starts):
                    where = f"writing the checkpoint {checkpoints.path}"
                    _snapshot(runs, metadata, done, with_state=True).save(checkpoints.path)
                    checkpoints.saved()
    except Exception as err:  # noqa: BLE001 - only allocation failures are translated
        if not is_allocation_failure(err):
            raise
        failure = str(err) or type(err).__name__
    return failure, where


def _check_resumable(saved: RunStatistics, path, metadata: dict, runs: dict, design: PairDesign,
                     n_buckets: int, ids: Tensor, batch_size: int) -> None:
    """Refuse to resume from a checkpoint written with other settings or other prompts."""
    fix = f"Fix: rerun with the arguments of the interrupted run, or delete {path} to start over."
    if saved.metadata != json.loads(json.dumps(metadata, sort_keys=True)):
        raise ValueError(f"the checkpoint {path} was written with other settings "
                         f"({saved.metadata} vs {metadata}). {fix}")
    if set(saved.conditions) != set(runs):
        raise ValueError(f"the checkpoint {path} has conditions {sorted(saved.conditions)}, "
                         f"not {sorted(runs)}. {fix}")
    for name, cond in saved.conditions.items():
        first = next(iter(cond.targets.values()))
        cut = runs[name].start_cut
        if (cond.start_cut is None) != (cut is None) or (cut is not None and cond.start_cut.window != cut.window):
            raise ValueError(f"the checkpoint {path} was written with another start-cut window. {fix}")
        if (set(cond.targets) != set(runs[name].acc.targets) or not saved.state or first.design.spec != design.spec
                or first.design.n_tokens != design.n_tokens or first.n_buckets != n_buckets):
            raise ValueError(f"the checkpoint {path} has other targets, pairs, length or buckets. {fix}")
    batches = [ids[s:s + batch_size].tolist() for s in range(0, len(ids), batch_size)]
    prefix: list[int] = []
    for batch in batches:
        if len(prefix) >= len(saved.prompts_done):
            break
        prefix += batch
    if sorted(prefix) != sorted(saved.prompts_done):
        raise ValueError(f"the checkpoint {path} holds prompts {saved.prompts_done[:8]}... that are not "
                         f"the first whole batches of this run. {fix}")
