"""Figures and report content without a browser: labels, units, hover numbers, shared
colour scales, summary at the top, optional CI columns."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from rope_leak.analysis import analyze
from rope_leak.corpus import make_random_corpus
from rope_leak.explore import head_cell_maps, share_intervals
from rope_leak.models import TINY_BOS_TOKEN_ID, tiny_rope_model
from rope_leak.plots import all_figures, head_fit_figure, sink_map
from rope_leak.report import write_report


@pytest.fixture(scope="module")
def analysis():
    model = tiny_rope_model(seed=1)
    tokens = make_random_corpus(8, 20, model.cfg.d_vocab, seed=1, bos_token_id=TINY_BOS_TOKEN_ID).tokens
    return analyze(model, tokens, progress=False)


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


def test_report_summary_and_optional_intervals(analysis, tmp_path):
    plain = write_report(analysis, tmp_path / "plain.html").read_text()
    assert plain.index("Summary") < plain.index("plotly-graph-div")
    assert "No confidence intervals" in plain and "95% CI" not in plain
    assert "Sink heads" in plain and "composition" in plain
    intervals = share_intervals(analysis, n_boot=50)
    with_ci = write_report(analysis, tmp_path / "ci.html", intervals=intervals).read_text()
    assert "95% CI" in with_ci and 'id="fig-intervals"' in with_ci
    assert not re.search(r"<script[^>]+src=", with_ci)
    # the intervals' point estimates are the report's L_total
    heads = analysis.heads().set_index("label")
    np.testing.assert_allclose(intervals.set_index("label")["estimate"],
                               heads.loc[intervals["label"], f"{analysis.target}_L_total"], atol=1e-9)
    assert isinstance(intervals, pd.DataFrame)
