"""The report's head explorer: pick a head (drop-down or click on the layer x head map) and
see its shares with CIs, the completed split's parts, its sink scores and flags, its
fitted ``M_abs`` profiles ``a[d]``, ``b[i]``, ``c[j]`` and, for the top heads when the
analysis kept per-cell sums (``cell_maps=True``), its mean pattern.

Everything is precomputed into one JSON block embedded in the page (floats rounded to
:data:`DIGITS` significant digits) and drawn by plotly.js with a little JavaScript, so the
report stays one self-contained file that opens offline. :func:`explorer_data` returns
that JSON's content, for tests and for notebooks.
"""

from __future__ import annotations

import html
import json
import math

import numpy as np
from plotly.colors import get_colorscale

from rope_leak.heads import head_label
from rope_leak.output.plots import DIVERGING
from rope_leak.output.records import CellMeans, as_analysis_record, as_sink_record
from rope_leak.quantities import column

#: Significant digits of every float in the embedded data.
DIGITS = 4
#: Heads (top by debiased L_total, non-degenerate) whose mean pattern is embedded when
#: the analysis has per-cell sums.
PATTERN_HEADS = 12
#: Mean patterns are averaged over square blocks so that neither side exceeds this.
PATTERN_SIDE = 96

#: Most profile values embedded (all heads together); beyond it the profiles are averaged
#: over runs of consecutive positions (SmolLM2-135M at n = 256 needs 207k, so none are).
PROFILE_BUDGET = 300_000

#: Columns of the heads table the explorer shows (those present are embedded).
NUMBERS = (
    "L_total_debiased", "L_total_ci_low", "L_total_ci_high", "L_total_qvalue", "L_total_significant",
    "L_resid_debiased", "L_resid_ci_low", "L_resid_ci_high",
    "L_mask_debiased", "L_mask_ci_low", "L_mask_ci_high",
    "completed_mask_share", "completed_mask_part", "completed_scores_part", "completed_cross",
    "imputed_past_mass",
    "sink_score", "sink_score_ci_low", "sink_score_ci_high", "sink_score_bidirectional",
    "alpha0_gu", "sink_head", "sink_head_gu", "degenerate", "additivity_violated",
)


