"""Interventions: context managers that change how the model runs and restore it exactly
on exit, also when the body raises."""

from rope_leak.interventions.key_position_removal import remove_key_positions
from rope_leak.interventions.mask import bidirectional, causal
from rope_leak.interventions.position_zero import mean_embedding, replace_position_zero
from rope_leak.interventions.start_cut_removal import remove_start_cut

__all__ = ["bidirectional", "causal", "mean_embedding", "remove_key_positions", "remove_start_cut",
           "replace_position_zero"]
