"""Position-0 (BOS) interventions at early queries: the scores' absolute-position sum of
squares against a numpy reference, the prefix shortcut against full-length runs, and
"not estimable" ratios."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rope_leak.analyses.bos_interventions import (
    REPLACEMENTS,
    BosInterventions,
    absolute_sum_of_squares,
    bos_interventions,
    default_replacement_token,
)
from rope_leak.engine.pairs import PairDesign, PairSpec
from rope_leak.engine.run import run_statistics
from rope_leak.fits.projection import BucketProjection
from rope_leak.interventions.mask import bidirectional
from rope_leak.interventions.position_zero import replace_position_zero
from rope_leak.output.plots_sinks import bos_table_html
from rope_leak.output.results import to_jsonable

EARLY = 8


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (10, 16), generator=gen)
    tokens[:, 0] = 0
    return tokens


@pytest.fixture(scope="module")
def bos_result(tiny_model, prompts):
    return bos_interventions(tiny_model, prompts, early_queries=EARLY, n_boot=40, n_buckets=10)


def _cell_scores(model, tokens, design):
    """Per-prompt pre-softmax scores on the scored cells: ``[prompt, layer, head, cell]``."""
    q, k = design.cells
    out = []
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn_scores"))
    for layer in range(model.cfg.n_layers):
        out.append(cache[f"blocks.{layer}.attn.hook_attn_scores"][:, :, q, k].double().numpy())
    return np.stack(out, 1)


def test_absolute_sum_of_squares_matches_numpy_least_squares(tiny_model, prompts):
    """The debiased SS_abs equals the U-statistic over distinct prompt pairs of
    <(H_abs - H_rel) y_p, (H_abs - H_rel) y_p'>, with the hat matrices from numpy lstsq."""
    spec = PairSpec(max_query=EARLY)
    tokens = prompts[:, :EARLY]
    stats = run_statistics(tiny_model, tokens, targets=("scores",), spec=spec, n_buckets=len(tokens),
                           progress=False)
    got = absolute_sum_of_squares(BucketProjection.from_statistics(
        stats.conditions["causal"].targets["scores"]))[0]
    design = PairDesign(spec, EARLY)
    q, k = design.cells
    onehot = lambda v: (v[:, None] == np.unique(v)[None]).astype(float)  # noqa: E731
    x_rel = onehot(q - k)
    x_abs = np.hstack([x_rel, onehot(q), onehot(k)])
    hat = lambda x: x @ np.linalg.pinv(x)  # noqa: E731
    d = hat(x_abs) - hat(x_rel)
    y = _cell_scores(tiny_model, tokens, design)  # [P, L, H, cells]
    dy = y @ d.T
    total = dy.sum(0)
    p = len(tokens)
    expected = ((total**2).sum(-1) - (dy**2).sum((0, -1))) / (p * (p - 1))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    plug_in = absolute_sum_of_squares(BucketProjection.from_statistics(
        stats.conditions["causal"].targets["scores"]), debiased=False)[0]
    np.testing.assert_allclose(plug_in, ((total / p) ** 2).sum(-1), rtol=1e-6, atol=1e-9)


def test_prefix_run_equals_full_length_run(tiny_model, prompts, bos_result):
    """Under the causal mask the early queries cannot see later tokens: the prefix runs give
    the statistics of full-length runs (scores and pattern)."""
    full = run_statistics(tiny_model, prompts, targets=("pattern", "scores"), spec=PairSpec(max_query=EARLY),
                          n_buckets=10, progress=False,
                          conditions={"mean": lambda m: replace_position_zero(m, "mean")})
    projection = BucketProjection.from_statistics(full.conditions["mean"].targets["scores"])
    np.testing.assert_allclose(bos_result.scores_ss["mean"], absolute_sum_of_squares(projection)[0],
                               rtol=1e-4, atol=1e-7)
    share = BucketProjection.from_statistics(full.conditions["mean"].targets["pattern"]).debiased_share()[0]
    np.testing.assert_allclose(bos_result.shares["mean/causal"], share, rtol=1e-4, atol=1e-6)
    assert bos_result.statistics.metadata["prompt_tokens"] == EARLY + 1  # the start cut drops the last query


