"""Everything an analysis knows about one head: :meth:`rope_leak.Analysis.head`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rope_leak.display import Displayable
from rope_leak.fits.profiles import Profiles
from rope_leak.heads import head_label

#: The numbers :meth:`HeadResult.summary` and the repr show, in order.
KEY_NUMBERS = (
    "L_total_debiased", "L_total_ci_low", "L_total_ci_high", "L_total_qvalue",
    "L_resid_debiased", "L_resid_ci_low", "L_resid_ci_high",
    "L_mask_debiased", "L_mask_ci_low", "L_mask_ci_high",
    "sink_score", "sink_head", "additivity_violated", "L_total_significant",
)


@dataclass(repr=False)
class HeadResult(Displayable):
    """One head of an :class:`rope_leak.Analysis`.

    Attributes:
        layer, head: the head.
        target, condition: the response and mask the profiles are fitted on.
        numbers: the head's row of ``Analysis.heads()`` (every column: debiased shares
            with CIs, cross-fitted shares, R² of each model, sink score, flags);
            ``result["sink_score"]`` reads one.
        profiles: the fitted ``M_abs`` coefficients ``a[d]``, ``b[i]``, ``c[j]`` (see
            :mod:`rope_leak.fits.profiles` for their gauge).
    """

    layer: int
    head: int
    target: str
    condition: str
    numbers: pd.Series
    profiles: Profiles

    @property
    def label(self) -> str:
        return head_label(self.layer, self.head)

    @property
    def a(self) -> pd.Series:
        """Offset profile ``a[d]``, indexed by ``d = i - j``."""
        return self.profiles.offset

    @property
    def b(self) -> pd.Series:
        """Query profile ``b[i]`` (absolute query position)."""
        return self.profiles.query

    @property
    def c(self) -> pd.Series:
        """Key profile ``c[j]`` (absolute key position)."""
        return self.profiles.key

    def __getitem__(self, column: str):
        if column not in self.numbers.index:
            raise KeyError(f"{column!r} is not a number of this head. Fix: use one of "
                           f"{', '.join(self.numbers.index[:12])}, ... (see .numbers).")
        return self.numbers[column]

    def summary(self) -> dict:
        """The key numbers as plain Python values."""
        out = {"label": self.label}
        for key in KEY_NUMBERS:
            value = self.numbers.get(key)
            if value is not None:
                out[key] = bool(value) if isinstance(value, (bool, np.bool_)) else float(value)
        return out

    def _display_items(self):
        n = self.numbers
        ci = lambda name: (f"{n[name + '_debiased']:.4f} [{n[name + '_ci_low']:.4f}, "  # noqa: E731
                           f"{n[name + '_ci_high']:.4f}]")
        flags = [name for name in ("degenerate", "sink_head", "additivity_violated")
                 if bool(n.get(name, False))]
        return [
            ("label", self.label), ("target", self.target),
            ("L_total", ci("L_total")), ("L_resid", ci("L_resid")), ("L_mask", ci("L_mask")),
            ("sink_score", float(n["sink_score"])), ("flags", ", ".join(flags) or "none"),
            ("profiles", f"a[{len(self.a)} offsets], b[{len(self.b)} queries], c[{len(self.c)} keys] "
                         f"({self.condition})"),
        ]
