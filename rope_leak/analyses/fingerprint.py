"""The fingerprint: what heads write into later positions *from position 0*.

Head ``h`` of layer ``l`` adds ``sum_j A[i, j] v_j W_O^h`` at query ``i``. The part from
key 0 is ``A[i, 0] * f`` with the **fingerprint** ``f = v_0 W_O^h`` (``[d_model]``): what
position 0 offers, per unit of attention. ``f`` is a function of position 0's residual
stream only, so under the causal mask it is a function of the position-0 token: exactly
constant across prompts when position 0 is BOS, varying when position 0 holds
content. How *much* of it a query takes, ``A[i, 0]``, is chosen by the query (and so
depends on the prompt); :attr:`Fingerprint.written` = ``mean_{i>=1} A[i, 0] f`` keeps
both.

Decodability: :func:`probe` fits a cross-validated ridge regression (numpy; alpha by
leave-one-out inside each training fold) from features to prompt content (default:
:func:`bag_of_tokens`, the frequencies of the corpus' most common tokens in each
prompt's positions ``1..j``) and reports out-of-fold R² with a permutation p-value.
"Chance" is R² <= 0 and a permutation p-value above the level. The control feature is an
ordinary position ``j`` (default the last): its residual stream at the same layer input,
and what the same heads offer from key ``j`` (``v_j W_O^h``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from rope_leak.analyses.values import values_per_query_head
from rope_leak.backends.requirements import require_rope
from rope_leak.display import Displayable
from rope_leak.heads import head_label, normalize_heads
from rope_leak.interventions.hooks import act_name
from rope_leak.interventions.position_zero_patch import resid_pre_name

ALPHAS = tuple(10.0 ** np.arange(-3, 6))
CONSTANT_TOLERANCE = 1e-5
"""A feature whose cross-prompt std is below this times the features' overall RMS is
treated as constant: float32 rounding (prompts run in batches of different shapes differ
by ~1e-7 relative) is not content."""


@dataclass(repr=False)
class Fingerprint(Displayable):
    """Per prompt ``p`` and head ``k`` (``heads[k] = (layer, head)``)."""

    heads: list[tuple[int, int]]
    value: np.ndarray  # [prompt, head, d_model]: f = v_0 W_O^h
    attention0: np.ndarray  # [prompt, head]: mean_{i>=1} A[i, 0]
    control_value: np.ndarray  # [prompt, head, d_model]: v_j W_O^h at the control position j
    control_resid: np.ndarray  # [prompt, d_model]: resid_pre of control_layer at position j
    position_zero_tokens: np.ndarray  # [prompt]
    control_position: int
    control_layer: int

    def _display_items(self):
        spread = self.spread()  # per head; cheap (a std over prompts)
        return [("heads", [head_label(l, h) for l, h in self.heads]), ("prompts", len(self.value)),
                ("d_model", self.value.shape[-1]), ("control_position", self.control_position),
                ("control_layer", self.control_layer),
                ("max_fingerprint_std", float(spread["fingerprint_std"].max())),
                ("max_written_std", float(spread["written_std"].max())),
                ("mean_attention0", float(self.attention0.mean()))]

    @property
    def written(self) -> np.ndarray:
        """``mean_{i>=1} A[i, 0] v_0 W_O^h``: ``[prompt, head, d_model]``."""
        return self.attention0[..., None] * self.value

    def spread(self) -> pd.DataFrame:
        """Per head: cross-prompt std (root-mean over d_model) and largest deviation from the
        first prompt, of the fingerprint ``f`` and of ``written``; the cosine between the
        most different ``written`` vectors.

        Within one batch the deviation is exactly 0 when all prompts share the position-0
        token; across batches of different sizes float32 matmuls may round differently
        (``fingerprint_relative_deviation`` ~1e-7)."""
        rows = []
        for k, (layer, head) in enumerate(self.heads):
            f, w = self.value[:, k], self.written[:, k]
            wn = w / np.linalg.norm(w, axis=-1, keepdims=True).clip(1e-30)
            rows.append({
                "layer": layer, "head": head, "label": f"L{layer}H{head}",
                "fingerprint_std": float(np.sqrt(f.var(0, ddof=1).mean())) if len(f) > 1 else np.nan,
                "fingerprint_max_abs_deviation": float(np.abs(f - f[:1]).max()),
                "fingerprint_relative_deviation":
                    float(np.abs(f - f[:1]).max() / max(np.linalg.norm(f, axis=-1).mean(), 1e-30)),
                "written_std": float(np.sqrt(w.var(0, ddof=1).mean())) if len(w) > 1 else np.nan,
                "written_min_cosine": float((wn @ wn.T).min()),
                "attention0_mean": float(self.attention0[:, k].mean()),
            })
        return pd.DataFrame(rows)

    def features(self, kind: str) -> np.ndarray:
        """``[prompt, feature]`` for ``kind`` in :data:`FEATURE_KINDS`."""
        flat = "prompt head d_model -> prompt (head d_model)"
        if kind == "fingerprint":
            return einops.rearrange(self.value, flat)
        if kind == "written":
            return einops.rearrange(self.written, flat)
        if kind == "control_value":
            return einops.rearrange(self.control_value, flat)
        if kind == "control_resid":
            return self.control_resid
        raise ValueError(f"unknown feature kind {kind!r}; choose from {FEATURE_KINDS}.")


FEATURE_KINDS = ("fingerprint", "written", "control_value", "control_resid")


def fingerprint(
    model: HookedTransformer,
    tokens: Int[Tensor, "prompt pos"],
    heads: Iterable[tuple[int, int]],
    *,
    control_position: int = -1,
    control_layer: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Fingerprint:
    """Record the fingerprint of ``heads`` on every prompt (see the module docstring).

    Args:
        control_position: the ordinary position ``j`` used as control (default: the last).
        control_layer: layer whose input residual stream at ``j`` is the control
            (default: the deepest layer among ``heads``).
    """
    require_rope(model, "fingerprint")
    if heads is None or (not isinstance(heads, (str, int)) and len(list(heads)) == 0):
        raise ValueError(
            "no heads given. Fix: pass e.g. sink_reading(...).heads(), or a list of (layer, head)."
        )
    heads = normalize_heads(heads, model)
    n = tokens.shape[1]
    j = control_position % n
    if j == 0:
        raise ValueError("control_position must not be 0 (position 0 is what is being tested).")
    control_layer = max(l for l, _ in heads) if control_layer is None else int(control_layer)
    layers = sorted({l for l, _ in heads})
    out = {"value": [], "att": [], "cvalue": [], "cresid": []}
    store: dict = {}  # filled by the hooks, emptied for every batch
    for start in tqdm(range(0, len(tokens), batch_size), desc="fingerprint", unit="batch",
                      disable=not progress):
        batch = tokens[start:start + batch_size].to(model.cfg.device)
        store.clear()

        def hooks_for(layer: int):
            hs = [h for l, h in heads if l == layer]
            W_O = model.blocks[layer].attn.W_O.detach().float()[hs]  # [k, d_head, d_model]

            def on_v(v, hook):
                v = values_per_query_head(v, model.cfg.n_heads)[:, :, hs].float()  # [b, pos, k, d_head]
                store["value", layer] = torch.einsum("bkd,kdm->bkm", v[:, 0], W_O)
                store["cvalue", layer] = torch.einsum("bkd,kdm->bkm", v[:, j], W_O)

            def on_pattern(pattern, hook):
                store["att", layer] = pattern[:, hs, 1:, 0].float().mean(-1)

            return [(act_name("v", layer), on_v), (act_name("pattern", layer), on_pattern)]

        def on_resid(resid, hook):
            store["cresid"] = resid[:, j].float()

        hooks = [h for layer in layers for h in hooks_for(layer)]
        hooks.append((resid_pre_name(control_layer), on_resid))
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(batch, return_type=None)
        for key in ("value", "att", "cvalue"):
            out[key].append(torch.cat([store[key, l] for l in layers], 1).double().cpu().numpy())
        out["cresid"].append(store["cresid"].double().cpu().numpy())
    # columns above are grouped by layer in `layers` order, matching sorted `heads`
    return Fingerprint(
        heads=heads,
        value=np.concatenate(out["value"]),
        attention0=np.concatenate(out["att"]),
        control_value=np.concatenate(out["cvalue"]),
        control_resid=np.concatenate(out["cresid"]),
        position_zero_tokens=tokens[:, 0].cpu().numpy().copy(),
        control_position=j,
        control_layer=control_layer,
    )


def bag_of_tokens(
    tokens: Int[Tensor, "prompt pos"], k: int = 20, last_position: int = -1, first_position: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt content as numbers: the frequency of each of the ``k`` most common tokens
    (over all prompts' positions ``first_position..last_position``) within each prompt's
    positions ``first_position..last_position``. Returns ``(targets [prompt, k], token_ids [k])``."""
    ids = tokens.cpu().numpy()
    n = ids.shape[1]
    last = last_position % n
    if not 0 <= first_position <= last:
        raise ValueError(f"first_position={first_position} must lie in 0..{last} (the last position).")
    window = ids[:, first_position:last + 1]
    values, counts = np.unique(window, return_counts=True)
    top = values[np.argsort(-counts, kind="stable")[:k]]
    freq = (window[:, :, None] == top[None, None, :]).mean(1)
    return freq.astype(np.float64), top


