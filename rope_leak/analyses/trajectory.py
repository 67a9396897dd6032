"""The position-0 trajectory: position 0's residual stream through the layers, grouped
by the token that sits at position 0.

Under the causal mask position 0 attends only to itself, so its trajectory is a
function of its token alone: prompts sharing the position-0 token have *identical*
trajectories (cross-prompt spread exactly 0), prompts with different tokens have
different ones. Under the bidirectional ablation position 0 sees the whole prompt and
the spread becomes non-zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from scipy.spatial.distance import pdist
from torch import Tensor
from transformer_lens import HookedTransformer

from rope_leak.backends.requirements import require_rope
from rope_leak.display import Displayable
from rope_leak.interventions.position_zero_patch import record_position_zero


@dataclass(repr=False)
class Trajectories(Displayable):
    """``resid[p, d, :]`` = residual stream at position 0 of prompt ``p`` at depth ``d``
    (``hook_resid_pre`` of layer ``d``; the last depth is the final ``hook_resid_post``)."""

    resid: np.ndarray  # [prompt, depth, d_model], float64
    position_zero_tokens: np.ndarray  # [prompt]
    condition: str = "causal"
    forced_tokens: bool = False

    @property
    def n_depths(self) -> int:
        return self.resid.shape[1]

    def _display_items(self):
        return [("condition", self.condition), ("prompts", self.resid.shape[0]),
                ("depths", self.n_depths), ("tokens", sorted(self.groups())),
                ("max_within_token_deviation", self.max_within_token_deviation())]

    def groups(self) -> dict[int, np.ndarray]:
        return {int(t): np.nonzero(self.position_zero_tokens == t)[0]
                for t in np.unique(self.position_zero_tokens)}

    def within_token_spread(self) -> pd.DataFrame:
        """Per position-0 token and depth: the number of prompts, the largest absolute
        deviation from the group's first prompt and the cross-prompt std (root-mean over
        the model dimension). A token held by one prompt only has no within-token spread to
        estimate: both are NaN ("not estimable"), never 0."""
        rows = []
        for token, idx in self.groups().items():
            group = self.resid[idx]
            dev = np.full(self.n_depths, np.nan)
            std = np.full(self.n_depths, np.nan)
            if len(idx) > 1:
                dev = np.abs(group - group[:1]).max(axis=(0, 2))
                std = np.sqrt((group.std(0, ddof=1) ** 2).mean(-1))
                std[dev == 0] = 0.0
            for depth in range(self.n_depths):
                rows.append({"token": token, "depth": depth, "n_prompts": len(idx),
                             "max_abs_deviation": float(dev[depth]), "std": float(std[depth])})
        return pd.DataFrame(rows)

    def within_token_estimable(self) -> bool:
        """Whether some position-0 token is held by at least two prompts."""
        return any(len(idx) > 1 for idx in self.groups().values())

    def max_within_token_deviation(self) -> float | None:
        """Largest within-token deviation over tokens and depths; None when no token is held
        by two prompts (not estimable)."""
        if not self.within_token_estimable():
            return None
        return float(self.within_token_spread()["max_abs_deviation"].max())

    def between_token_distance(self) -> pd.DataFrame:
        """Per depth: the smallest and mean distance between the trajectories of two
        different position-0 tokens (first prompt of each group), relative to the mean
        norm of the position-0 stream at that depth."""
        groups = self.groups()
        reps = np.stack([self.resid[idx[0]] for idx in groups.values()])  # [token, depth, d]
        rows = []
        for depth in range(self.n_depths):
            x = reps[:, depth]
            norm = float(np.linalg.norm(x, axis=-1).mean())
            dists = pdist(x)  # every pair of different tokens
            found = len(dists) > 0
            rows.append({
                "depth": depth,
                "min_distance": float(dists.min()) if found else np.nan,
                "mean_distance": float(dists.mean()) if found else np.nan,
                "relative_min_distance": float(dists.min()) / norm if found and norm > 0 else np.nan,
                "mean_norm": norm,
            })
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        """JSON summary; within-token numbers are None where not estimable (no token held by
        two prompts), and ``forced_tokens`` says whether the position-0 tokens were put there
        by the caller (then a within-token deviation of 0 under the causal mask is the
        closed-system property checked, not a property of the corpus)."""
        spread = self.within_token_spread()
        estimable = self.within_token_estimable()
        per_depth = spread.groupby("depth")["std"].max()  # NaN-skipping: only estimable groups
        return {
            "condition": self.condition,
            "tokens": sorted(self.groups()),
            "forced_tokens": self.forced_tokens,
            "prompts_per_token": {str(t): int(len(i)) for t, i in self.groups().items()},
            "within_token_estimable": estimable,
            "max_within_token_deviation": self.max_within_token_deviation(),
            "within_token_std": [None if not np.isfinite(v) else float(v) for v in per_depth.tolist()],
            "between_token_relative_min_distance":
                self.between_token_distance()["relative_min_distance"].tolist(),
        }


def position_zero_trajectories(
    model: HookedTransformer,
    tokens: Int[Tensor, "prompt pos"],
    position_zero_tokens: Sequence[int] | Tensor | None = None,
    *,
    condition: Callable[[HookedTransformer], ContextManager] | None = None,
    condition_name: str | None = None,
    batch_size: int = 8,
) -> Trajectories:
    """Record the position-0 trajectory of every prompt.

    Args:
        position_zero_tokens: token to put at position 0 of each prompt (``[prompt]``);
            default: keep the prompts' own position-0 tokens.
        condition: an intervention (``model -> context manager``), e.g.
            ``rope_leak.interventions.mask.bidirectional``; default: the causal model.
    """
    require_rope(model, "position_zero_trajectories")
    tokens = tokens.clone().long()
    if position_zero_tokens is not None:
        pz = torch.as_tensor(position_zero_tokens).long()
        if pz.shape != (len(tokens),):
            raise ValueError(
                f"position_zero_tokens has shape {tuple(pz.shape)}; expected ({len(tokens)},), "
                "one token per prompt."
            )
        tokens[:, 0] = pz
    rows = []
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size]
        if condition is None:
            rows.append(record_position_zero(model, batch))
        else:
            with condition(model):
                rows.append(record_position_zero(model, batch))
    resid = torch.cat(rows, 1).permute(1, 0, 2).double().numpy()
    name = condition_name or ("causal" if condition is None else getattr(condition, "__name__", "condition"))
    return Trajectories(resid, tokens[:, 0].numpy().copy(), name,
                        forced_tokens=position_zero_tokens is not None)
