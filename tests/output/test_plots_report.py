"""Figures and report content without a browser: labels, units, hover numbers, shared
colour scales, summary at the top, optional CI columns."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from rope_leak.analyses.analysis import analyze
from rope_leak.analyses.explore import head_cell_maps
from rope_leak.analyses.sink_reading import SinkReading
from rope_leak.backends import TINY_BOS_TOKEN_ID, tiny_rope_model
from rope_leak.corpus import make_random_corpus
from rope_leak.output.explorer import explorer_data
from rope_leak.output.plots import (
    SHARE_AXIS,
    all_figures,
    decompositions_by_layer,
    head_fit_figure,
    pattern_figure,
    sink_map,
)
from rope_leak.output.records import AnalysisRecord, SinkRecord
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
    residuals = [t for t in fig.data if t.type == "heatmap" and t.colorbar.title.text == "residual"]
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


# -- the head explorer ---------------------------------------------------------------------------
def embedded_explorer_data(page: str) -> dict:
    match = re.search(r"<script type='application/json' id='explorer-data'>(.*?)</script>", page, re.S)
    assert match, "the report has no explorer data"
    return json.loads(match.group(1))


def assert_rounded(embedded, reference, digits: int = 4):
    """``embedded`` equals ``reference`` to ``digits`` significant digits (NaN as None)."""
    reference = np.asarray(reference, dtype=float)
    embedded = np.array([np.nan if v is None else v for v in embedded], dtype=float)
    assert embedded.shape == reference.shape
    np.testing.assert_array_equal(np.isnan(embedded), np.isnan(reference))
    ok = ~np.isnan(reference)
    np.testing.assert_allclose(embedded[ok], reference[ok], rtol=0.5 * 10 ** (1 - digits), atol=1e-300)


def test_report_explorer_holds_each_heads_numbers(analysis, tmp_path):
    reading = SinkReading(  # head L1H2 reads position 0 (relative change 0.2), the rest do not
        diff_sumsq=np.full((2, 2, 4), 0.05**2), base_sumsq=np.ones((2, 2, 4)),
        per_prompt_key0_fraction=np.zeros((2, 2, 4)), source_token_id=3)
    reading.diff_sumsq[:, 1, 2] = 0.2**2
    sinks = SinkRecord(summary={}, heads=reading.table(), trajectory_within=pd.DataFrame(),
                       trajectory_between=pd.DataFrame(), reading_threshold=reading.threshold,
                       source_token_id=3, reading_prompts=reading.n_prompts)
    page = write_report(analysis, tmp_path / "report.html", sinks=sinks).read_text()
    assert "id='section-explorer'" in page and "id='explorer-select'" in page
    assert page.index("id='summary'") < page.index("id='section-explorer'") < page.index("id='section-shares'")
    assert page.count("<option value=") == analysis.n_layers * analysis.n_heads
    data = embedded_explorer_data(page)
    n_heads = analysis.n_heads
    for layer, head in ((0, 0), (1, 2), (1, 3)):
        result = analysis.head(layer, head)
        i = layer * n_heads + head
        assert data["labels"][i] == result.label
        for name, values in data["numbers"].items():
            if name.startswith("sink_reading"):
                continue
            value = result[name]
            if isinstance(value, (bool, np.bool_)):
                assert values[i] is bool(value), name
            else:
                assert_rounded([values[i]], [value])
        for key, series in (("a", result.a), ("b", result.b), ("c", result.c)):
            assert data[{"a": "offsets", "b": "queries", "c": "keys"}[key]] == series.index.tolist()
            assert_rounded(data["profiles"][key][i], series.to_numpy())
    flags = np.array(data["numbers"]["sink_reading"]).reshape(2, 4)
    assert flags.sum() == 1 and flags[1, 2]
    assert_rounded(data["numbers"]["sink_reading_change"][6:7], [0.2])
    # mean patterns of the top heads (cell maps kept): the observed cell means of each
    top = analysis.heads().query("~degenerate").nlargest(len(data["patterns"]), "L_total_debiased")
    assert sorted(data["patterns"]) == sorted(top["label"])
    label = top["label"].iloc[0]
    pattern = data["patterns"][label]
    assert pattern["step"] == 1  # n = 20: no block averaging
    observed = head_cell_maps(analysis, label)["observed"]
    assert_rounded([v for row in pattern["z"] for v in row], observed.ravel())


def test_explorer_block_means_and_without_cell_maps(analysis):
    data = explorer_data(analysis, pattern_heads=1, pattern_side=6)
    (label, pattern), = data["patterns"].items()
    step = pattern["step"]
    observed = head_cell_maps(analysis, label)["observed"]
    assert step == 4  # ceil(20 / 6)
    for r, row in enumerate(pattern["z"]):
        for c, value in enumerate(row):
            block = observed[r * step:(r + 1) * step, c * step:(c + 1) * step]
            expected = np.nanmean(block) if np.isfinite(block).any() else np.nan
            assert_rounded([value], [expected])
    model = tiny_rope_model(seed=1)
    tokens = make_random_corpus(8, 20, model.cfg.d_vocab, seed=1, bos_token_id=TINY_BOS_TOKEN_ID).tokens
    plain = explorer_data(analyze(model, tokens, progress=False))
    assert plain["patterns"] == {} and plain["cell_maps"] is False
    assert "sink_reading" not in plain["numbers"]


def test_explorer_json_is_compact_and_script_safe(analysis):
    from rope_leak.output.explorer import _json_for_script

    text = _json_for_script({"label": "</script><b>&", "x": 0.123456789})
    assert "</" not in text and "<" not in text and json.loads(text)["label"] == "</script><b>&"
    data = explorer_data(analysis)
    numbers = [v for values in data["profiles"]["a"] for v in values if v is not None]
    assert all(len(f"{abs(v):e}".split("e")[0].rstrip("0").replace(".", "")) <= 4 for v in numbers)


def test_explorer_thins_profiles_beyond_its_budget(analysis):
    """Past the budget each profile is averaged over runs of ``profile_step`` positions."""
    full = explorer_data(analysis, pattern_heads=0)
    n_values = sum(len(v) for name in "abc" for v in full["profiles"][name])
    thin = explorer_data(analysis, pattern_heads=0, profile_budget=n_values // 3)
    step = thin["profile_step"]
    assert step == 3 and full["profile_step"] == 1
    result = analysis.head(1, 1)
    for name, series, axis in (("a", result.a, "offsets"), ("b", result.b, "queries"), ("c", result.c, "keys")):
        values, index = series.to_numpy(), series.index.to_numpy(dtype=float)
        expected = [values[k:k + step].mean() for k in range(0, len(values), step)]
        assert_rounded(thin["profiles"][name][1 * analysis.n_heads + 1], expected)
        assert_rounded(thin[axis], [index[k:k + step].mean() for k in range(0, len(index), step)], digits=8)


def test_explorer_opens_on_the_top_non_degenerate_head(analysis, monkeypatch):
    from rope_leak.output.explorer import explorer_html

    heads = analysis.heads()
    first, second = heads.nlargest(2, "L_total_debiased")["label"]
    assert f"data-first='{first}'" in explorer_html(analysis, pattern_heads=0)
    heads.loc[heads["label"] == first, "degenerate"] = True  # as if the top head were degenerate
    monkeypatch.setattr(type(analysis), "heads", lambda self: heads.copy())
    assert f"data-first='{second}'" in explorer_html(analysis, pattern_heads=0)


def _heatmap(fig, col=1):
    return [t for t in fig.data if t.type == "heatmap"][col - 1]


def _marked_cells(fig):
    return {(int(y), int(x)) for t in fig.data if t.type == "scatter" and t.name == "beyond the colour scale"
            for x, y in zip(t.x, t.y)}


def test_pattern_colour_scale_is_set_by_the_bulk():
    rng = np.random.default_rng(0)
    pattern = np.tril(rng.uniform(0.0, 0.1, (32, 32)))
    pattern[0, 0] = 1.0  # one planted outlier
    fig = pattern_figure({"a": pattern}, "planted")
    assert _heatmap(fig).zmax < 0.1 < 1.0
    assert (0, 0) in _marked_cells(fig)
    assert f"{_heatmap(fig).zmax:.3g}" in fig.layout.title.text  # the range is stated


def test_head_fit_residual_scale_excludes_an_outlier(analysis):
    maps = dict(head_cell_maps(analysis, 1, 0))
    resid = np.array(maps["resid_rel"], dtype=float)
    bulk = np.nanmax(np.abs(resid))
    i, j = np.argwhere(np.isfinite(resid))[-1]
    resid[i, j] = 100 * bulk
    maps["resid_rel"] = resid
    fig = head_fit_figure(maps, "L1H0")
    residuals = [t for t in fig.data if t.type == "heatmap" and t.colorbar.title.text == "residual"]
    assert residuals[0].zmax <= bulk
    assert (int(i), int(j)) in _marked_cells(fig)
    # the two colour bars sit beside the last panel, one above the other
    bars = [t.colorbar for t in fig.data if t.type == "heatmap" and t.showscale]
    assert len(bars) == 2 and bars[0].x is None and bars[1].x is None
    assert bars[0].y - bars[0].len >= bars[1].y + bars[1].len - 1e-9


def test_share_heatmap_titles_do_not_overlap(analysis):
    fig = all_figures(analysis)["shares"]
    titles = sorted((a for a in fig.layout.annotations if a.yref == "paper" and a.y >= 1),
                    key=lambda a: a.x)
    plot_px, char_px = 720, 7.5  # a 1000-pixel-wide figure less its margins and colour bar
    widths = [max(len(line) for line in a.text.split("<br>")) * char_px for a in titles]
    assert len(titles) >= 2
    for (left, w_left), (right, w_right) in zip(zip(titles, widths), zip(titles[1:], widths[1:])):
        assert (right.x - left.x) * plot_px >= (w_left + w_right) / 2, (left.text, right.text)


def test_composition_marks_shares_off_the_axis():
    estimate = np.array([0.5, -3.0, 0.8, 2.0])
    layers = pd.DataFrame({"layer": range(4), "target": "log_pattern", "composition_debiased": estimate,
                           "composition_ci_low": estimate - 0.2, "composition_ci_high": estimate + 0.2})
    record = AnalysisRecord(  # a record built by hand: the figure reads nothing else
        target="log_pattern", targets=("log_pattern",), n_layers=4, n_heads=1, n_prompts=2,
        ci_level=0.95, sink_threshold=0.3, summary={}, settings={}, metadata={}, heads=pd.DataFrame(),
        layers=layers, target_means=pd.DataFrame(), diagnostics=pd.DataFrame(), position_zero={},
        profiles=None)
    fig = decompositions_by_layer(record)
    low, high = SHARE_AXIS
    line = next(t for t in fig.data if t.name.startswith("bidirectional ablation"))
    assert np.isnan(np.asarray(line.y, dtype=float)[[1, 3]]).all()
    off = next(t for t in fig.data if t.name.startswith("off the axis"))
    assert list(off.x) == [1, 3] and all(low <= y <= high for y in off.y)
    assert list(off.marker.symbol) == ["triangle-down", "triangle-up"]
    assert [row[0] for row in off.customdata] == [-3.0, 2.0]  # the value, on hover
    assert fig.layout.yaxis.range == SHARE_AXIS or tuple(fig.layout.yaxis.range) == SHARE_AXIS


def test_legends_leave_the_plots_most_of_the_height(analysis):
    for name in ("composition", "decompositions"):
        layout = all_figures(analysis)[name].layout
        plot = layout.height - layout.margin.t - layout.margin.b
        assert plot >= 0.5 * layout.height, name
    for name in ("composition", "decompositions", "shares"):
        # below the plots in a margin of its own, not in the plots' share of the height
        assert all_figures(analysis)[name].layout.legend.yref == "container", name
