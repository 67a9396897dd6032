"""Conditions: an intervention as a callable ``model -> context manager``, and the one way
to combine several into one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager

from transformer_lens import HookedTransformer

Condition = Callable[[HookedTransformer], ContextManager]
"""A condition is a callable ``model -> context manager`` (an intervention)."""


def compose(*conditions: Condition | None) -> Condition:
    """A condition that enters ``conditions`` in order (the first outermost; None entries
    are skipped, and no condition at all leaves the model as it is). Exits run in reverse
    order, also on error, so each intervention restores what it changed."""
    chosen = [c for c in conditions if c is not None]

    @contextlib.contextmanager
    def composed(model: HookedTransformer) -> Iterator[HookedTransformer]:
        with contextlib.ExitStack() as stack:
            for condition in chosen:
                stack.enter_context(condition(model))
            yield model

    return composed
