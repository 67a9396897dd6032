"""Fits: the position models over a pair design, from the engine's sufficient statistics.

``M_rel`` (offset), ``M_abs`` (offset + query + key) and the optional per-cell ``M_cell``
(:mod:`~rope_leak.fits.position_models`, :mod:`~rope_leak.fits.shares`); each head's
fitted profiles (:mod:`~rope_leak.fits.profiles`); the debiased share and the per-bucket
projection it and the inference work from (:mod:`~rope_leak.fits.debias`,
:mod:`~rope_leak.fits.projection`); the mask/residual decomposition and its depth profile
(:mod:`~rope_leak.fits.decomposition`, :mod:`~rope_leak.fits.depth`); the gauge-invariant
renormalisation split (:mod:`~rope_leak.fits.split`); degenerate heads
(:mod:`~rope_leak.fits.degenerate`). Definitions: ``docs/method.md``.
"""
