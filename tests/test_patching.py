"""Per-head patching helpers and BOS interventions on the
decomposition: each claim a test that fails when it is false."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from rope_leak import patching
from rope_leak.engine.pairs import PairSpec
from rope_leak.engine.run import run_statistics
from rope_leak.interventions.mask import bidirectional, causal
from rope_leak.interventions.position_zero import replace_position_zero
from rope_leak.metrics.bos import REPLACEMENTS, bos_interventions, default_replacement_token
from rope_leak.metrics.shares import fit_shares

BUCKETS = 8


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (8, 16), generator=gen)
    tokens[:, 0] = 0
    return tokens


def assert_model_restored(model, tokens, reference):
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference, atol=0, rtol=0)
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    assert all(block.attn._attention_dir_override is None or block.attn._attention_dir_override
               == model.cfg.attention_dir for block in model.blocks)


@pytest.fixture(scope="module")
def reference_logits(tiny_model, prompts):
    with torch.no_grad():
        return tiny_model(prompts)


# -- patching -------------------------------------------------------------------------------
def test_mask_swap_by_layer_leaves_upstream_heads_exactly_unchanged(tiny_model, prompts, reference_logits):
    result = patching.mask_swap_by_layer(tiny_model, prompts, n_buckets=BUCKETS)
    assert result.sources == ["L0", "L1"] and result.effect.shape == (2, 2, 4)
    assert (result.effect[1, 0] == 0).all()  # swap in layer 1: layer 0 untouched
    assert np.abs(result.effect[0, 0]).max() > 1e-3  # swap in layer 0 changes layer 0
    assert np.abs(result.effect[1, 1]).max() > 1e-3
    table = result.table("L1")
    assert table.shape == (2, 4) and table.index.name == "layer"
    assert len(result.to_frame()) == 16
    assert_model_restored(tiny_model, prompts, reference_logits)


def test_mask_swap_by_head_touches_only_that_head_in_its_layer(tiny_model, prompts, reference_logits):
    result = patching.mask_swap_by_head(tiny_model, prompts, [(0, 1), (1, 2)], n_buckets=BUCKETS)
    effect = result.table("L0H1").to_numpy()
    others = [h for h in range(4) if h != 1]
    assert (effect[0, others] == 0).all()
    assert abs(effect[0, 1]) > 1e-3
    assert np.abs(effect[1]).max() > 0  # downstream heads feel it
    late = result.table("L1H2").to_numpy()
    assert (late[0] == 0).all() and (late[1, [0, 1, 3]] == 0).all() and abs(late[1, 2]) > 1e-3
    assert_model_restored(tiny_model, prompts, reference_logits)


def test_patch_head_output_from_bidirectional_equals_single_head_mask_swap_downstream(tiny_model, prompts):
    """Layer 0's input is the same under any mask, so taking head L0H1's output from the
    fully bidirectional run is the same as swapping that head's mask alone."""
    patched = patching.patch_head_output(tiny_model, prompts, [(0, 1)], source=bidirectional,
                                         n_buckets=BUCKETS)
    swapped = patching.mask_swap_by_head(tiny_model, prompts, [(0, 1)], n_buckets=BUCKETS)
    assert (patched.effect[0, 0] == 0).all()  # patched after layer 0's pattern
    np.testing.assert_allclose(patched.effect[0, 1], swapped.effect[0, 1], atol=1e-6)
    assert np.abs(patched.effect[0, 1]).max() > 1e-3


def test_patch_head_output_from_same_condition_is_a_no_op(tiny_model, prompts):
    result = patching.patch_head_output(tiny_model, prompts, [(0, 0), (0, 3)], source=causal,
                                        n_buckets=BUCKETS)
    assert (result.effect == 0).all()


def test_patch_position_zero_resid_matches_token_replacement(tiny_model, prompts, reference_logits):
    source = partial(replace_position_zero, replacement="token", token_id=7)
    result = patching.patch_position_zero_resid(tiny_model, prompts, source=source, n_buckets=BUCKETS)
    assert result.sources == ["L0", "L1", "all"]
    assert (result.effect[1, 0] == 0).all()  # patch at layer 1's input: layer 0 untouched
    assert np.abs(result.effect[1, 1]).max() > 1e-3
    # position 0 is a closed system: patching it at layer 0 = at every layer = swapping the token
    np.testing.assert_allclose(result.patched[0], result.patched[2], atol=1e-5)
    stats = run_statistics(tiny_model, prompts, conditions={"swap": source}, targets=("pattern",),
                           n_buckets=BUCKETS, progress=False)
    np.testing.assert_allclose(result.patched[2], fit_shares(stats.conditions["swap"].targets["pattern"]).share,
                               atol=1e-5)
    assert_model_restored(tiny_model, prompts, reference_logits)


def test_patching_rejects_missing_heads(tiny_model, prompts):
    with pytest.raises(ValueError, match="does not exist"):
        patching.mask_swap_by_head(tiny_model, prompts, [(0, 9)])
    with pytest.raises(ValueError, match="too few"):
        patching.mask_swap_by_layer(tiny_model, prompts[:3])


# -- BOS interventions ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def bos_result(tiny_model, prompts):
    return bos_interventions(tiny_model, prompts, spec=PairSpec(max_query=12), n_boot=30, n_buckets=BUCKETS)