@dataclass(repr=False)
class ProbeResult(Displayable):
    """Cross-validated ridge probe from features to content."""

    r2: float  # mean over targets of the out-of-fold R²
    r2_per_target: np.ndarray
    p_value: float  # permutation p-value of r2
    null_r2: np.ndarray = field(repr=False)
    n_features_used: int = 0

    def _display_items(self):
        return [("r2", self.r2), ("p_value", self.p_value), ("targets", len(self.r2_per_target)),
                ("null_r2_mean", float(self.null_r2.mean()) if len(self.null_r2) else float("nan")),
                ("permutations", len(self.null_r2)), ("n_features_used", self.n_features_used)]

    def to_dict(self) -> dict:
        return {"r2": self.r2, "p_value": self.p_value, "n_features_used": self.n_features_used,
                "null_r2_mean": float(self.null_r2.mean()) if len(self.null_r2) else None,
                "null_r2_95": float(np.quantile(self.null_r2, 0.95)) if len(self.null_r2) else None}


def _ridge_predict(Xtr: np.ndarray, Ytr: np.ndarray, Xte: np.ndarray, alphas=ALPHAS) -> np.ndarray:
    """Ridge on centred/scaled ``Xtr`` (kernel form, cheap when features outnumber
    prompts); alpha chosen by the closed-form leave-one-out error; predictions at ``Xte``."""
    lam, U = np.linalg.eigh(Xtr @ Xtr.T)
    lam = lam.clip(0.0)
    UtY = U.T @ Ytr
    best = None
    for alpha in alphas:
        d = lam / (lam + alpha)
        fitted = U @ (d[:, None] * UtY)
        # leverage of the centred design plus that of the intercept (1/n; the centred
        # columns are orthogonal to the constant)
        hat_diag = (U**2 * d).sum(1) + 1.0 / len(Xtr)
        loo = (Ytr - fitted) / (1 - hat_diag)[:, None].clip(1e-12)
        err = float((loo**2).sum())
        if best is None or err < best[0]:
            best = (err, alpha)
    alpha = best[1]
    return (Xte @ Xtr.T) @ (U @ (UtY / (lam + alpha)[:, None]))


