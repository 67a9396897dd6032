"""Text for a BOS status (a dict from :func:`rope_leak.analyses.bos_status.bos_status`):
the short label tables show and the line on the measured position-0 spread."""

from __future__ import annotations

from rope_leak.quantities import NOT_ESTIMABLE  # noqa: F401 (re-exported)


def bos_label(status: dict | None) -> str:
    """A short label for tables: ``"BOS (id 1)"``, ``"no BOS (model prepends none)"``..."""
    if not status:
        return "unknown"
    if status["position_zero"] == "bos":
        return f"BOS (id {status['bos_token_id']}) at 0"
    if status["position_zero"] == "mixed":
        return f"BOS at 0 in {status['prompts_with_bos_at_position_zero']} of {status['n_prompts']}"
    return "no BOS (model prepends none)" if not status["model_prepends_bos"] else "no BOS (prompts lack it)"


def spread_text(status: dict | None) -> str:
    """One line on the measured position-0 spread, with "not estimable" where it is."""
    if not status or not status.get("measured"):
        return "position-0 spread by token: not measured"
    fmt = lambda v: NOT_ESTIMABLE if v is None else f"{v:.3g}"  # noqa: E731
    return (f"position-0 stream (causal), max over depths: cross-prompt std "
            f"{fmt(status['max_cross_prompt_std'])}, between tokens {fmt(status['max_between_token_std'])}, "
            f"within a token {fmt(status['max_within_token_std'])} "
            f"({status['n_tokens_at_position_zero']} position-0 tokens, {status['n_tokens_repeated']} held by "
            f"two or more prompts)")