def test_bos_table_has_every_replacement_with_cis(bos_result):
    table = bos_result.table().set_index("replacement")
    assert list(table.index) == ["baseline", *REPLACEMENTS]
    assert table.loc["baseline", "leakage_relative"] == pytest.approx(1.0)
    assert table.loc["baseline", "resid_removed_fraction"] == pytest.approx(0.0)
    for metric in ("L_total", "L_resid", "leakage_relative", "resid_removed_fraction"):
        # percentile intervals of a cross-fitted (biased) statistic need not contain the
        # point estimate; they must be ordered, finite and not degenerate
        assert (table[f"{metric}_low"] <= table[f"{metric}_high"]).all()
        assert np.isfinite(table[[f"{metric}_low", f"{metric}_high"]].to_numpy()).all()
    assert (table.loc[list(REPLACEMENTS), "L_resid_high"] > table.loc[list(REPLACEMENTS), "L_resid_low"]).all()
    # the debiased share's pivotal interval is centred on the estimate's scale: it covers it
    assert ((table["L_resid_low"] <= table["L_resid"]) & (table["L_resid"] <= table["L_resid_high"])).all()
    np.testing.assert_allclose(table["L_mask"], table["L_total"] - table["L_resid"])
    assert (table["n_prompts"] == 8).all()


def test_bos_estimators_agree_with_the_share_fits(bos_result):
    from rope_leak.metrics.bos import BosInterventions
    from rope_leak.stats.debias import debiased_share

    for name, cond in bos_result.statistics.conditions.items():
        np.testing.assert_allclose(bos_result.shares[name], debiased_share(cond.targets["pattern"]))
    crossfit = BosInterventions(bos_result.statistics, bos_result.replacements, bos_result.token_id,
                                n_boot=5, estimator="crossfit")
    for name, cond in bos_result.statistics.conditions.items():
        np.testing.assert_allclose(crossfit.shares[name], fit_shares(cond.targets["pattern"]).share, rtol=1e-5,
                                   atol=1e-10)
    assert (crossfit.table()["estimator"] == "crossfit").all()
    with pytest.raises(ValueError, match="estimator"):
        BosInterventions(bos_result.statistics, [], 0, estimator="bogus")


def test_bos_median_aggregate(tiny_model, prompts, bos_result):
    from rope_leak.metrics.bos import BosInterventions

    median = BosInterventions(bos_result.statistics, bos_result.replacements, bos_result.token_id,
                              n_boot=0, aggregate="median").table().set_index("replacement")
    for name in median.index:
        assert median.loc[name, "L_resid"] == pytest.approx(
            np.median(bos_result.shares[f"{name}/bidirectional"]))
    with pytest.raises(ValueError, match="aggregate"):
        BosInterventions(bos_result.statistics, [], 0, aggregate="max")


def test_every_replacement_changes_the_residual_component(bos_result):
    table = bos_result.table().set_index("replacement")
    for replacement in REPLACEMENTS:
        assert abs(table.loc[replacement, "resid_removed_fraction"]) > 1e-3, replacement


def test_replace_all_equals_token_under_causal_but_not_bidirectional(bos_result):
    shares = bos_result.shares
    np.testing.assert_allclose(shares["replace_all/causal"], shares["token/causal"], atol=1e-5)
    assert np.abs(shares["replace_all/bidirectional"] - shares["token/bidirectional"]).max() > 1e-3


def test_replacing_bos_by_itself_removes_nothing(tiny_model, prompts):
    result = bos_interventions(tiny_model, prompts, replacements=("token", "replace_all"), token_id=0,
                               spec=PairSpec(max_query=12), n_boot=0, n_buckets=BUCKETS)
    table = result.table().set_index("replacement")
    assert table.loc["token", "resid_removed_fraction"] == pytest.approx(0.0, abs=1e-6)
    assert table.loc["token", "leakage_relative"] == pytest.approx(1.0, abs=1e-6)
    assert table.loc["replace_all", "leakage_relative"] == pytest.approx(1.0, abs=1e-5)
    # The ablation-free split sees no change either.
    assert table.loc["token", "split_resid_relative"] == pytest.approx(1.0, abs=1e-6)
    assert table.loc["token", "split_mask"] == pytest.approx(table.loc["baseline", "split_mask"], rel=1e-6)


def test_bos_swap_is_read_by_both_decompositions(tiny_model, prompts):
    table = bos_interventions(tiny_model, prompts, replacements=("zeros",), n_boot=0,
                              n_buckets=BUCKETS).table().set_index("replacement")
    assert {"split_resid", "split_mask", "split_composition"} <= set(table.columns)
    # Zeroing position 0 changes what the residual stream carries: the split's scores part moves.
    assert table.loc["zeros", "split_resid_relative"] != pytest.approx(1.0, abs=1e-3)


def test_bos_interventions_validate_inputs(tiny_model, prompts):
    with pytest.raises(ValueError, match="unknown replacements"):
        bos_interventions(tiny_model, prompts, replacements=("bogus",))
    assert default_replacement_token(torch.tensor([[0, 3, 3, 2], [0, 2, 3, 1]])) == 3


@pytest.mark.real_model
def test_real_bos_interventions_change_the_residual_component(real_model):
    from rope_leak.corpus import load_corpus

    tokens = load_corpus(real_model, "wikipedia", n_prompts=8, n_tokens=48, seed=0).tokens
    result = bos_interventions(real_model, tokens, replacements=("token", "zeros", "replace_all"),
                               n_boot=50, n_buckets=8)
    # 8 prompts are far too few for the fractions themselves (cross-fitted shares are
    # biased low); check what holds at any sample size
    # equal up to float rounding (the pinned trajectory comes from a one-token pass), which
    # heads with a nearly constant pattern amplify: relative tolerance as well
    np.testing.assert_allclose(result.shares["replace_all/causal"], result.shares["token/causal"],
                               atol=1e-4, rtol=1e-3)
    base = result.shares["baseline/bidirectional"]
    for replacement in ("token", "zeros", "replace_all"):
        assert np.abs(result.shares[f"{replacement}/bidirectional"] - base).max() > 1e-3
    assert np.isfinite(result.table()["L_resid"]).all()
