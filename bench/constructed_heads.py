"""Three decompositions on heads whose answer is known by construction (not a test).

For each constructed head (noise-free scores, one prompt pattern) and length n: the
completed split through rope_leak's engine (scores injected by a hook on a tiny float64
model, w = 32, queries w <= i <= n - 2), and two per-cell references of the decompositions it
replaces: the renormalisation split (softmax over all keys) and the bidirectional
ablation (mask share ``1 - L_resid / L_total`` of ``log A``). Writes
``docs/constructed_heads.md``.

    python -m bench.constructed_heads                  # n = 64, 256, 1024 (references to 256)
    python -m bench.constructed_heads --n 64,256,1024,4096
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import numpy as np

from tests.fits.test_start_cut import engine_split
from tests.reference_start_cut import (
    absolute_part,
    causal_log_pattern,
    constructed_scores,
    full_log_pattern,
    renormalisation_split_reference,
    scored_cells,
)

KINDS = {
    "power_law": ("relative", "mask"),
    "rope_cosines": ("relative", "mask"),
    "linear_key": ("relative (gauge)", "mask"),
    "broad": ("relative, p = 0.8", "mask"),
    "key_effect": ("absolute key effect", "scores"),
    "temperature": ("temperature growing with i", "scores"),
    "varying_sink": ("sink growing with i", "scores"),
    "constant_sink": ("constant sink", "mask"),
}
REFERENCE_MAX_N = 256  # the per-cell references build dense designs


def ablation_share(scores: np.ndarray) -> float:
    """The ablation's mask share of ``log A`` on the causal cells 1 <= j <= i."""
    n = len(scores)
    qi, kj = scored_cells(n)
    shares = []
    for log_a in (causal_log_pattern(scores), full_log_pattern(scores)):
        cells = log_a[qi, kj]
        d = absolute_part(cells, qi, kj)
        shares.append(float(d @ d) / float(((cells - cells.mean()) ** 2).sum()))
    return 1.0 - shares[1] / shares[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="64,256,1024")
    parser.add_argument("--out", default="docs/constructed_heads.md")
    args = parser.parse_args()
    lengths = [int(v) for v in args.n.split(",")]
    kinds = list(KINDS)
    rows = []
    for n in lengths:
        split = engine_split(kinds, n, prompts=4)
        table = split.head_table()
        for h, kind in enumerate(kinds):
            row = {"head": kind, "kind": KINDS[kind][0], "answer": KINDS[kind][1], "n": n,
                   "completed mask share": table["mask_share"][0, h], "completed cross": table["cross"][0, h],
                   "renormalisation mask share": np.nan, "renormalisation cross": np.nan,
                   "ablation mask share": np.nan}
            if n <= REFERENCE_MAX_N:
                s = constructed_scores(kind, n)
                renorm = renormalisation_split_reference(s)
                row["renormalisation mask share"] = renorm["mask_share"]
                row["renormalisation cross"] = renorm["cross"]
                row["ablation mask share"] = ablation_share(s)
            rows.append(row)
            print(row, file=sys.stderr)
    columns = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) and np.isfinite(v) else ("–" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [
        "# Decompositions on constructed heads",
        "",
        "Heads whose answer is known by construction (noise-free scores; `answer`: where all of "
        "`log A`'s absolute position belongs). *Completed* is rope_leak's decomposition, through "
        "its engine (w = 32, queries w <= i <= n - 2). *Renormalisation* (softmax over every key, future "
        "keys included) and *ablation* (the causal mask swapped for a bidirectional one) are "
        "per-cell references of the two decompositions it replaces, on the causal cells "
        f"1 <= j <= i (computed up to n = {REFERENCE_MAX_N}; – beyond). Mask shares and cross terms "
        "are fractions of SS(D log A). Head definitions: `tests/reference_start_cut.py`.",
        "",
        f"Command: `python -m bench.constructed_heads --n {args.n}`; "
        f"{datetime.date.today().isoformat()}; {platform.machine()}, Python {platform.python_version()}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
