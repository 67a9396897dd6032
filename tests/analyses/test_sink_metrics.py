"""Sink metrics by name (Gu et al.'s alpha and sink ratio vs rope_leak's score), the BOS
status with the position-0 spread by token, "not estimable" where nothing can be
estimated, and check_bos on models with and without BOS."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from rope_leak.analyses.analysis import MissingBOSError, StrayBOSWarning, analyze, check_bos
from rope_leak.analyses.bos_status import bos_status, spread_text
from rope_leak.analyses.sink_scores import (
    alpha0_from_score,
    gu_alpha0,
    gu_alpha_from_pattern,
    gu_sink_ratio,
    sink_metrics,
    sink_scores,
)
from rope_leak.analyses.trajectory import position_zero_trajectories
from rope_leak.backends import tiny_rope_model
from rope_leak.engine.run import run_statistics
from rope_leak.interventions.mask import bidirectional
from rope_leak.output.results import to_jsonable

# A causal 4 x 4 pattern, rows summing to 1, by hand.
PATTERN = np.array([
    [1.0, 0.0, 0.0, 0.0],
    [0.5, 0.5, 0.0, 0.0],
    [0.2, 0.3, 0.5, 0.0],
    [0.1, 0.2, 0.3, 0.4],
])


def test_gu_alpha_on_a_hand_computed_pattern():
    # alpha_k = (1 / (T - k)) * sum_{i >= k} A[i, k], query k included
    assert gu_alpha_from_pattern(PATTERN, 0) == pytest.approx((1 + 0.5 + 0.2 + 0.1) / 4)  # 0.45
    assert gu_alpha_from_pattern(PATTERN, 1) == pytest.approx((0.5 + 0.3 + 0.2) / 3)
    assert gu_alpha_from_pattern(PATTERN, 2) == pytest.approx((0.5 + 0.3) / 2)
    assert gu_alpha_from_pattern(PATTERN, 3) == pytest.approx(0.4)
    own = PATTERN[1:, 0].mean()  # rope_leak's score: i >= 1 only
    assert own == pytest.approx(0.8 / 3)
    assert alpha0_from_score(own, 4) == pytest.approx(0.45)
    # the two metrics disagree at eps = 0.3 on this head: not the same metric
    assert gu_alpha_from_pattern(PATTERN, 0) > 0.3 > own
    # sink ratio: fraction of all heads with alpha_0 > eps
    assert gu_sink_ratio(np.array([[0.45, 0.1], [0.31, 0.3]])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="epsilon"):
        gu_sink_ratio(np.zeros(2), epsilon=2)


def test_gu_alpha_from_the_engine_matches_patterns(tiny_model, tiny_tokens):
    stats = run_statistics(tiny_model, tiny_tokens, targets=("pattern",), progress=False, n_buckets=4)
    causal = stats.conditions["causal"]
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tiny_tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    reference = np.stack([gu_alpha_from_pattern(cache[f"blocks.{l}.attn.hook_pattern"].double().numpy(), 0)
                          .mean(0) for l in range(tiny_model.cfg.n_layers)])
    np.testing.assert_allclose(gu_alpha0(causal), reference, rtol=1e-6)
    metrics = sink_metrics(causal)
    gu, own = metrics["gu_et_al_2025"], metrics["rope_leak_sink_score"]
    assert gu["epsilon"] == 0.3 and "ICLR 2025" in gu["source"] and "Gu et al." in own["threshold_source"]
    assert gu["sink_ratio"] == pytest.approx((reference > 0.3).mean())
    assert len(own["sink_heads"]) == int((sink_scores(causal) > 0.3).sum())
    assert "query 0 included" in gu["definition"] and "i >= 1" in own["definition"]


def test_analysis_reports_both_metrics(tiny_model, tiny_tokens):
    analysis = analyze(tiny_model, tiny_tokens, progress=False, n_boot=20)
    heads = analysis.heads()
    np.testing.assert_allclose(heads["alpha0_gu"], alpha0_from_score(heads["sink_score"], tiny_tokens.shape[1]))
    summary = analysis.summary()
    assert set(summary["sink_metrics"]) == {"gu_et_al_2025", "rope_leak_sink_score"}
    assert summary["bos_status"]["position_zero"] == "bos"


# -- BOS status and the position-0 spread by token -------------------------------------------
def test_bos_status_with_bos(tiny_model, tiny_tokens):
    status = bos_status(tiny_model, tiny_tokens)
    assert status["position_zero"] == "bos" and status["model_prepends_bos"]
    assert "same for every prompt" in status["implication"]
    assert status["max_within_token_std"] == 0.0  # 12 different prompts, one position-0 stream
    assert status["between_token_std"] is None  # one token: no between-token spread to estimate
    assert "between tokens not estimable" in spread_text(status)


@pytest.fixture(scope="module")
def no_bos_model():
    """A tiny Llama-style model that prepends no BOS."""
    return tiny_rope_model(seed=1, default_prepend_bos=False)


def test_bos_status_without_bos_groups_by_first_token(no_bos_model, tiny_tokens):
    tokens = tiny_tokens.clone()
    tokens[:, 0] = torch.tensor([5, 5, 5, 7, 7, 9, 11, 12, 13, 14, 15, 16])
    status = bos_status(no_bos_model, tokens)
    assert status["position_zero"] == "ordinary tokens" and not status["model_prepends_bos"]
    assert "vary with that token" in status["implication"]
    assert status["n_tokens_repeated"] == 2 and status["prompts_in_repeated_tokens"] == 5
    assert status["max_within_token_std"] == 0.0  # measured on the groups {5, 5, 5} and {7, 7}
    assert status["max_between_token_std"] > 0.1
    # the full-length main pass gives the same cross-prompt std (prefix shortcut is exact)
    stats = run_statistics(no_bos_model, tokens, targets=("pattern",), progress=False, n_buckets=4)
    np.testing.assert_allclose(status["cross_prompt_std"], stats.conditions["causal"].position_zero.std(),
                               rtol=1e-4)


def test_within_token_spread_not_estimable_when_first_tokens_are_unique(no_bos_model, tiny_tokens):
    tokens = tiny_tokens.clone()
    tokens[:, 0] = torch.arange(1, 13)
    status = bos_status(no_bos_model, tokens)
    assert status["within_token_std"] is None and status["max_within_token_std"] is None
    assert "within a token not estimable" in spread_text(status)
    assert json.loads(json.dumps(to_jsonable(status)))["max_within_token_std"] is None


def test_bidirectional_trajectory_of_unique_first_tokens_is_not_estimable(no_bos_model, tiny_tokens):
    tokens = tiny_tokens.clone()
    tokens[:, 0] = torch.arange(1, 13)
    traj = position_zero_trajectories(no_bos_model, tokens[:6], condition=bidirectional,
                                      condition_name="bidirectional")
    assert traj.max_within_token_deviation() is None  # not 0.0
    summary = traj.to_dict()
    assert summary["max_within_token_deviation"] is None and not summary["within_token_estimable"]
    assert all(v is None for v in summary["within_token_std"]) and not summary["forced_tokens"]
    assert traj.within_token_spread()["max_abs_deviation"].isna().all()


def test_forced_trajectory_tokens_are_marked(tiny_model, tiny_tokens):
    traj = position_zero_trajectories(tiny_model, tiny_tokens[:4], [3, 3, 8, 8])
    summary = traj.to_dict()
    assert summary["forced_tokens"] and summary["max_within_token_deviation"] == 0.0


# -- check_bos ---------------------------------------------------------------------------------
def _caught(model, tokens, action="warn"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_bos(model, tokens, action)
    return [w for w in caught if issubclass(w.category, StrayBOSWarning)]


def test_check_bos_warns_on_a_stray_bos_without_bos(no_bos_model, tiny_tokens):
    clean = tiny_tokens.clone()
    clean[:, 0] = 7
    assert not _caught(no_bos_model, clean)
    stray = tiny_tokens.clone()  # token 0 at position 0: the tokenizer's BOS, which this model never prepends
    found = _caught(no_bos_model, stray)
    assert len(found) == 1 and "prepends no BOS" in str(found[0].message) and "Fix:" in str(found[0].message)
    assert not _caught(no_bos_model, stray, "ignore")


def test_check_bos_warns_on_a_bos_after_position_zero(tiny_model, no_bos_model, tiny_tokens):
    inside = tiny_tokens.clone()
    inside[3, 7] = 0
    found = _caught(tiny_model, inside)
    assert len(found) == 1 and "position 7" in str(found[0].message)
    later = tiny_tokens.clone()
    later[:, 0] = 9
    later[2, 5] = 0
    assert any("after position 0" in str(w.message) for w in _caught(no_bos_model, later))


def test_check_bos_tokenizer_eos_counts_for_models_without_bos(no_bos_model, tiny_tokens, monkeypatch):
    class Tokenizer:
        bos_token_id = None
        eos_token_id = 3

    monkeypatch.setattr(no_bos_model, "tokenizer", Tokenizer(), raising=False)
    tokens = tiny_tokens.clone()
    tokens[:, 0] = 9
    tokens[tokens == 3] = 4
    assert not _caught(no_bos_model, tokens)
    tokens[0, 0] = 3
    assert "tokenizer_eos=3" in str(_caught(no_bos_model, tokens)[0].message)


def test_missing_bos_is_still_an_error(tiny_model, tiny_tokens):
    tokens = tiny_tokens.clone()
    tokens[0, 0] = 5
    with pytest.raises(MissingBOSError, match="Fix"):
        check_bos(tiny_model, tokens)
