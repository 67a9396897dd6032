"""Interventions: context managers that change how the model runs and restore it exactly
on exit, also when the body raises."""

from rope_leak.interventions.mask import bidirectional, causal
from rope_leak.interventions.position_zero import mean_embedding, replace_position_zero

__all__ = ["bidirectional", "causal", "mean_embedding", "replace_position_zero"]