def _round(value, digits: int = DIGITS):
    """A JSON value with floats rounded to ``digits`` significant digits; NaN/inf -> None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return float(f"{value:.{digits}g}") if math.isfinite(value) else None


def _rounded(values, digits: int = DIGITS) -> list:
    return [_round(v, digits) for v in np.asarray(values).ravel().tolist()]


def _bin_means(bins: np.ndarray, values: np.ndarray, n_bins: int) -> np.ndarray:
    """Mean of ``values`` in each of ``n_bins`` bins (``bins``: each value's bin); NaN for
    an empty bin."""
    sums = np.bincount(bins, weights=values, minlength=n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def _thin(values: np.ndarray, step: int) -> np.ndarray:
    """Means over runs of ``step`` consecutive values."""
    values = np.asarray(values, dtype=float)
    if step == 1:
        return values
    return _bin_means(np.arange(len(values)) // step, values, math.ceil(len(values) / step))


def _block_grid(cells: CellMeans, values: np.ndarray, step: int) -> np.ndarray:
    """Scored-cell values ``[cell]`` as a query x key grid of ``step x step`` block means
    (NaN where a block holds no scored cell)."""
    side = math.ceil(cells.n_tokens / step)
    bins = (cells.queries // step) * side + cells.keys // step
    return _bin_means(bins, np.asarray(values, dtype=float), side * side).reshape(side, side)


def _patterns(cells: CellMeans | None, table, k: int, side: int, digits: int) -> dict:
    """Mean cell maps of the top ``k`` non-degenerate heads (empty without per-cell sums)."""
    if cells is None or k <= 0:
        return {}
    ranked = table[~table["degenerate"]].nlargest(k, column("L_total", "debiased"))
    out = {}
    for layer, head in zip(ranked["layer"], ranked["head"]):
        step = max(1, math.ceil(cells.n_tokens / side))
        grid = _block_grid(cells, cells.values[layer, head], step)
        out[head_label(layer, head)] = {
            "step": step,
            "z": [[_round(v, digits) for v in row] for row in grid.tolist()],
        }
    return out


def explorer_data(analysis, sinks=None, *, digits: int = DIGITS,
                  pattern_heads: int = PATTERN_HEADS, pattern_side: int = PATTERN_SIDE,
                  profile_budget: int = PROFILE_BUDGET) -> dict:
    """The explorer's data for an :class:`~rope_leak.output.records.AnalysisRecord` (or an
    analysis): every head's numbers (columns of its heads table, one list per column in
    ``layer * n_heads + head`` order), its ``M_abs`` profiles (the same as
    :meth:`rope_leak.Analysis.head`'s ``a``, ``b``, ``c``, causal condition, headline
    target) and the top heads' mean patterns when the analysis kept per-cell sums. When
    all profiles together exceed ``profile_budget`` values they are averaged over runs of
    ``profile_step`` consecutive positions (and so are their positions).

    ``sinks``: the sink analysis of the same model (or its
    :class:`~rope_leak.output.records.SinkRecord`), for the sink-reading flag (absent: the
    page says it was not measured)."""
    record, sinks = as_analysis_record(analysis), as_sink_record(sinks)
    table = record.heads
    profiles = record.profiles
    numbers = {name: _rounded(table[name], digits) for name in NUMBERS if name in table}
    if sinks is not None:
        numbers["sink_reading"] = _rounded(sinks.heads["sink_reading"], digits)
        numbers["sink_reading_change"] = _rounded(sinks.heads["relative_change"], digits)
    positions = {"a": profiles.offsets, "b": profiles.queries, "c": profiles.keys}
    n_values = len(table) * sum(len(p) for p in positions.values())
    step = max(1, math.ceil(n_values / profile_budget))
    thin = lambda values: _thin(values, step)  # noqa: E731
    fitted = {"a": profiles.a, "b": profiles.b, "c": profiles.c}
    curves = {name: [_rounded(thin(fitted[name][int(layer), int(head)]), digits)
                     for layer, head in zip(table["layer"], table["head"])] for name in "abc"}
    return {
        "colorscale": get_colorscale(DIVERGING),
        "n_layers": record.n_layers, "n_heads": record.n_heads,
        "labels": table["label"].tolist(), "target": record.target,
        "level": record.ci_level, "sink_threshold": record.sink_threshold,
        "reading_threshold": None if sinks is None else sinks.reading_threshold,
        **{axis: positions[name].tolist() if step == 1 else _rounded(thin(positions[name]), 8)
           for name, axis in (("a", "offsets"), ("b", "queries"), ("c", "keys"))},
        "profile_step": step, "n_tokens": int(profiles.n_tokens),
        "numbers": numbers, "profiles": curves, "cell_maps": record.cell_means is not None,
        "patterns": _patterns(record.cell_means, table, pattern_heads, pattern_side, digits),
        "pattern_heads": pattern_heads,
    }


def _json_for_script(data: dict) -> str:
    """Compact JSON that is safe inside ``<script type="application/json">``."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


CAPTION = (
    "Pick a head in the list or click it on the map (debiased L_total; colour scale set by "
    "98% of the heads, degenerate heads ○). The table gives its shares with CIs, the "
    "completed split's parts (fractions of SS(log A)), its sink scores and flags. The "
    "profiles are the fitted M_abs: y ≈ a[i−j] + b[i] + c[j] (b and c centred, equal slopes; "
    "a carries the intercept and everything relative): b and c are the absolute-position part. "
    "Axes are set by the bulk of the values; values beyond them are marked ▲/▼ (hover for the "
    "value; double-click a plot for the full range).")

