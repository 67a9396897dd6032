"""Per-head patching helpers, in the style of ``transformer_lens.patching``, whose metric
is every head's absolute-position share (``docs/method.md``).

Each helper runs a *target* condition (default: the model's own causal mask) with one
intervention at one site, re-fits every head's share, and returns a
:class:`PatchingResult` whose ``effect[s]`` is the ``[layer, head]`` table
``share(patched at site s) - share(target)``:

* :func:`mask_swap_by_layer` — bidirectional mask in one layer only;
* :func:`mask_swap_by_head` — bidirectional mask in one head only;
* :func:`patch_head_output` — one head's output (``blocks.{l}.attn.hook_z[:, :, h]``, all
  positions) taken from a run under a *source* condition;
* :func:`patch_position_zero_resid` — position 0 of ``blocks.{l}.hook_resid_pre`` taken from
  a run under a source condition (e.g. another position-0 token).

Heads upstream of the site are untouched, so their effect is exactly 0; the tests rely
on it. Costs one forward pass per site and batch (plus one source run per batch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from rope_leak.backends.requirements import require_rope
from rope_leak.display import Displayable
from rope_leak.engine.pairs import PairDesign, PairSpec
from rope_leak.engine.run import ConditionRun, check_tokens, default_buckets
from rope_leak.fits.shares import fit_shares
from rope_leak.heads import (
    HeadSpec,
    HeadSpecError,
    LayerSpec,
    head_label,
    normalize_heads,
    normalize_layers,
    parse_label,
)
from rope_leak.interventions.conditions import Condition, compose
from rope_leak.interventions.hooks import act_name, intervention_hooks
from rope_leak.interventions.mask import bidirectional, causal
from rope_leak.interventions.position_zero_patch import resid_pre_name

BatchCondition = Callable[[HookedTransformer, Tensor], ContextManager]
"""``(model, batch_tokens) -> context manager``: a condition that may depend on the batch
(e.g. patches recorded from a source run on the same batch)."""


@dataclass(repr=False)
class PatchingResult(Displayable):
    """Shares of the target run and of each patched run.

    Attributes:
        sources: label of each patch site (``"L3"``, ``"L3H1"``, ``"all"``, ...).
        baseline: ``[layer, head]`` share under the target condition.
        patched: ``[site, layer, head]`` share with the site patched.
    """

    sources: list[str]
    baseline: np.ndarray
    patched: np.ndarray
    target: str
    kind: str

    @property
    def effect(self) -> np.ndarray:
        """``[site, layer, head]``: ``patched - baseline``."""
        return self.patched - self.baseline[None]

    def site_index(self, source: str | int | tuple[int, int]) -> int:
        """Index of a patch site: its label (``"L3H1"``, ``"l3h1"``, ``"L3"``, ``"all"``), a
        ``(layer, head)`` pair for per-head sites, or an int position in :attr:`sources`."""
        if isinstance(source, (int, np.integer)) and not isinstance(source, bool):
            if not -len(self.sources) <= int(source) < len(self.sources):
                raise IndexError(f"site {source} does not exist: this result has {len(self.sources)} "
                                 f"sites ({self._sites_text()}).")
            return int(source) % len(self.sources)
        label = source
        if isinstance(source, tuple) and len(source) == 2:
            label = head_label(*source)
        elif isinstance(source, str) and source.strip().lower() != "all":
            try:
                layer, head = parse_label(source)
            except HeadSpecError:
                label = source
            else:
                label = f"L{layer}" if head is None else head_label(layer, head)
        if label in self.sources:
            return self.sources.index(label)
        raise KeyError(f"{source!r} is not a patch site of this {self.kind} result. Fix: pass one of "
                       f"{self._sites_text()} (or its position 0..{len(self.sources) - 1}).")

    def _sites_text(self) -> str:
        shown = ", ".join(repr(s) for s in self.sources[:8])
        return shown + (f", ... ({len(self.sources)} in all)" if len(self.sources) > 8 else "")

    def table(self, source: str | int | tuple[int, int] = 0) -> pd.DataFrame:
        """The ``[layer, head]`` effect table of one site (rows = layers, columns = heads);
        ``source`` as in :meth:`site_index`."""
        effect = self.effect[self.site_index(source)]
        return pd.DataFrame(effect, index=pd.Index(range(effect.shape[0]), name="layer"),
                            columns=pd.Index(range(effect.shape[1]), name="head"))

    def _display_items(self):
        effect = np.abs(self.effect)
        items = [("kind", self.kind), ("target", self.target), ("sites", self.sources),
                 ("heads", f"{self.baseline.shape[0]} layers x {self.baseline.shape[1]} heads")]
        if effect.size and np.isfinite(effect).any():
            s, l, h = np.unravel_index(np.nanargmax(effect), effect.shape)
            items.append(("largest |effect|",
                          f"{self.effect[s, l, h]:+.4g} at {head_label(l, h)} when {self.sources[s]} is patched"))
        return items

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (site, layer, head)."""
        n_sites, n_layers, n_heads = self.patched.shape
        s, l, h = np.meshgrid(np.arange(n_sites), np.arange(n_layers), np.arange(n_heads), indexing="ij")
        return pd.DataFrame({
            "kind": self.kind, "source": np.array(self.sources)[s.ravel()],
            "layer": l.ravel(), "head": h.ravel(),
            "baseline_share": np.broadcast_to(self.baseline, self.patched.shape).ravel(),
            "patched_share": self.patched.ravel(), "effect": self.effect.ravel(),
        })


