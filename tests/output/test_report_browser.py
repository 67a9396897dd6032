"""The HTML report in a real headless browser (Debian's ``chromium``): it loads offline
without script errors and every plotly figure renders.

Script errors are caught two ways: a probe script injected at the top of a copy of the
report records ``window.onerror`` / unhandled rejections / ``console.error`` calls into
the DOM (read back with ``--dump-dom``), and chromium's own console log on stderr
(``--enable-logging=stderr``) is scanned for uncaught errors. Network access is not
needed (plotly.js is inlined) and is blocked with a bogus proxy to prove it.

Skipped when no chromium is installed (CI: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from rope_leak.analyses.analysis import analyze
from rope_leak.backends import TINY_BOS_TOKEN_ID, tiny_rope_model
from rope_leak.corpus import make_random_corpus
from rope_leak.output.plots import all_figures
from rope_leak.output.report import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM = next((path for name in BROWSERS if (path := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no headless browser: install Debian's chromium (apt-get install -y chromium) to run "
           "the report browser test",
)

PROBE = """<script>
window.__errors = [];
function __record(msg) {
  window.__errors.push(String(msg));
  var el = document.getElementById('__probe');
  if (!el) { el = document.createElement('pre'); el.id = '__probe'; (document.body || document.documentElement).appendChild(el); }
  el.setAttribute('data-errors', JSON.stringify(window.__errors));
}
window.addEventListener('error', function (e) { __record('error: ' + e.message); });
window.addEventListener('unhandledrejection', function (e) { __record('rejection: ' + e.reason); });
var __consoleError = console.error;
console.error = function () { __record('console.error: ' + Array.prototype.join.call(arguments, ' ')); __consoleError.apply(console, arguments); };
window.addEventListener('load', function () {
  var el = document.createElement('pre'); el.id = '__loaded';
  el.setAttribute('data-plots', String(document.querySelectorAll('.js-plotly-plot').length));
  document.body.appendChild(el);
});
</script>"""


def render(html_path, tmp_path, after_load: str = "") -> tuple[str, str]:
    """``(dom, stderr)`` of chromium loading ``html_path`` with the error probe injected
    (and ``after_load``, JavaScript run on the load event after the page's own scripts)."""
    text = html_path.read_text(encoding="utf-8")
    probed = tmp_path / ("probed_" + html_path.name)
    if after_load:
        text = text.replace("</body>", f"<script>window.addEventListener('load', function () {{ {after_load} }});"
                                       "</script></body>", 1)
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
        "--proxy-server=http://127.0.0.1:9", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=10000", "--dump-dom", probed.as_uri(),
    ]
    env = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, f"chromium failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result.stdout, result.stderr


def console_errors(stderr: str) -> list[str]:
    """Uncaught errors chromium logged from the page's console."""
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line and re.search(r"Uncaught|Error|error", line)]


def probe_errors(dom: str) -> str | None:
    match = re.search(r'id="__probe"[^>]*data-errors="([^"]*)"', dom)
    return match.group(1) if match else None


@pytest.fixture(scope="module")
def tiny_analysis():
    model = tiny_rope_model(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=64, d_vocab=50, seed=0)
    tokens = make_random_corpus(8, 24, model.cfg.d_vocab, seed=0, bos_token_id=TINY_BOS_TOKEN_ID).tokens
    return analyze(model, tokens, progress=False)


def test_probe_catches_a_script_error(tmp_path):
    """The harness itself: a page with a broken script must be reported."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
                    "<script>undefinedFunction();</script></body></html>")
    dom, stderr = render(page, tmp_path)
    assert probe_errors(dom) and "undefinedFunction" in probe_errors(dom)


def test_report_renders_without_script_errors(tiny_analysis, tmp_path):
    path = write_report(tiny_analysis, tmp_path / "report.html")
    html_text = path.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=", html_text), "the report must not load scripts from elsewhere"
    dom, stderr = render(path, tmp_path)

    assert probe_errors(dom) is None, f"script errors in the report: {probe_errors(dom)}"
    assert not console_errors(stderr), "\n".join(console_errors(stderr))
    n_figures = html_text.count('class="plotly-graph-div"')
    assert n_figures == len(all_figures(tiny_analysis)) + 1  # + the intervals figure
    loaded = re.search(r'id="__loaded" data-plots="(\d+)"', dom)
    assert loaded, "the page's load event never fired"
    explorer_plots = 2  # the head map and the profiles (no mean pattern: no cell maps)
    assert int(loaded.group(1)) == n_figures + explorer_plots
    # plotly drew every figure: a plot container with its SVG layers and heatmap images/bars.
    assert dom.count('class="plot-container') == n_figures + explorer_plots
    assert dom.count('class="main-svg"') >= n_figures
    assert "heatmaplayer" in dom or 'class="hm"' in dom
    # summary at the top, with the CI column and sink heads section, before the first figure
    assert dom.index("Summary") < dom.index('class="plot-container')
    assert "95% CI" in dom and "Sink heads" in dom
    assert 'id="fig-intervals"' in dom
    # every figure section (and the explorer) carries a sentence saying what it shows
    assert dom.count('class="caption"') == n_figures + 1
    # readable head labels in the tables and hover data
    assert re.search(r"L\dH\d", dom)


def _explorer_rows(dom: str) -> dict[str, str]:
    table = re.search(r'id="explorer-table"(.*?)</table>', dom, re.S).group(1)
    return {html.unescape(k): html.unescape(v)
            for k, v in re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", table)}


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


def test_explorer_selects_heads(tiny_analysis, tmp_path):
    """The explorer opens on the top head, and the drop-down and a click on the head map
    each select another head: its table shows ``analysis.head``'s numbers and the
    profiles figure is redrawn for it; without cell maps it says the pattern needs them."""
    path = write_report(tiny_analysis, tmp_path / "report.html")
    top = tiny_analysis.top_heads(1)["label"].item()
    dom, stderr = render(path, tmp_path)
    assert probe_errors(dom) is None, probe_errors(dom)
    assert f'data-selected="{top}"' in dom
    select = ("var s = document.getElementById('explorer-select'); s.value = '2'; "
              "s.dispatchEvent(new Event('change'));")
    click = ("document.getElementById('explorer-map').emit('plotly_click', "
             "{points: [{x: 3, y: 1}]});")
    for script, (layer, head) in ((select, (0, 2)), (click, (1, 3))):
        dom, stderr = render(path, tmp_path, after_load=script)
        assert probe_errors(dom) is None, probe_errors(dom)
        assert not console_errors(stderr), "\n".join(console_errors(stderr))
        result = tiny_analysis.head(layer, head)
        assert f'data-selected="{result.label}"' in dom
        rows = _explorer_rows(dom)
        assert rows["head"] == result.label
        for name in ("L_total", "L_resid", "L_mask"):
            shown = _numbers(next(v for k, v in rows.items() if k.startswith(name + " ")))
            expected = [result[f"{name}_debiased"], result[f"{name}_ci_low"], result[f"{name}_ci_high"]]
            np.testing.assert_allclose(shown, expected, rtol=5e-4)
        np.testing.assert_allclose(_numbers(rows["sink score (bidirectional)"]),
                                   [result["sink_score_bidirectional"]], rtol=5e-4)
        assert rows["sink-reading"].startswith("not measured")
        assert f"{result.label}: fitted M_abs profiles" in dom
        assert "--cell-maps" in dom