SCRIPT = r"""
(function () {
  var D = JSON.parse(document.getElementById('explorer-data').textContent);
  var N = D.numbers, nH = D.n_heads, nL = D.n_layers;
  var select = document.getElementById('explorer-select');
  function has(name) { return Object.prototype.hasOwnProperty.call(N, name); }
  function fmt(v) {
    if (v === null || v === undefined) return 'n/a';
    if (typeof v === 'boolean') return v ? 'yes' : 'no';
    return Number(v).toPrecision(4).replace(/\.?0+e/, 'e');
  }
  function ci(name, i) {
    if (!has(name + '_debiased')) return 'n/a';
    return fmt(N[name + '_debiased'][i]) + ' [' + fmt(N[name + '_ci_low'][i]) + ', ' + fmt(N[name + '_ci_high'][i]) + ']';
  }
  function val(name, i) { return has(name) ? fmt(N[name][i]) : 'n/a'; }
  function flag(name, i) { return has(name) && N[name][i] === true; }
  function esc(s) { return String(s).replace(/[&<>]/g, function (c) { return {'&': '&amp;', '<': '&lt;', '>': '&gt;'}[c]; }); }
  // the layer x head map, set by 98% of the non-degenerate heads
  var total = N.L_total_debiased, z = [], text = [], dx = [], dy = [], mags = [];
  for (var l = 0; l < nL; l++) {
    var row = [], trow = [];
    for (var h = 0; h < nH; h++) {
      var i = l * nH + h, v = total[i], deg = flag('degenerate', i);
      row.push(deg ? null : v); trow.push(D.labels[i]);
      if (deg) { dx.push(h); dy.push(l); } else if (v !== null) { mags.push(Math.abs(v)); }
    }
    z.push(row); text.push(trow);
  }
  mags.sort(function (a, b) { return a - b; });
  var zmax = mags.length ? mags[Math.min(mags.length - 1, Math.floor(0.98 * (mags.length - 1)))] : 1;
  if (!(zmax > 0)) zmax = 1;
  var mapDiv = document.getElementById('explorer-map');
  Plotly.newPlot(mapDiv, [
    {type: 'heatmap', z: z, customdata: text, zmin: -zmax, zmax: zmax, colorscale: D.colorscale,
     colorbar: {title: {text: 'L_total'}, len: 0.9}, xgap: 1, ygap: 1,
     hovertemplate: '%{customdata}<br>L_total = %{z:.4f}<extra>click to explore</extra>'},
    {type: 'scatter', mode: 'markers', x: dx, y: dy, name: 'degenerate', showlegend: false,
     marker: {symbol: 'circle-open', size: 8, color: 'black'}, hovertemplate: 'L%{y}H%{x}: degenerate<extra></extra>'},
    {type: 'scatter', mode: 'markers', x: [0], y: [0], name: 'selected', showlegend: false, hoverinfo: 'skip',
     marker: {symbol: 'square-open', size: 14, color: '#000', line: {width: 3}}}
  ], {title: {text: 'Heads: debiased L_total (click one)', font: {size: 14}}, height: Math.max(320, 14 * nL + 120),
      margin: {l: 50, r: 10, t: 40, b: 40},
      xaxis: {title: {text: 'head'}, dtick: 1, range: [-0.5, nH - 0.5], zeroline: false, showgrid: false},
      yaxis: {title: {text: 'layer'}, range: [nL - 0.5, -0.5], dtick: nL > 16 ? 2 : 1, zeroline: false, showgrid: false}},
     {displayModeBar: false, responsive: true});
  mapDiv.on('plotly_click', function (ev) {
    var p = ev.points[0];
    if (p && p.x !== undefined && p.y !== undefined) show(Math.round(p.y) * nH + Math.round(p.x));
  });
  // a y-range set by the bulk of the values: the 2nd..98th percentile, unless that
  // leaves most of the span to a few outliers; returns null for the full range
  function bulkRange(values) {
    var v = values.filter(function (x) { return x !== null && isFinite(x); }).sort(function (a, b) { return a - b; });
    var n = v.length;
    if (n < 10) return null;
    var lo = v[Math.floor(0.02 * (n - 1))], hi = v[Math.ceil(0.98 * (n - 1))];
    var bulk = hi - lo, span = v[n - 1] - v[0];
    if (!(bulk > 0) || span <= 3 * bulk) return null;
    return [lo - 0.15 * bulk, hi + 0.15 * bulk];
  }
  function profileTraces(x, y, name, axis, color) {
    var range = bulkRange(y), tr = [{type: 'scatter', mode: 'lines+markers', x: x, y: y, name: name,
      xaxis: 'x' + axis, yaxis: 'y' + axis, line: {color: color, width: 1.5}, marker: {size: 3},
      hovertemplate: name.split('[')[0] + '[%{x}] = %{y:.4g}<extra></extra>'}];
    var off = 0;
    if (range) {
      var ox = [], oy = [], os = [], ov = [];
      for (var k = 0; k < y.length; k++) {
        if (y[k] === null) continue;
        if (y[k] > range[1]) { ox.push(x[k]); oy.push(range[1]); os.push('triangle-up'); ov.push(y[k]); }
        else if (y[k] < range[0]) { ox.push(x[k]); oy.push(range[0]); os.push('triangle-down'); ov.push(y[k]); }
      }
      off = ox.length;
      tr.push({type: 'scatter', mode: 'markers', x: ox, y: oy, customdata: ov, showlegend: false,
               xaxis: 'x' + axis, yaxis: 'y' + axis, marker: {symbol: os, size: 9, color: '#b00'},
               hovertemplate: name.split('[')[0] + '[%{x}] = %{customdata:.4g} (beyond the axis)<extra></extra>'});
    }
    return {traces: tr, range: range, off: off};
  }
  function showProfiles(i) {
    var parts = [
      profileTraces(D.offsets, D.profiles.a[i], 'a[d] (offset d = i − j)', '', '#1f77b4'),
      profileTraces(D.queries, D.profiles.b[i], 'b[i] (query position)', '2', '#d62728'),
      profileTraces(D.keys, D.profiles.c[i], 'c[j] (key position)', '3', '#2ca02c')];
    var traces = [].concat(parts[0].traces, parts[1].traces, parts[2].traces);
    var names = ['offset d = i − j', 'query position i', 'key position j'], layout = {
      title: {text: D.labels[i] + ': fitted M_abs profiles (' + esc(D.target) + ', causal' +
             (D.profile_step > 1 ? '; means over runs of ' + D.profile_step + ' positions' : '') + ')', font: {size: 14}},
      height: 330, margin: {l: 55, r: 10, t: 60, b: 45}, showlegend: false, grid: {rows: 1, columns: 3, pattern: 'independent'},
      annotations: []};
    ['', '2', '3'].forEach(function (ax, k) {
      layout['xaxis' + ax] = {title: {text: names[k]}, domain: [k / 3 + 0.02, (k + 1) / 3 - 0.03]};
      layout['yaxis' + ax] = {anchor: 'x' + ax, zeroline: true, zerolinecolor: '#999', exponentformat: 'e'};
      if (parts[k].range) layout['yaxis' + ax].range = parts[k].range;
      var label = ['a[d]', 'b[i]', 'c[j]'][k] + (parts[k].off ? ' (' + parts[k].off + ' beyond the axis ▲▼)' : '');
      layout.annotations.push({text: label, xref: 'x' + ax + ' domain', yref: 'y' + ax + ' domain', x: 0.5, y: 1.08,
                               showarrow: false, font: {size: 12}});
    });
    Plotly.react('explorer-profiles', traces, layout, {displaylogo: false, responsive: true});
  }
  function showPattern(i) {
    var div = document.getElementById('explorer-pattern'), note = document.getElementById('explorer-pattern-note');
    var p = D.patterns[D.labels[i]];
    if (!p) {
      Plotly.purge(div); div.style.display = 'none';
      note.textContent = D.cell_maps
        ? 'Mean pattern: embedded for the ' + D.pattern_heads + ' heads with the largest L_total only (' +
          Object.keys(D.patterns).join(', ') + '); rope_leak.analyses.explore.head_cell_maps(analysis, "' + D.labels[i] + '") gives any head\'s.'
        : 'Mean pattern: not available. The analysis kept only the O(n) sums every fit needs; rerun with --cell-maps ' +
          '(cell_maps=True) to embed the top heads\' mean patterns, or use rope_leak.analyses.explore.head_patterns on a few prompts.';
      return;
    }
    div.style.display = '';
    var vals = [];
    p.z.forEach(function (r) { r.forEach(function (v) { if (v !== null) vals.push(v); }); });
    vals.sort(function (a, b) { return a - b; });
    var lo = vals[Math.floor(0.01 * (vals.length - 1))], hi = vals[Math.ceil(0.99 * (vals.length - 1))];
    var ys = p.z.map(function (_, r) { return r * p.step; }), xs = p.z[0].map(function (_, c) { return c * p.step; });
    note.textContent = 'Mean ' + D.target + ' over the prompts (causal)' + (p.step > 1 ? ', averaged over ' + p.step + ' x ' + p.step +
      ' blocks' : '') + '; colour scale: 1st to 99th percentile of the cells (' + fmt(lo) + ' to ' + fmt(hi) + '), beyond it saturates.';
    Plotly.react(div, [{type: 'heatmap', z: p.z, x: xs, y: ys, zmin: lo, zmax: hi, colorscale: 'Viridis',
      colorbar: {title: {text: D.target}},
      hovertemplate: 'query %{y}, key %{x}' + (p.step > 1 ? ' (block)' : '') + '<br>' + D.target + ' = %{z:.4g}<extra></extra>'}],
      {title: {text: D.labels[i] + ': mean ' + esc(D.target) + ' (query x key)', font: {size: 14}}, height: 420, width: 480,
       margin: {l: 55, r: 10, t: 40, b: 45}, xaxis: {title: {text: 'key position j'}},
       yaxis: {title: {text: 'query position i'}, autorange: 'reversed', scaleanchor: 'x'}},
      {displayModeBar: false});
  }
  function showTable(i) {
    var pct = Math.round(100 * D.level) + '% CI';
    var flags = [];
    if (flag('degenerate', i)) flags.push('degenerate (scored variance below the floor; left out of means and pools)');
    if (flag('sink_head', i)) flags.push('sink head (sink score > ' + D.sink_threshold + ')');
    if (flag('sink_head_gu', i)) flags.push('sink head by Gu et al. (α₀ > 0.3)');
    if (flag('sink_reading', i)) flags.push('sink-reading (relative change > ' + D.reading_threshold + ')');
    if (flag('additivity_violated', i)) flags.push('additivity violated (L_mask < 0 beyond its CI)');
    if (flag('L_total_significant', i)) flags.push('L_total > 0 (BH)');
    var reading = has('sink_reading') ? (flag('sink_reading', i) ? 'yes' : 'no') + ' (relative change ' + val('sink_reading_change', i) + ')'
                                     : 'not measured (run the sink analysis)';
    var rows = [
      ['head', D.labels[i]], ['flags', flags.length ? flags.join('; ') : 'none'],
      ['L_total (causal) [' + pct + ']', ci('L_total', i)], ['q (BH)', val('L_total_qvalue', i)],
      ['L_resid (bidirectional) [' + pct + ']', ci('L_resid', i)], ['L_mask = L_total − L_resid [' + pct + ']', ci('L_mask', i)],
      ['completed split: mask share', val('completed_mask_share', i)],
      ['completed split: scores\' part', val('completed_scores_part', i)], ['completed split: start cut', val('completed_mask_part', i)],
      ['completed split: cross term', val('completed_cross', i)], ['imputed past mass (x window, at i = w)', val('imputed_past_mass', i)],
      ['sink score (causal) [' + pct + ']', val('sink_score', i) + ' [' + val('sink_score_ci_low', i) + ', ' + val('sink_score_ci_high', i) + ']'],
      ['sink score (bidirectional)', val('sink_score_bidirectional', i)], ['α₀ (Gu et al.)', val('alpha0_gu', i)],
      ['sink-reading', reading]];
    document.getElementById('explorer-table').innerHTML = '<table>' + rows.map(function (r) {
      return '<tr><th>' + esc(r[0]) + '</th><td>' + esc(r[1]) + '</td></tr>'; }).join('') + '</table>';
  }
  function show(i) {
    if (!(i >= 0 && i < D.labels.length)) return;
    select.value = String(i);
    Plotly.restyle(mapDiv, {x: [[i % nH]], y: [[Math.floor(i / nH)]]}, [2]);
    showTable(i); showProfiles(i); showPattern(i);
    document.getElementById('explorer').setAttribute('data-selected', D.labels[i]);
  }
  select.addEventListener('change', function () { show(parseInt(select.value, 10)); });
  window.ropeLeakExplorer = {show: show, data: D};
  var start = D.labels.indexOf((location.hash.match(/head=(L\d+H\d+)/) || [])[1]);
  show(start >= 0 ? start : D.labels.indexOf(select.getAttribute('data-first')));
})();
"""