def _as_batch_condition(condition: Condition) -> BatchCondition:
    return lambda model, batch: condition(model)


def run_batch_conditions(
    model: HookedTransformer,
    tokens: Int[Tensor, "prompt pos"],
    conditions: Mapping[str, BatchCondition],
    *,
    target: str = "pattern",
    spec: PairSpec = PairSpec(),
    batch_size: int = 8,
    n_buckets: int | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Stream ``tokens`` under batch-aware conditions; return each condition's share
    ``[layer, head]`` for ``target`` (cross-fitted, as in :func:`fit_shares`).
    ``progress``: a progress bar over the forward passes."""
    require_rope(model, "patching")
    tokens = check_tokens(model, tokens)
    if len(tokens) < 4:
        raise ValueError(
            f"{len(tokens)} prompts are too few to cross-fit. Fix: use at least 4 prompts."
        )
    design = PairDesign(spec, tokens.shape[1])
    n_buckets = default_buckets(len(tokens)) if n_buckets is None else n_buckets
    runs = {name: ConditionRun(model, design, (target,), n_buckets) for name in conditions}
    ids = torch.arange(len(tokens))
    with tqdm(total=len(tokens) * len(conditions), disable=not progress, desc="patching",
              unit="prompt") as bar:
        for start in range(0, len(tokens), batch_size):
            batch, batch_ids = tokens[start:start + batch_size], ids[start:start + batch_size]
            for name, condition in conditions.items():
                bar.set_postfix_str("target" if name == "__target__" else name)
                with condition(model, batch):
                    runs[name].run_batch(batch, batch_ids)
                bar.update(len(batch))
    return {name: fit_shares(run.statistics(name).targets[target]).share for name, run in runs.items()}


def _finish(shares: dict[str, np.ndarray], sources: list[str], target: str, kind: str) -> PatchingResult:
    return PatchingResult(
        sources=sources, baseline=shares["__target__"],
        patched=np.stack([shares[s] for s in sources]), target=target, kind=kind,
    )


def mask_swap_by_layer(
    model: HookedTransformer, tokens: Tensor, layers: LayerSpec = None, *,
    target: str = "pattern", spec: PairSpec = PairSpec(), batch_size: int = 8,
    n_buckets: int | None = None, progress: bool = True,
) -> PatchingResult:
    """Swap the causal mask for a bidirectional one in one layer at a time.

    ``layers``: an int, ``"L3"``, a list of them, or None (every layer); one site each."""
    layers = normalize_layers(layers, model)
    conditions: dict[str, BatchCondition] = {"__target__": _as_batch_condition(causal)}
    for layer in layers:
        conditions[f"L{layer}"] = _as_batch_condition(partial(bidirectional, layers=[layer]))
    shares = run_batch_conditions(model, tokens, conditions, target=target, spec=spec,
                                  batch_size=batch_size, n_buckets=n_buckets, progress=progress)
    return _finish(shares, [f"L{l}" for l in layers], target, "mask_swap_layer")


def mask_swap_by_head(
    model: HookedTransformer, tokens: Tensor, heads: HeadSpec = None, *,
    target: str = "pattern", spec: PairSpec = PairSpec(), batch_size: int = 8,
    n_buckets: int | None = None, progress: bool = True,
) -> PatchingResult:
    """Swap the mask of one head at a time (the other heads of its layer stay causal).

    ``heads``: any head spec of :mod:`rope_leak.heads` (``[(0, 1)]``, ``{0: [1]}``,
    ``"L0H1"``, an int layer, ...; None = every head); one site per head."""
    heads = normalize_heads(heads, model)
    conditions: dict[str, BatchCondition] = {"__target__": _as_batch_condition(causal)}
    for layer, head in heads:
        conditions[head_label(layer, head)] = _as_batch_condition(
            partial(bidirectional, heads=[(layer, head)]))
    shares = run_batch_conditions(model, tokens, conditions, target=target, spec=spec,
                                  batch_size=batch_size, n_buckets=n_buckets, progress=progress)
    return _finish(shares, [head_label(l, h) for l, h in heads], target, "mask_swap_head")


class _SourceCache:
    """Activations of the source run on the current batch, recorded once per batch."""

    def __init__(self, source: Condition, names: list[str]) -> None:
        self.source, self.names = source, names
        self._key: tuple | None = None
        self.values: dict[str, Tensor] = {}

    def get(self, model: HookedTransformer, batch: Tensor) -> dict[str, Tensor]:
        key = (batch.data_ptr(), tuple(batch.shape), int(batch.sum()))
        if key != self._key:
            store: dict[str, Tensor] = {}

            def grab(act, hook):
                store[hook.name] = act.detach().clone()

            with torch.no_grad(), self.source(model), model.hooks(
                fwd_hooks=[(name, grab) for name in self.names]
            ):
                model(batch.to(model.cfg.device), return_type=None)
            self._key, self.values = key, store
        return self.values


def patch_head_output(
    model: HookedTransformer, tokens: Tensor, heads: HeadSpec, *,
    source: Condition = bidirectional, target_condition: Condition = causal,
    target: str = "pattern", spec: PairSpec = PairSpec(), batch_size: int = 8,
    n_buckets: int | None = None, progress: bool = True,
) -> PatchingResult:
    """Run ``target_condition`` with one head's output (``hook_z``, every position) taken
    from a ``source`` run on the same prompts; one site per head in ``heads`` (any head
    spec of :mod:`rope_leak.heads`)."""
    heads = normalize_heads(heads, model)
    cache = _SourceCache(source, sorted({act_name("z", l) for l, _ in heads}))
    conditions: dict[str, BatchCondition] = {"__target__": _as_batch_condition(target_condition)}

    def site(layer: int, head: int) -> BatchCondition:
        name = act_name("z", layer)

        def condition(model: HookedTransformer, batch: Tensor) -> ContextManager:
            values = cache.get(model, batch)[name]

            def hook(z, hook):
                z = z.clone()
                z[:, :, head] = values[:, :, head].to(z)
                return z

            return compose(target_condition, lambda m: intervention_hooks(m, [(name, hook)]))(model)

        return condition

    for layer, head in heads:
        conditions[head_label(layer, head)] = site(layer, head)
    shares = run_batch_conditions(model, tokens, conditions, target=target, spec=spec,
                                  batch_size=batch_size, n_buckets=n_buckets, progress=progress)
    return _finish(shares, [head_label(l, h) for l, h in heads], target, "head_output")


def patch_position_zero_resid(
    model: HookedTransformer, tokens: Tensor, layers: LayerSpec = None, *,
    source: Condition, target_condition: Condition = causal,
    target: str = "pattern", spec: PairSpec = PairSpec(), batch_size: int = 8,
    n_buckets: int | None = None, progress: bool = True,
) -> PatchingResult:
    """Run ``target_condition`` with position 0 of ``blocks.{l}.hook_resid_pre`` taken from
    a ``source`` run on the same prompts (e.g. ``partial(replace_position_zero,
    replacement="token", token_id=t)``); one site per layer, plus the site ``"all"``
    when ``layers`` is None (every layer patched at once)."""
    chosen = normalize_layers(layers, model)
    cache = _SourceCache(source, [resid_pre_name(l) for l in range(model.cfg.n_layers)])
    conditions: dict[str, BatchCondition] = {"__target__": _as_batch_condition(target_condition)}

    def site(site_layers: list[int]) -> BatchCondition:
        def condition(model: HookedTransformer, batch: Tensor) -> ContextManager:
            values = cache.get(model, batch)

            def hook(resid, hook):
                resid = resid.clone()
                resid[:, 0] = values[hook.name][:, 0].to(resid)
                return resid

            hooks = [(resid_pre_name(l), hook) for l in site_layers]
            return compose(target_condition, lambda m: intervention_hooks(m, hooks))(model)

        return condition

    sources = [f"L{l}" for l in chosen]
    for layer in chosen:
        conditions[f"L{layer}"] = site([layer])
    if layers is None:
        conditions["all"] = site(chosen)
        sources.append("all")
    shares = run_batch_conditions(model, tokens, conditions, target=target, spec=spec,
                                  batch_size=batch_size, n_buckets=n_buckets, progress=progress)
    return _finish(shares, sources, target, "position_zero_resid")
