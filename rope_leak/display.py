"""Short ``__repr__`` and small ``_repr_html_`` tables for result objects.

A result object lists what it wants shown in ``_display_items()`` (name, value pairs);
:class:`Displayable` turns that into a one-line ``repr`` of at most :data:`MAX_REPR`
characters and a small HTML table for notebooks. Arrays, tables and long lists are
shown by shape or length, never dumped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch

MAX_REPR = 400
MAX_ITEMS = 6


def brief(value: Any, max_len: int = 60) -> str:
    """A short text for one value: arrays and tables by shape, numbers to 4 digits."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"<{'x'.join(map(str, value.shape)) or 'scalar'} {dtype}>"
    if isinstance(value, pd.DataFrame):
        return f"<table {value.shape[0]} rows x {value.shape[1]} cols>"
    if isinstance(value, pd.Series):
        return f"<series of {len(value)}>"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ITEMS or any(isinstance(v, (list, tuple, dict, np.ndarray)) for v in value):
            shown = ", ".join(brief(v, 20) for v in value[:3])
            more = f", ... ({len(value)} in all)" if len(value) > 3 else ""
            text = f"[{shown}{more}]"
        else:
            text = "[" + ", ".join(brief(v, 20) for v in value) + "]"
        return text if len(text) <= max_len else text[: max_len - 4] + "...]"
    if isinstance(value, dict):
        return f"<dict of {len(value)}>"
    if value is None or isinstance(value, str):
        text = repr(value)
    else:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= max_len else text[: max_len - 4] + "...'"


def short_repr(name: str, items: Iterable[tuple[str, Any]], max_len: int = MAX_REPR) -> str:
    """``Name(key=value, ...)`` with :func:`brief` values, cut at ``max_len`` characters."""
    body = ", ".join(f"{key}={brief(value)}" for key, value in items)
    text = f"{name}({body})"
    return text if len(text) <= max_len else text[: max_len - 4] + "...)"


def html_table(title: str, items: Iterable[tuple[str, Any]]) -> str:
    """A two-column HTML table (escaped), headed by ``title``."""
    rows = "".join(
        f"<tr><th style='text-align:left'>{html.escape(str(key))}</th>"
        f"<td style='text-align:left'>{html.escape(value if isinstance(value, str) else brief(value, 120))}</td></tr>"
        for key, value in items
    )
    return (f"<table><caption style='text-align:left'><b>{html.escape(title)}</b></caption>"
            f"{rows}</table>")


class Displayable:
    """Mixin: ``__repr__`` and ``_repr_html_`` from ``_display_items()``.

    Dataclasses using it must pass ``repr=False`` to ``@dataclass`` (otherwise the
    generated ``__repr__``, which prints every array, replaces this one)."""

    def _display_items(self) -> list[tuple[str, Any]]:  # pragma: no cover - overridden
        return []

    def _display_name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        try:
            items = self._display_items()
        except Exception as err:  # a repr must not raise
            items = [("unavailable", f"{type(err).__name__}: {err}")]
        return short_repr(self._display_name(), items)

    def _repr_html_(self) -> str:
        try:
            items = self._display_items()
        except Exception as err:
            items = [("unavailable", f"{type(err).__name__}: {err}")]
        return html_table(self._display_name(), items)
