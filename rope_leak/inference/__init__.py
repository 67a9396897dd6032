"""Inference on the fitted shares: bootstrap intervals over prompt buckets, per-head
sign-flip and permutation nulls, Benjamini–Hochberg FDR, and the per-head intervals of a
decomposition (:mod:`~rope_leak.inference.intervals`). Definitions: ``docs/method.md``.
"""

from rope_leak.inference.bootstrap import (
    BootstrapResult,
    bootstrap_shares,
    bootstrap_statistic,
    bucket_weights,
)
from rope_leak.inference.fdr import FDRResult, benjamini_hochberg
from rope_leak.inference.nulls import NullResult, permutation_null, signflip_null

__all__ = [
    "BootstrapResult",
    "FDRResult",
    "NullResult",
    "benjamini_hochberg",
    "bootstrap_shares",
    "bootstrap_statistic",
    "bucket_weights",
    "permutation_null",
    "signflip_null",
]