def _cv_predictions(X: np.ndarray, Y: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, int]:
    pred = np.zeros_like(Y)
    used = 0
    for fold in np.unique(folds):
        train, test = folds != fold, folds == fold
        x_mean, y_mean = X[train].mean(0), Y[train].mean(0)
        x_std = X[train].std(0)
        scale = float(np.sqrt((X[train] ** 2).mean()))
        keep = x_std > CONSTANT_TOLERANCE * scale
        used = max(used, int(keep.sum()))
        if not keep.any():
            pred[test] = y_mean
            continue
        Xtr = (X[train][:, keep] - x_mean[keep]) / x_std[keep]
        Xte = (X[test][:, keep] - x_mean[keep]) / x_std[keep]
        pred[test] = _ridge_predict(Xtr, Y[train] - y_mean, Xte) + y_mean
    return pred, used


def _r2(Y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    sst = ((Y - Y.mean(0)) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1 - ((Y - pred) ** 2).sum(0) / sst, np.nan)


def probe(
    features: np.ndarray,
    targets: np.ndarray,
    *,
    n_folds: int = 5,
    n_permutations: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> ProbeResult:
    """Out-of-fold R² of a ridge probe ``features -> targets`` and its permutation p-value.

    Args:
        features: ``[prompt, feature]``; constant columns are dropped (a probe on constant
            features predicts the training mean, i.e. chance).
        targets: ``[prompt, k]`` (or ``[prompt]``); targets constant over prompts are dropped.
        n_permutations: permutations of the prompts' targets for the null (``p = (1 + #{null
            >= observed}) / (1 + n)``).
    """
    X = np.asarray(features, dtype=np.float64)
    Y = np.asarray(targets, dtype=np.float64)
    Y = Y[:, None] if Y.ndim == 1 else Y
    if len(X) != len(Y) or len(X) < 2 * n_folds:
        raise ValueError(
            f"{len(X)} prompts of features for {len(Y)} of targets; need equal counts and at "
            f"least {2 * n_folds} prompts for {n_folds}-fold cross-validation. Fix: use more prompts."
        )
    Y = Y[:, Y.std(0) > 0]
    if Y.shape[1] == 0:
        raise ValueError("every target is constant over the prompts: nothing to predict.")
    rng = np.random.default_rng(seed)
    folds = rng.permutation(np.arange(len(X)) % n_folds)
    pred, used = _cv_predictions(X, Y, folds)
    per_target = _r2(Y, pred)
    observed = float(np.nanmean(per_target))
    if used == 0:
        # Constant features: the probe predicts the training mean whatever the prompt, so
        # it carries no information by construction (p = 1, no permutations needed).
        return ProbeResult(observed, per_target, 1.0, np.array([]), 0)
    null = np.array([
        float(np.nanmean(_r2(Yp, _cv_predictions(X, Yp, folds)[0])))
        for Yp in (Y[rng.permutation(len(Y))] for _ in tqdm(
            range(n_permutations), desc="probe permutations", disable=not progress, leave=False))
    ])
    p_value = (1 + int((null >= observed - 1e-12).sum())) / (1 + n_permutations)
    return ProbeResult(observed, per_target, p_value, null, used)


def probe_table(
    fp: Fingerprint, targets: np.ndarray, *, kinds: Iterable[str] = FEATURE_KINDS,
    n_folds: int = 5, n_permutations: int = 100, seed: int = 0, progress: bool = False,
) -> pd.DataFrame:
    """One row per feature kind: out-of-fold R², permutation p-value, features used.
    ``progress``: a progress bar over the feature kinds (and each one's permutations)."""
    rows = []
    for kind in tqdm(list(kinds), desc="fingerprint probe", disable=not progress):
        result = probe(fp.features(kind), targets, n_folds=n_folds, n_permutations=n_permutations,
                       seed=seed, progress=progress)
        rows.append({"features": kind, **result.to_dict()})
    return pd.DataFrame(rows)