def explorer_html(analysis, sinks=None, **options) -> str:
    """The explorer's section (needs plotly.js on the page, loaded before it)."""
    data = explorer_data(analysis, sinks, **options)
    total = np.asarray(data["numbers"]["L_total_debiased"], dtype=float)
    total[np.asarray(data["numbers"]["degenerate"], dtype=bool)] = np.nan
    first = data["labels"][int(np.argmax(np.nan_to_num(total, nan=-np.inf)))]
    options_html = "".join(f"<option value='{i}'>{html.escape(label)}</option>"
                           for i, label in enumerate(data["labels"]))
    return (
        "<section id='section-explorer'><h2>Head explorer</h2>"
        f"<p class='caption'>{html.escape(CAPTION)}</p>"
        "<div id='explorer'><p><label>Head: <select id='explorer-select' "
        f"data-first='{html.escape(first)}'>{options_html}</select></label> "
        "<span class='note'>(or click a head on the map; the page opens on the non-degenerate head with the largest L_total, "
        "and <code>#head=L3H1</code> in the address picks one)</span></p>"
        "<div style='display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start'>"
        "<div id='explorer-map' style='flex:1 1 420px;min-width:360px'></div>"
        "<div id='explorer-table' style='flex:1 1 420px'></div></div>"
        "<div id='explorer-profiles'></div>"
        "<p class='note' id='explorer-pattern-note'></p><div id='explorer-pattern'></div></div>"
        f"<script type='application/json' id='explorer-data'>{_json_for_script(data)}</script>"
        f"<script>{SCRIPT}</script></section>"
    )
