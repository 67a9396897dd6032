"""Per-head patching helpers: each claim a test that fails when it is false. (The BOS
interventions are tested in tests/test_bos.py.)"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from rope_leak.analyses import patching
from rope_leak.engine.run import run_statistics
from rope_leak.fits.shares import fit_shares
from rope_leak.interventions.mask import bidirectional, causal
from rope_leak.interventions.position_zero import replace_position_zero

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


