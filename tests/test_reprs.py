"""Short reprs and small HTML tables of the statistics, sink and BOS result objects: one
line of at most 400 characters naming the key numbers (checked against the same numbers
reached another way), and a ``<table>`` for notebooks."""

from __future__ import annotations

import html

import numpy as np
import pytest

from rope_leak.analyses.analysis import analyze
from rope_leak.analyses.fingerprint import probe
from rope_leak.analyses.sinks import analyze_sinks
from rope_leak.display import MAX_REPR


def check_display(obj, *must_contain):
    text = repr(obj)
    assert len(text) <= MAX_REPR, (type(obj).__name__, len(text), text)
    assert text.startswith(type(obj).__name__ + "(")
    assert "\n" not in text and "array(" not in text and "tensor(" not in text
    table = obj._repr_html_()
    assert table.startswith("<table") and table.endswith("</table>") and len(table) < 3000
    for needle in must_contain:
        assert needle in text, (needle, text)
        assert html.escape(needle.split("=", 1)[-1].strip("'"), quote=False) in table, (needle, table)
    return text


@pytest.fixture(scope="module")
def tokens(tiny_tokens):
    return tiny_tokens


@pytest.fixture(scope="module")
def analysis(tiny_model, tokens):
    return analyze(tiny_model, tokens, progress=False)


@pytest.fixture(scope="module")
def sinks(tiny_model, tokens):
    return analyze_sinks(tiny_model, tokens, doc_ids=[i % 3 for i in range(12)], n_boot=10,
                         n_permutations=10, early_queries=8)


def test_statistics_reprs(analysis, tokens):
    run = analysis.statistics
    check_display(run, "prompts=12", "causal", "bidirectional", "n_tokens=16", "2 layers x 4 heads")
    causal = run.conditions["causal"]
    top_sink = analysis.heads()["sink_score"].max()  # the analysis' table, not the statistics
    check_display(causal, "condition='causal'", "prompts=12", f"max_sink_score={top_sink:.4g}")
    pattern = causal.targets["pattern"]
    n = tokens.shape[1]
    cells = sum(i for i in range(1, n))  # pairs 1 <= j <= i < n
    check_display(pattern, "prompts=12", "n_tokens=16", f"scored_cells={cells}", "cell_maps=False")
    zero = causal.position_zero
    # same token at position 0, causal mask: the stream is identical across prompts
    check_display(zero, "prompts=12", f"depths={analysis.n_layers + 1}", "max_std=0")


def test_sink_and_bos_reprs(sinks):
    heads = sinks.heads()
    top = heads.loc[heads["sink_score"].idxmax()]
    text = check_display(sinks, f"{int(heads['sink_head'].sum())} of 8", f"{top['label']} {top['sink_score']:.3f}",
                         f"sink_reading_heads={int(heads['sink_reading'].sum())}", "BOS")
    assert "probe='run'" in text
    bos = sinks.bos_interventions
    table = bos.table()  # through the bootstrap's point estimate
    baseline = table.loc[table["replacement"] == "baseline", "L_total_debiased"].item()
    zeros = table.loc[table["replacement"] == "zeros", "L_total_debiased"].item()
    check_display(bos, f"L_total_debiased[baseline]={baseline:.4g}", f"L_total_debiased[zeros]={zeros:.4g}",
                  "pairs='1<=i<8,1<=j<=i'")


def test_probe_repr():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(20, 1))
    features = np.hstack([y + 0.01 * rng.normal(size=(20, 1)), rng.normal(size=(20, 3))])
    result = probe(features, y, n_permutations=20)
    facts = result.to_dict()
    assert facts["r2"] > 0.9
    check_display(result, f"r2={facts['r2']:.4g}", f"p_value={facts['p_value']:.4g}", "permutations=20")


def test_head_repr_names_the_degenerate_flag(analysis):
    result = analysis.head("L1H2")
    assert "degenerate" not in repr(result) or bool(result["degenerate"])
    result.numbers["degenerate"] = True
    assert "flags='degenerate" in repr(result) and "degenerate" in result._repr_html_()


def test_fingerprint_repr_names_its_spread(tiny_model, tokens):
    from rope_leak.analyses.fingerprint import fingerprint

    result = fingerprint(tiny_model, tokens[:6], [(1, 0), (1, 2)])
    # the same position-0 token in every prompt: v_0 W_O is identical across prompts
    std = np.sqrt(result.value.var(0, ddof=1).mean(-1)).max()
    attention = result.attention0.mean()
    check_display(result, "L1H0", f"max_fingerprint_std={std:.4g}", f"mean_attention0={attention:.4g}")
