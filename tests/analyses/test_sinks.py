"""Claims about sinks and position 0 (docs/method.md), each a test that fails if the
claim is false: the position-0 trajectory, sink-reading heads, the fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rope_leak.analyses.fingerprint import bag_of_tokens, fingerprint, probe, probe_table
from rope_leak.analyses.sink_reading import sink_reading
from rope_leak.analyses.trajectory import position_zero_trajectories
from rope_leak.interventions.mask import bidirectional
from rope_leak.interventions.position_zero_patch import (
    patch_position_zero,
    record_position_zero,
    replace_all_position_zero,
    token_trajectory,
)


def random_prompts(n_prompts: int, n_tokens: int, seed: int = 0, bos: int | None = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (n_prompts, n_tokens), generator=gen)
    if bos is not None:
        tokens[:, 0] = bos
    return tokens


def topic_prompts(n_prompts: int = 64, n_tokens: int = 32, n_topics: int = 4, seed: int = 1, bos: bool = True):
    """Prompts from ``n_topics`` disjoint 12-token vocabularies ("documents"); returns the
    tokens and the one-hot topic of each prompt."""
    gen = torch.Generator().manual_seed(seed)
    topic = torch.arange(n_prompts) % n_topics
    tokens = 1 + topic[:, None] * 12 + torch.randint(0, 12, (n_prompts, n_tokens), generator=gen)
    if bos:
        tokens[:, 0] = 0
    return tokens, np.eye(n_topics)[topic.numpy()]


def outputs(model, tokens):
    with torch.no_grad():
        return model(tokens)


# -- interventions restore the model -----------------------------------------------------
def test_patch_position_zero_restores_model_also_on_error(tiny_model, tiny_tokens):
    before = outputs(tiny_model, tiny_tokens)
    source = record_position_zero(tiny_model, tiny_tokens[:3])  # 3 prompts: wrong batch
    with pytest.raises(ValueError, match="source holds 3 prompts"):
        with patch_position_zero(tiny_model, source):
            tiny_model(tiny_tokens)
    with replace_all_position_zero(tiny_model, 7):
        changed = outputs(tiny_model, tiny_tokens)
    assert not torch.equal(changed, before)
    assert torch.equal(outputs(tiny_model, tiny_tokens), before)
    assert all(not hp._forward_hooks for hp in tiny_model.hook_dict.values())


def test_patch_position_zero_rejects_bad_shapes(tiny_model):
    with pytest.raises(ValueError, match="expected"):
        with patch_position_zero(tiny_model, torch.zeros(1, 64)):
            pass
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_trajectory(tiny_model, 50)


def test_replace_all_equals_token_replacement_under_causal_mask(tiny_model, tiny_tokens):
    swapped = tiny_tokens.clone()
    swapped[:, 0] = 7
    with replace_all_position_zero(tiny_model, 7):
        pinned = outputs(tiny_model, tiny_tokens)
    torch.testing.assert_close(pinned, outputs(tiny_model, swapped), atol=1e-5, rtol=1e-5)


# -- claim 2: position-0 trajectory -------------------------------------------------------
def test_trajectory_identical_for_shared_token_and_different_across_tokens(tiny_model):
    tokens = random_prompts(12, 16)
    position_zero = [0, 0, 0, 0, 5, 5, 5, 5, 9, 9, 9, 9]
    traj = position_zero_trajectories(tiny_model, tokens, position_zero, batch_size=5)
    spread = traj.within_token_spread()
    assert (spread["max_abs_deviation"] == 0).all()  # exactly identical, across batches too
    assert (spread["std"] == 0).all()
    between = traj.between_token_distance()
    assert (between["relative_min_distance"] > 0.1).all()
    # the trajectory is the token's own: a one-token forward pass gives the same stream
    torch.testing.assert_close(torch.as_tensor(traj.resid[4]).float(), token_trajectory(tiny_model, 5),
                               atol=1e-5, rtol=1e-5)


def test_trajectory_spreads_under_bidirectional_mask(tiny_model, tiny_tokens):
    traj = position_zero_trajectories(tiny_model, tiny_tokens, condition=bidirectional,
                                      condition_name="bidirectional")
    spread = traj.within_token_spread().set_index("depth")
    assert spread.loc[0, "max_abs_deviation"] == 0  # the embedding itself
    assert (spread.loc[1:, "std"] > 1e-3).all()
    assert traj.to_dict()["condition"] == "bidirectional"


def test_trajectory_rejects_wrong_token_count(tiny_model, tiny_tokens):
    with pytest.raises(ValueError, match="one token per prompt"):
        position_zero_trajectories(tiny_model, tiny_tokens, [0, 1])


# -- claim 3: sink-reading heads ----------------------------------------------------------
def test_sink_reading_matches_full_forward_patch(tiny_model):
    tokens = random_prompts(6, 16)
    result = sink_reading(tiny_model, tokens, source_token_id=7, batch_size=4)
    source_tokens = tokens.clone()
    source_tokens[:, 0] = 7
    source = record_position_zero(tiny_model, source_tokens)
    for layer in range(tiny_model.cfg.n_layers):
        name = f"blocks.{layer}.attn.hook_z"
        _, clean = tiny_model.run_with_cache(tokens, names_filter=name)
        with patch_position_zero(tiny_model, source, layers=[layer]):
            _, patched = tiny_model.run_with_cache(tokens, names_filter=name)
        W_O = tiny_model.blocks[layer].attn.W_O.detach()
        r = torch.einsum("bphd,hdm->bphm", clean[name][:, 1:], W_O)
        r2 = torch.einsum("bphd,hdm->bphm", patched[name][:, 1:], W_O)
        expected = (((r2 - r) ** 2).sum((0, 1, 3)) / (r**2).sum((0, 1, 3))).sqrt()
        np.testing.assert_allclose(result.relative_change[layer], expected.numpy(), rtol=1e-4, atol=1e-6)


def block_and_force_key_zero(layer: int, blind_head: int, sink_head: int):
    """A hook on ``hook_attn_scores``: ``blind_head`` cannot see key 0, ``sink_head``
    attends to it strongly."""

    def hook(scores, hook):
        scores = scores.clone()
        scores[:, blind_head, :, 0] = float("-inf")
        scores[:, sink_head, 1:, 0] += 8.0
        return scores

    return [(f"blocks.{layer}.attn.hook_attn_scores", hook)]


def test_head_blind_to_key_zero_is_not_sink_reading_and_forced_sink_is(tiny_model):
    tokens = random_prompts(8, 16)
    with tiny_model.hooks(fwd_hooks=block_and_force_key_zero(0, blind_head=2, sink_head=1)):
        result = sink_reading(tiny_model, tokens, source_token_id=7, threshold=0.1)
    assert result.relative_change[0, 2] < 1e-6
    assert result.key0_fraction[0, 2] == 0
    assert (0, 2) not in result.heads()
    assert (0, 1) in result.heads()
    assert result.key0_fraction[0, 1] > 0.5
    assert result.key0_fraction[0, 1] > 3 * result.key0_fraction[0, 0]
    assert ((result.key0_fraction >= 0) & (result.key0_fraction <= 1)).all()
    boot = result.bootstrap(n_boot=50)
    assert (boot["relative_change_low"] <= result.relative_change + 1e-12).all()
    assert (boot["relative_change_high"] >= result.relative_change - 1e-12).all()
    table = result.table(n_boot=20)
    assert len(table) == 8 and {"relative_change", "key0_fraction", "sink_reading",
                                "key0_fraction_low", "sink_reading_qvalue"} <= set(table.columns)
    # FDR-controlled significance: the forced sink head is significant, the blind one is not.
    significance = result.significance()
    assert significance["significant"][0, 1] and significance["qvalue"][0, 1] < 0.05
    assert not significance["significant"][0, 2] and significance["pvalue"][0, 2] == 1.0


def test_sink_reading_refuses_a_no_op_patch(tiny_model, tiny_tokens):
    with pytest.raises(ValueError, match="no-op"):
        sink_reading(tiny_model, tiny_tokens, source_token_id=0)


# -- claim 4: fingerprint -----------------------------------------------------------------
ALL_TINY_HEADS = [(l, h) for l in range(2) for h in range(4)]


def test_fingerprint_constant_with_bos_and_varies_without(tiny_model):
    tokens = random_prompts(12, 16)
    with_bos = fingerprint(tiny_model, tokens, ALL_TINY_HEADS, batch_size=12).spread()
    assert (with_bos["fingerprint_max_abs_deviation"] == 0).all()  # one batch: exactly
    assert (with_bos["fingerprint_std"] == 0).all()
    batched = fingerprint(tiny_model, tokens, ALL_TINY_HEADS, batch_size=5).spread()
    assert (batched["fingerprint_relative_deviation"] < 1e-5).all()  # batch shapes: rounding
    # what is written = A[i,0] * fingerprint: one fixed direction per head
    assert (with_bos["written_min_cosine"] > 1 - 1e-6).all()
    without_bos = fingerprint(tiny_model, tokens[:, 1:], ALL_TINY_HEADS).spread()
    assert (without_bos["fingerprint_relative_deviation"] > 0.1).all()


def test_probe_on_fingerprint_is_at_chance_while_ordinary_position_decodes(tiny_model):
    tokens, topic = topic_prompts()
    fp = fingerprint(tiny_model, tokens, ALL_TINY_HEADS)
    table = probe_table(fp, topic, kinds=("fingerprint", "control_resid"), n_permutations=30).set_index("features")
    assert table.loc["fingerprint", "r2"] <= 0
    assert table.loc["fingerprint", "p_value"] >= 0.05
    assert table.loc["control_resid", "r2"] > 0.2
    assert table.loc["control_resid", "p_value"] < 0.05


def test_probe_decodes_position_zero_content_when_it_is_not_bos(tiny_model):
    """The probe is not blind: once position 0 holds a content token, the fingerprint
    carries the prompt's topic."""
    tokens, topic = topic_prompts(bos=False)
    fp = fingerprint(tiny_model, tokens, ALL_TINY_HEADS)
    result = probe(fp.features("fingerprint"), topic, n_permutations=30)
    assert result.r2 > 0.2 and result.p_value < 0.05


