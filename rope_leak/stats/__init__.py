"""Statistics of the absolute-position share: bootstrap intervals, per-head nulls,
Benjamini–Hochberg FDR and a debiased share (definitions: docs/method.md).

Corpus stratification (``sampling``) is not here: it belongs with the corpus code.
"""

from rope_leak.stats.bootstrap import (
    BootstrapResult,
    bootstrap_shares,
    bootstrap_statistic,
    bucket_weights,
)
from rope_leak.stats.debias import crossfit_bias, debiased_share
from rope_leak.stats.fdr import FDRResult, benjamini_hochberg
from rope_leak.stats.nulls import NullResult, permutation_null, signflip_null
from rope_leak.stats.projection import BucketProjection, absolute_basis

__all__ = [
    "BootstrapResult",
    "BucketProjection",
    "FDRResult",
    "NullResult",
    "absolute_basis",
    "benjamini_hochberg",
    "bootstrap_shares",
    "bootstrap_statistic",
    "bucket_weights",
    "crossfit_bias",
    "debiased_share",
    "permutation_null",
    "signflip_null",
]
