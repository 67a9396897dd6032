"""Figures and report content without a browser: labels, units, hover numbers, shared
colour scales, summary at the top, optional CI columns."""

from __future__ import annotations

import re

import numpy as np
import pytest

from rope_leak.analyses.analysis import analyze
from rope_leak.analyses.explore import head_cell_maps
from rope_leak.backends import TINY_BOS_TOKEN_ID, tiny_rope_model
from rope_leak.corpus import make_random_corpus
from rope_leak.output.plots import all_figures, head_fit_figure, sink_map
from rope_leak.output.report import write_report


@pytest.fixture(scope="module")
def analysis():
    model = tiny_rope_model(seed=1)
    tokens = make_random_corpus(8, 20, model.cfg.d_vocab, seed=1, bos_token_id=TINY_BOS_TOKEN_ID).tokens
    return analyze(model, tokens, progress=False, cell_maps=True)


def test_figures_are_labelled(analysis):
    for name, fig in all_figures(analysis).items():
        layout = fig.layout
        assert layout.title.text, name
        axes = [a for k, a in layout.to_plotly_json().items() if k.startswith(("xaxis", "yaxis"))]
        assert any(a.get("title", {}).get("text") for a in axes), f"{name}: no axis title"
        for trace in fig.data:
            assert trace.hovertemplate and "%{" in trace.hovertemplate, f"{name}: no hover numbers"


def test_compared_heatmaps_share_one_colour_scale(analysis):
    for fig in (all_figures(analysis)["shares"], sink_map(analysis)):
        heatmaps = [t for t in fig.data if t.type == "heatmap"]
        assert len({(t.zmin, t.zmax, str(t.colorscale)) for t in heatmaps}) == 1
        assert all(re.fullmatch(r"L\dH\d", c) for c in np.asarray(heatmaps[0].customdata).ravel())
    fig = head_fit_figure(head_cell_maps(analysis, 1, 0), "L1H0")
    residuals = [t for t in fig.data if t.colorbar.title.text == "residual"]
    assert len(residuals) == 2
    assert len({(t.zmin, t.zmax) for t in residuals}) == 1 and residuals[0].zmin == -residuals[0].zmax


def test_report_summary_has_intervals(analysis, tmp_path):
    page = write_report(analysis, tmp_path / "report.html").read_text()
    assert page.index("Summary") < page.index("plotly-graph-div")
    assert "95% CI" in page and 'id="fig-intervals"' in page
    assert "Sink heads" in page and "composition" in page
    assert not re.search(r"<script[^>]+src=", page)
    # the top-heads table shows the analysis' own debiased estimates and bounds
    top = analysis.top_heads(1).iloc[0]
    assert f"[{top['L_total_ci_low']:.4f}, {top['L_total_ci_high']:.4f}]" in page