def test_probe_null_on_unrelated_features():
    rng = np.random.default_rng(3)
    result = probe(rng.normal(size=(60, 40)), rng.normal(size=(60, 3)), n_permutations=50)
    assert result.r2 < 0.05 and result.p_value > 0.05


def test_bag_of_tokens_counts_frequencies():
    tokens = torch.tensor([[0, 1, 1, 2], [0, 2, 2, 2], [0, 1, 3, 3]])
    freq, top = bag_of_tokens(tokens, k=2)
    assert top.tolist() == [2, 1]
    np.testing.assert_allclose(freq, [[1 / 3, 2 / 3], [1.0, 0.0], [0.0, 1 / 3]])
    with pytest.raises(ValueError):
        probe(np.zeros((4, 2)), np.zeros(4))


# -- real model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_tokens(real_model):
    from rope_leak.corpus import load_corpus

    return load_corpus(real_model, "wikipedia", n_prompts=32, n_tokens=64, seed=0).tokens


@pytest.mark.real_model
def test_real_trajectory_by_token(real_model, real_tokens):
    bos = int(real_tokens[0, 0])
    traj = position_zero_trajectories(real_model, real_tokens[:6], [bos, bos, 504, 504, 28, 28])
    assert (traj.within_token_spread()["max_abs_deviation"] == 0).all()
    assert (traj.between_token_distance()["relative_min_distance"] > 0.01).all()


