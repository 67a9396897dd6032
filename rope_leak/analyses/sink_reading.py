"""Sink-reading heads: which heads' outputs at later positions depend on position 0.

Two per-head measurements, both at queries ``i >= 1``:

**Patching effect** (the identification). For each layer ``l``, take the clean run's
``blocks.{l}.hook_resid_pre``, overwrite *only position 0* with position 0's stream at
the same layer from a run whose position-0 token is ``source_token_id`` (everything
else identical), and rerun block ``l`` alone. Positions ``>= 1`` of the layer input are
unchanged, so a head's output at ``i >= 1`` can only change through key 0 and value 0.
For head ``h`` with output ``r_i = z_i W_O^h`` (what it adds to the residual stream):

    relative_change[l, h] = sqrt( sum_{p, i>=1} |r'_{p,i} - r_{p,i}|^2 / sum_{p, i>=1} |r_{p,i}|^2 )

(a ratio of sums over prompts ``p`` and queries; the per-prompt ratios are kept for
bootstrap CIs). A head is *sink-reading* when ``relative_change > threshold``; the
default threshold :data:`SINK_READING_THRESHOLD` = 0.1 means "swapping the position-0
token moves the head's output by more than 10% of its norm". This is a direct effect
at layer ``l`` (later layers are not rerun), so each head is credited only for what
it reads from position 0 itself.

**Key-0 contribution** (how much of the output flows through key 0). With
``u_{p,j} = v_{p,j} W_O^h`` the value vector of key ``j`` written into the residual
stream, the head's output at ``i`` is ``sum_j A[i, j] u_j``. The fraction through key 0 is

    key0_fraction[l, h] = mean_{p, i>=1}  A[i, 0] |u_0| / sum_{j<=i} A[i, j] |u_j|

a number in ``[0, 1]``: the share of the output's *mass* (sum of norms of the weighted
value vectors, so cancellations between keys do not inflate it) that key 0 supplies.
Sink heads often have ``key0_fraction`` far below their sink score ``mean A[i, 0]``:
they attend to position 0 but its value vector is small (a "no-op" sink).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from scipy.stats import ttest_1samp
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from rope_leak.analyses.values import values_per_query_head
from rope_leak.backends.requirements import require_rope
from rope_leak.display import Displayable
from rope_leak.heads import head_label
from rope_leak.inference.fdr import benjamini_hochberg
from rope_leak.interventions.hooks import act_name
from rope_leak.interventions.position_zero_patch import record_position_zero, resid_pre_name

SINK_READING_THRESHOLD = 0.1
"""Default threshold on the relative change of a head's output (see module docstring)."""