def test_bos_table_rows_cis_and_ratios(bos_result):
    table = bos_result.table().set_index("replacement")
    assert list(table.index) == ["baseline", *REPLACEMENTS]
    assert "replace_all" not in table.index
    for metric in ("scores_ss", "L_total_debiased"):
        assert (table[f"{metric}_low"] <= table[f"{metric}_high"]).all()
    for ratio, base in (("scores_ss_relative", "scores_ss"), ("L_total_relative", "L_total_debiased")):
        estimable = bool(table[f"{ratio}_estimable"].iloc[0])
        includes_zero = table.loc["baseline", f"{base}_low"] <= 0 <= table.loc["baseline", f"{base}_high"]
        assert estimable == (not includes_zero)
        if estimable:
            assert table.loc["baseline", ratio] == pytest.approx(1.0)
            np.testing.assert_allclose(table[ratio], table[base] / table.loc["baseline", base])
        else:
            assert table[ratio].isna().all()


def test_ratio_over_a_baseline_whose_ci_includes_zero_is_not_estimable(bos_result):
    point = np.array([0.01, 0.02, 0.5])
    samples = np.array([[0.01, 0.02, 0.5], [0.02, 0.01, 0.4]])
    ok = bos_result._ratios(point, np.array([0.005, 0, 0]), np.array([0.02, 0, 0]), samples)
    assert ok["estimable"] and ok["value"][2] == pytest.approx(50.0)
    bad = bos_result._ratios(point, np.array([-0.01, 0, 0]), np.array([0.03, 0, 0]), samples)
    assert not bad["estimable"] and np.isnan(bad["value"]).all() and np.isnan(bad["low"]).all()
    # the same in the outputs: null in JSON, a dash in the report
    table = bos_result.table()
    table["scores_ss_relative"] = np.nan
    table["scores_ss_relative_estimable"] = False
    record = to_jsonable(table.to_dict(orient="records"))[1]
    assert record["scores_ss_relative"] is None
    html = bos_table_html(table)
    assert "–" in html and "not estimable" in html


def test_replacing_position_zero_by_itself_changes_nothing(tiny_model, prompts):
    result = bos_interventions(tiny_model, prompts, replacements=("token",), token_id=0,
                               early_queries=EARLY, n_boot=0, n_buckets=10)
    np.testing.assert_array_equal(result.scores_ss["token"], result.scores_ss["baseline"])
    np.testing.assert_array_equal(result.shares["token/causal"], result.shares["baseline/causal"])


def test_every_replacement_changes_the_scores(bos_result):
    base = bos_result.scores_ss["baseline"]
    for replacement in REPLACEMENTS:
        assert np.abs(bos_result.scores_ss[replacement] - base).max() > 1e-4, replacement


def test_replacements_change_bidirectional_patterns_too(tiny_model, prompts):
    """The bidirectional option runs full-length prompts; the replacements move the
    bidirectional shares (the ablation is not blind to position 0)."""
    result = bos_interventions(tiny_model, prompts, replacements=("mean",), early_queries=EARLY,
                               bidirectional=True, n_boot=10, n_buckets=10)
    assert result.statistics.metadata["prompt_tokens"] == prompts.shape[1]
    assert np.abs(result.shares["mean/bidirectional"] - result.shares["baseline/bidirectional"]).max() > 1e-3
    table = result.table()
    assert {"L_resid_debiased", "L_resid_relative", "L_mask_debiased"} <= set(table.columns)
    with torch.no_grad(), bidirectional(tiny_model):
        a = tiny_model.run_with_cache(prompts[:2], names_filter="blocks.0.attn.hook_pattern")[1]
        with replace_position_zero(tiny_model, "mean"):
            b = tiny_model.run_with_cache(prompts[:2], names_filter="blocks.0.attn.hook_pattern")[1]
    pa, pb = a["blocks.0.attn.hook_pattern"], b["blocks.0.attn.hook_pattern"]
    assert ((pa - pb).abs()[:, :, 1:EARLY] / pa[:, :, 1:EARLY]).mean() > 1e-3