@pytest.fixture(scope="module")
def real_document_corpus(real_model):
    """24 prompts of 64 tokens from the 4 longest Wikipedia articles (6 per article)."""
    from rope_leak.corpus import load_corpus
    from rope_leak.corpus.wikipedia import wikipedia_documents

    documents = sorted(wikipedia_documents(), key=lambda d: len(d.text))[-4:]
    return load_corpus(real_model, documents, n_prompts=24, n_tokens=64, seed=0)


@pytest.mark.real_model
def test_real_fingerprint_constant_and_undecodable(real_model, real_document_corpus):
    from rope_leak.analyses.bos_interventions import default_replacement_token
    from rope_leak.analyses.sinks import content_targets

    tokens = real_document_corpus.tokens
    reading = sink_reading(real_model, tokens[:4], source_token_id=default_replacement_token(tokens))
    heads = reading.heads()
    assert heads, "SmolLM2 should have sink-reading heads"
    fp = fingerprint(real_model, tokens, heads, batch_size=8)
    assert (fp.spread()["fingerprint_relative_deviation"] < 1e-5).all()
    targets, kind = content_targets(tokens, real_document_corpus.doc_ids)
    assert kind == "document"
    table = probe_table(fp, targets, kinds=("fingerprint", "control_resid"), n_permutations=30).set_index("features")
    assert table.loc["fingerprint", "p_value"] >= 0.05 and table.loc["fingerprint", "r2"] <= 0
    assert table.loc["control_resid", "p_value"] < 0.05 and table.loc["control_resid", "r2"] > 0
