"""Analyses: what a user runs on a model and a corpus.

The decomposition (:mod:`~rope_leak.analyses.analysis`, one head at a time through
:mod:`~rope_leak.analyses.head_result`); sinks in one place (:mod:`~rope_leak.analyses.sinks`
over :mod:`~rope_leak.analyses.sink_scores`, :mod:`~rope_leak.analyses.sink_reading`,
:mod:`~rope_leak.analyses.trajectory`, :mod:`~rope_leak.analyses.fingerprint`,
:mod:`~rope_leak.analyses.bos_status`); the BOS interventions
(:mod:`~rope_leak.analyses.bos_interventions`); architectures and RoPE controls
(:mod:`~rope_leak.analyses.architectures`); activation patching
(:mod:`~rope_leak.analyses.patching`); notebook helpers (:mod:`~rope_leak.analyses.explore`).
"""
