"""Output: results as DataFrames and files (:mod:`~rope_leak.output.results`), plotly figures
(:mod:`~rope_leak.output.plots`, :mod:`~rope_leak.output.plots_sinks`,
:mod:`~rope_leak.output.plots_architectures`), the self-contained HTML report
(:mod:`~rope_leak.output.report`), and shards, merge and checkpoints
(:mod:`~rope_leak.output.shards`).

Output sits below the analyses: it renders and writes the objects they return, and imports
their types only for annotations.
"""