@dataclass(repr=False)
class SinkReading(Displayable):
    """Per-head sink-reading measurements. Arrays ``[layer, head]``; ``per_prompt_*``
    arrays ``[prompt, layer, head]`` (for bootstrap CIs)."""

    diff_sumsq: np.ndarray  # [prompt, layer, head]: sum_{i>=1} |r' - r|^2
    base_sumsq: np.ndarray  # [prompt, layer, head]: sum_{i>=1} |r|^2
    per_prompt_key0_fraction: np.ndarray  # [prompt, layer, head]
    source_token_id: int
    threshold: float = SINK_READING_THRESHOLD
    metadata: dict = field(default_factory=dict)

    def _display_items(self):
        heads = self.heads()
        rel = self.relative_change
        l, h = np.unravel_index(np.argmax(rel), rel.shape)
        return [("source_token_id", self.source_token_id), ("threshold", self.threshold),
                ("prompts", self.n_prompts), ("heads", f"{rel.shape[0]} layers x {rel.shape[1]} heads"),
                ("sink_reading_heads", [head_label(*x) for x in heads]),
                ("largest_change", f"{rel[l, h]:.4g} at {head_label(l, h)}")]

    @staticmethod
    def _ratio(diff: np.ndarray, base: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(base > 0, np.sqrt(diff / np.where(base > 0, base, 1.0)), 0.0)

    @property
    def relative_change(self) -> np.ndarray:
        return self._ratio(self.diff_sumsq.sum(0), self.base_sumsq.sum(0))

    @property
    def per_prompt_relative_change(self) -> np.ndarray:
        return self._ratio(self.diff_sumsq, self.base_sumsq)

    @property
    def key0_fraction(self) -> np.ndarray:
        return self.per_prompt_key0_fraction.mean(0)

    @property
    def n_prompts(self) -> int:
        return self.diff_sumsq.shape[0]

    def heads(self, threshold: float | None = None) -> list[tuple[int, int]]:
        """``(layer, head)`` of every sink-reading head."""
        t = self.threshold if threshold is None else threshold
        return [(int(l), int(h)) for l, h in zip(*np.nonzero(self.relative_change > t), strict=True)]

    def is_reading(self, threshold: float | None = None) -> np.ndarray:
        return self.relative_change > (self.threshold if threshold is None else threshold)

    def bootstrap(self, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, np.ndarray]:
        """Percentile bootstrap over prompts: ``{"relative_change_low"/"_high",
        "key0_fraction_low"/"_high"}``, each ``[layer, head]``."""
        rng = np.random.default_rng(seed)
        n = self.n_prompts
        rel, frac = [], []
        for _ in range(n_boot):
            idx = rng.integers(0, n, n)
            rel.append(self._ratio(self.diff_sumsq[idx].sum(0), self.base_sumsq[idx].sum(0)))
            frac.append(self.per_prompt_key0_fraction[idx].mean(0))
        alpha = (1 - confidence) / 2
        out = {}
        for name, samples in (("relative_change", rel), ("key0_fraction", frac)):
            low, high = np.quantile(np.stack(samples), [alpha, 1 - alpha], axis=0)
            out[f"{name}_low"], out[f"{name}_high"] = low, high
        return out

    def significance(self, fdr_level: float = 0.05) -> dict[str, np.ndarray]:
        """Per-head one-sided test that the head reads position 0 beyond the threshold:
        a t-test (scipy) of the per-prompt relative changes against ``threshold``
        (alternative "greater"), then Benjamini–Hochberg across heads. Heads whose
        per-prompt values do not vary (e.g. exactly 0) get p = 1. Returns ``pvalue``,
        ``qvalue`` and ``significant``, each ``[layer, head]``."""
        values = self.per_prompt_relative_change
        with np.errstate(divide="ignore", invalid="ignore"):
            pvalues = ttest_1samp(values, self.threshold, axis=0, alternative="greater").pvalue
        pvalues = np.where(np.isfinite(pvalues), pvalues, np.where(values.mean(0) > self.threshold, 0.0, 1.0))
        fdr = benjamini_hochberg(pvalues, fdr_level)
        return {"pvalue": pvalues, "qvalue": fdr.qvalues, "significant": fdr.significant}

    def table(self, sink_scores: np.ndarray | None = None, n_boot: int = 0, seed: int = 0) -> pd.DataFrame:
        """One row per head: relative change, key-0 fraction, sink-reading flag (and
        bootstrap CIs when ``n_boot > 0``, the sink score when given)."""
        n_layers, n_heads = self.relative_change.shape
        layers, heads = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
        table = pd.DataFrame({
            "layer": layers.ravel(), "head": heads.ravel(),
            "label": [f"L{l}H{h}" for l, h in zip(layers.ravel(), heads.ravel(), strict=True)],
            "relative_change": self.relative_change.ravel(),
            "key0_fraction": self.key0_fraction.ravel(),
            "sink_reading": self.is_reading().ravel(),
        })
        if self.n_prompts >= 2:
            for name, values in self.significance().items():
                table[f"sink_reading_{name}"] = values.ravel()
        if sink_scores is not None:
            table["sink_score"] = np.asarray(sink_scores).ravel()
        if n_boot > 0:
            for name, values in self.bootstrap(n_boot, seed=seed).items():
                table[name] = values.ravel()
        return table

    def to_dict(self) -> dict:
        return {
            "source_token_id": self.source_token_id,
            "threshold": self.threshold,
            "threshold_meaning": "relative change of the head's output r = z W_O at queries i >= 1 "
            "when only position 0 of its layer input is patched from a run with another position-0 token",
            "n_prompts": self.n_prompts,
            "sink_reading_heads": [f"L{l}H{h}" for l, h in self.heads()],
            "sink_reading_heads_significant": (
                [f"L{l}H{h}" for l, h in zip(*np.nonzero(self.significance()["significant"]))]
                if self.n_prompts >= 2 else []),
            "significance": "one-sided t-test of per-prompt relative change > threshold, BH q < 0.05",
            "relative_change": self.relative_change.tolist(),
            "key0_fraction": self.key0_fraction.tolist(),
        }


def _value_norms(
    v: Float[Tensor, "batch pos kv_head d_head"], W_O: Float[Tensor, "head d_head d_model"]
) -> Float[Tensor, "batch head pos"]:
    """``|v_j W_O^h|`` for every head (GQA value heads repeated to the query heads)."""
    v = values_per_query_head(v, W_O.shape[0])
    return torch.einsum("bphd,hdm->bhpm", v.float(), W_O.float()).norm(dim=-1)


def sink_reading(
    model: HookedTransformer,
    tokens: Int[Tensor, "prompt pos"],
    *,
    source_token_id: int,
    threshold: float = SINK_READING_THRESHOLD,
    batch_size: int = 8,
    progress: bool = False,
) -> SinkReading:
    """Measure every head's dependence on position 0 (see the module docstring).

    Args:
        tokens: prompts ``[prompt, pos]`` (usually BOS at position 0).
        source_token_id: the position-0 token of the patch source run (must differ from
            the prompts' own position-0 token for the patch to change anything).
        threshold: relative-change threshold for calling a head sink-reading.
        progress: a progress bar over the batches.
    """
    require_rope(model, "sink_reading")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(
            f"tokens must be [prompt, pos] with pos >= 2, got shape {tuple(tokens.shape)}. "
            "Fix: pass corpus.tokens."
        )
    if not 0 <= int(source_token_id) < model.cfg.d_vocab:
        raise ValueError(f"source_token_id={source_token_id} is outside 0..{model.cfg.d_vocab - 1}.")
    if (tokens[:, 0] == int(source_token_id)).all():
        raise ValueError(
            f"every prompt already has token {source_token_id} at position 0, so the patch is a "
            "no-op. Fix: choose a different source_token_id."
        )
    n_layers = model.cfg.n_layers
    diff, base, frac = [], [], []
    # filled by the hooks, emptied for every batch
    resid_pre: dict[int, Tensor] = {}
    z_clean: dict[int, Tensor] = {}
    values: dict[int, Tensor] = {}
    fractions: dict[int, Tensor] = {}
    captured: dict[str, Tensor] = {}
    for start in tqdm(range(0, len(tokens), batch_size), desc="sink reading", unit="batch",
                      disable=not progress):
        batch = tokens[start:start + batch_size].to(model.cfg.device)
        source_tokens = batch.clone()
        source_tokens[:, 0] = int(source_token_id)
        # Under the causal mask position 0 sees no later token: a short prefix of the source
        # prompts gives the same position-0 stream as the full-length run.
        source = record_position_zero(model, source_tokens[:, :8])  # [layer+1, batch, d_model]
        for store in (resid_pre, z_clean, values, fractions, captured):
            store.clear()

        def make_hooks(layer: int):
            W_O = model.blocks[layer].attn.W_O.detach()

            def save_resid(resid, hook):
                resid_pre[layer] = resid.detach()

            def save_v(v, hook):
                values[layer] = _value_norms(v.detach(), W_O)

            def save_pattern(pattern, hook):
                u = values[layer]  # [batch, head, key]
                weighted = pattern.detach().float() * u[:, :, None, :]  # [b, h, q, k]
                denom = weighted.sum(-1)[:, :, 1:]
                f = torch.where(denom > 0, weighted[:, :, 1:, 0] / denom.clamp_min(1e-30), 0.0)
                fractions[layer] = f.mean(-1)  # [batch, head]

            def save_z(z, hook):
                z_clean[layer] = z.detach()

            return [(resid_pre_name(layer), save_resid), (act_name("v", layer), save_v),
                    (act_name("pattern", layer), save_pattern), (act_name("z", layer), save_z)]

        hooks = [h for layer in range(n_layers) for h in make_hooks(layer)]
        with torch.no_grad():
            with model.hooks(fwd_hooks=hooks):
                model(batch, return_type=None)
            batch_diff, batch_base = [], []
            for layer in range(n_layers):
                block = model.blocks[layer]
                patched_input = resid_pre[layer].clone()
                patched_input[:, 0] = source[layer].to(patched_input)
                captured.clear()

                def grab_z(z, hook):
                    captured["z"] = z.detach()

                with model.hooks(fwd_hooks=[(act_name("z", layer), grab_z)]):
                    block(patched_input)
                W_O = block.attn.W_O.detach().float()
                r_clean = torch.einsum("bphd,hdm->bphm", z_clean[layer][:, 1:].float(), W_O)
                r_patch = torch.einsum("bphd,hdm->bphm", captured["z"][:, 1:].float(), W_O)
                batch_diff.append(((r_patch - r_clean) ** 2).sum((1, 3)))
                batch_base.append((r_clean**2).sum((1, 3)))
        diff.append(torch.stack(batch_diff, 1).double().cpu().numpy())
        base.append(torch.stack(batch_base, 1).double().cpu().numpy())
        frac.append(torch.stack([fractions[l] for l in range(n_layers)], 1).double().cpu().numpy())
    return SinkReading(
        diff_sumsq=np.concatenate(diff), base_sumsq=np.concatenate(base),
        per_prompt_key0_fraction=np.concatenate(frac), source_token_id=int(source_token_id),
        threshold=threshold,
        metadata={"n_tokens": int(tokens.shape[1])},
    )