def test_bos_interventions_validate_inputs(tiny_model, prompts):
    with pytest.raises(ValueError, match="replace_all"):
        bos_interventions(tiny_model, prompts, replacements=("replace_all",))
    with pytest.raises(ValueError, match="too few"):
        bos_interventions(tiny_model, prompts[:3])
    with pytest.raises(ValueError, match="aggregate"):
        BosInterventions(bos_interventions(tiny_model, prompts, replacements=(), n_boot=0,
                                           early_queries=EARLY, n_buckets=10).statistics, [], 0,
                         aggregate="max")
    assert default_replacement_token(torch.tensor([[0, 3, 3, 2], [0, 2, 3, 1]])) == 3


def test_bos_table_is_json_clean(bos_result):
    text = json.dumps(to_jsonable(bos_result.table().to_dict(orient="records")), allow_nan=False)
    assert "baseline" in text


@pytest.mark.real_model
def test_real_bos_interventions_move_the_scores(real_model):
    from rope_leak.corpus import load_corpus

    tokens = load_corpus(real_model, "wikipedia", n_prompts=16, n_tokens=64, seed=0).tokens
    result = bos_interventions(real_model, tokens, replacements=("mean", "zeros"), n_boot=200, n_buckets=16)
    assert result.statistics.metadata["prompt_tokens"] == 33
    table = result.table().set_index("replacement")
    # zeroing the position-0 embedding moves the early scores' absolute position far beyond
    # the baseline's interval (measured: 652 [374, 967] vs 77 [-5, 140] at 16 x 32)
    assert table.loc["zeros", "scores_ss_low"] > table.loc["baseline", "scores_ss_high"]
    # where the baseline's CI includes 0 the ratios are not estimable, not numbers
    for ratio, base in (("scores_ss_relative", "scores_ss"), ("L_total_relative", "L_total_debiased")):
        if table.loc["baseline", f"{base}_low"] <= 0:
            assert table[ratio].isna().all()


def test_bos_table_reads_the_completed_split_at_early_queries(tiny_model, prompts):
    """The completed split's parts per replacement (queries 8 <= i < 16): the baseline row
    equals the completed split of the baseline run computed on its own, the ratios are to
    the baseline, and replacing position 0 by itself changes nothing."""
    from rope_leak.fits.start_cut import completed_split

    result = bos_interventions(tiny_model, prompts, early_queries=16, n_boot=40, n_buckets=10)
    table = result.table().set_index("replacement")
    split = completed_split(result.statistics.conditions["baseline/causal"], jackknife=False)
    assert table.loc["baseline", "scores_part_ss"] == pytest.approx(float(np.nanmean(split.scores)), rel=1e-9)
    assert table.loc["baseline", "mask_part_ss"] == pytest.approx(float(np.nanmean(split.mask)), rel=1e-9)
    assert (table["scores_part_ss_low"] <= table["scores_part_ss_high"]).all()
    if table["scores_part_relative_estimable"].iloc[0]:
        np.testing.assert_allclose(table["scores_part_relative"],
                                   table["scores_part_ss"] / table.loc["baseline", "scores_part_ss"])
    assert table.loc["token", "scores_part_ss"] != table.loc["baseline", "scores_part_ss"]
    itself = bos_interventions(tiny_model, prompts, replacements=("token",), token_id=0, early_queries=16,
                               n_boot=0, n_buckets=10).table().set_index("replacement")
    assert itself.loc["token", "scores_part_ss"] == itself.loc["baseline", "scores_part_ss"]
