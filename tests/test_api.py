"""The notebook-facing API: one head-spec normaliser, one RoPE check, short reprs,
hooks that behave alike under ``reset_hooks``, clear explorer errors, explicitly named
estimators, progress switches, no process-wide side effects on import or analysis."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import rope_leak as rl
from rope_leak.analyses import explore, patching
from rope_leak.backends.requirements import NotRoPEModelError
from rope_leak.corpus import make_random_corpus
from rope_leak.fits.shares import fitted_cells
from rope_leak.heads import HeadSpecError, normalize_head, normalize_heads, normalize_layers
from rope_leak.interventions.mask import bidirectional
from rope_leak.interventions.position_zero import replace_position_zero
from rope_leak.interventions.position_zero_patch import patch_position_zero, token_trajectory
from rope_leak.quantities import QUANTITIES

N_LAYERS, N_HEADS = 2, 4


@pytest.fixture(scope="module")
def model():
    return rl.tiny_rope_model(n_layers=N_LAYERS, n_heads=N_HEADS, seed=3)


@pytest.fixture(scope="module")
def corpus():
    return make_random_corpus(8, 16, 50, seed=1, bos_token_id=0)


@pytest.fixture(scope="module")
def analysis(model, corpus):
    return rl.analyze(model, corpus, n_boot=40, progress=False, cell_maps=True)


@pytest.fixture(scope="module")
def standard_model():
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, n_ctx=32, d_vocab=50,
                                  act_fn="gelu", positional_embedding_type="standard",
                                  default_prepend_bos=True, seed=0)
    return HookedTransformer(cfg).eval()


# -- one head-spec normaliser ------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ((0, 1), [(0, 1)]),
    ([(0, 1), (1, 3)], [(0, 1), (1, 3)]),
    ({0: [1], 1: 3}, [(0, 1), (1, 3)]),
    ({1: None}, [(1, h) for h in range(N_HEADS)]),
    ("L1H2", [(1, 2)]),
    ("l1h2", [(1, 2)]),
    (["L0H1", (1, 0)], [(0, 1), (1, 0)]),
    (1, [(1, h) for h in range(N_HEADS)]),
    ("L0", [(0, h) for h in range(N_HEADS)]),
    (None, [(l, h) for l in range(N_LAYERS) for h in range(N_HEADS)]),
    ([(1, 0), (1, 0), (0, np.int64(2))], [(0, 2), (1, 0)]),
])
def test_head_specs_all_normalise_to_pairs(model, spec, expected):
    assert normalize_heads(spec, model) == expected


@pytest.mark.parametrize("spec, message", [
    ((2, 0), r"head L2H0 does not exist.*layers 0\.\.1"),
    ((0, 4), r"head L0H4 does not exist.*heads 0\.\.3"),
    ("L9H0", r"layers 0\.\.1"),
    ("layer 3", "not a head or layer label"),
    ([0, 1], "ambiguous"),
    ([], "names no head"),
    ({0: ["a"]}, "not a head index"),
    (1.5, "cannot read heads"),
])
def test_bad_head_specs_are_clear_errors(model, spec, message):
    with pytest.raises(HeadSpecError, match=message):
        normalize_heads(spec, model)


def test_layer_specs(model):
    assert normalize_layers(None, model) == [0, 1]
    assert normalize_layers(1, model) == [1]
    assert normalize_layers(["L1", 0], model) == [0, 1]
    with pytest.raises(HeadSpecError, match=r"layer 5 does not exist.*layers 0\.\.1"):
        normalize_layers([5], model)
    with pytest.raises(HeadSpecError, match="names a head where a layer is expected"):
        normalize_layers("L0H1", model)
    with pytest.raises(HeadSpecError, match="not one"):
        normalize_head(0, model)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_bidirectional_takes_every_head_spec(model, corpus):
    tokens = corpus.tokens[:2]
    with bidirectional(model, heads={0: [1]}):
        reference = _logits(model, tokens)
    for spec in ([(0, 1)], (0, 1), "L0H1", ["L0H1"]):
        with bidirectional(model, heads=spec):
            torch.testing.assert_close(_logits(model, tokens), reference, rtol=0, atol=0)
    with bidirectional(model, layers=1):
        one = _logits(model, tokens)
    with bidirectional(model, layers=[1]):
        torch.testing.assert_close(_logits(model, tokens), one, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        with bidirectional(model, layers=[0], heads=[(0, 1)]):
            pass


def test_patching_takes_every_head_spec_and_reads_sites_by_label(model, corpus):
    by_dict = patching.mask_swap_by_head(model, corpus.tokens, heads={0: [1]}, progress=False)
    by_label = patching.mask_swap_by_head(model, corpus.tokens, heads="L0H1", progress=False)
    assert by_dict.sources == by_label.sources == ["L0H1"]
    np.testing.assert_array_equal(by_dict.patched, by_label.patched)
    table = by_dict.table("L0H1")
    np.testing.assert_array_equal(table.to_numpy(), by_dict.table((0, 1)).to_numpy())
    np.testing.assert_array_equal(table.to_numpy(), by_dict.table("l0h1").to_numpy())
    assert np.abs(table.to_numpy()).max() > 0
    layer = patching.mask_swap_by_layer(model, corpus.tokens, layers=1, progress=False)
    assert layer.sources == ["L1"]
    with pytest.raises(KeyError, match=r"'L0H1' is not a patch site.*'L1'"):
        layer.table("L0H1")
    with pytest.raises(HeadSpecError, match="does not exist"):
        patching.mask_swap_by_layer(model, corpus.tokens, layers=[7], progress=False)


def test_analysis_head(analysis):
    one = analysis.head("L1H2")
    assert (one.layer, one.head, one.label) == (1, 2, "L1H2")
    assert analysis.head(1, 2).numbers.equals(one.numbers)
    assert analysis.head((1, 2)).numbers.equals(one.numbers)
    row = analysis.heads().set_index("label").loc["L1H2"]
    for key in ("L_total_debiased", "L_total_ci_low", "L_total_ci_high", "sink_score", "pattern_L_total_crossfit"):
        assert one[key] == row[key]
    assert set(one.summary()) >= {"L_total_debiased", "L_resid_debiased", "L_mask_debiased", "sink_score",
                                  "sink_head", "additivity_violated"}
    # the profiles reproduce the in-sample M_abs fit at every scored cell, in their gauge
    stats = analysis.statistics.conditions["causal"].targets["pattern"]
    np.testing.assert_allclose(one.profiles.fitted(stats.design), fitted_cells(stats, "abs")[1, 2], atol=1e-10)
    assert abs(one.b.mean()) < 1e-12 and abs(one.c.mean()) < 1e-12
    assert list(one.a.index) == list(stats.design.offsets)
    bidir = analysis.head("L1H2", condition="bidirectional", target="scores")
    s2 = analysis.statistics.conditions["bidirectional"].targets["scores"]
    np.testing.assert_allclose(bidir.profiles.fitted(s2.design), fitted_cells(s2, "abs")[1, 2], atol=1e-9)
    with pytest.raises(HeadSpecError, match=r"heads 0\.\.3"):
        analysis.head(0, 7)
    with pytest.raises(ValueError, match="condition must be one of"):
        analysis.head("L0H0", condition="bidirectionl")
    with pytest.raises(KeyError, match="not a number of this head"):
        one["L_total"]


# -- one RoPE check --------------------------------------------------------------------------
def test_non_rope_models_are_refused_everywhere(standard_model):
    from rope_leak.analyses.fingerprint import fingerprint
    from rope_leak.analyses.sink_reading import sink_reading
    from rope_leak.analyses.trajectory import position_zero_trajectories
    from rope_leak.engine.run import run_statistics
    from rope_leak.interventions.rope import identity_rope

    tokens = make_random_corpus(8, 12, 50, seed=0, bos_token_id=0).tokens
    calls = {
        "analyze": lambda: rl.analyze(standard_model, tokens, progress=False),
        "run_statistics": lambda: run_statistics(standard_model, tokens, progress=False),
        "patching": lambda: patching.mask_swap_by_layer(standard_model, tokens, progress=False),
        "head_patterns": lambda: explore.head_patterns(standard_model, tokens, 0),
        "position_zero_patch": lambda: explore.position_zero_patch(standard_model, tokens, 0, 0, token_id=3),
        "bos_intervention_table": lambda: explore.bos_intervention_table(standard_model, tokens, progress=False),
        "sink_reading": lambda: sink_reading(standard_model, tokens, source_token_id=3),
        "fingerprint": lambda: fingerprint(standard_model, tokens, [(0, 0)]),
        "trajectories": lambda: position_zero_trajectories(standard_model, tokens),
        "RoPE controls": lambda: identity_rope(standard_model).__enter__(),
    }
    for name, call in calls.items():
        with pytest.raises(NotRoPEModelError, match="'standard' position embeddings, not rotary") as err:
            call()
        assert "Fix:" in str(err.value), name


# -- reprs -------------------------------------------------------------------------------------
def _check_display(obj, *must_contain):
    text = repr(obj)
    assert len(text) <= 400, (type(obj).__name__, len(text))
    assert "\n" not in text and "array(" not in text and "tensor(" not in text
    html = obj._repr_html_()
    assert html.startswith("<table") and len(html) < 3000
    for needle in must_contain:
        assert needle in text and needle in html, (needle, text)


def test_result_objects_have_short_reprs_and_html(model, corpus, analysis):
    from rope_leak.analyses.fingerprint import fingerprint
    from rope_leak.analyses.sink_reading import sink_reading
    from rope_leak.analyses.trajectory import position_zero_trajectories

    _check_display(analysis, "2 layers x 4 heads", "8 x 16 tokens")
    analysis.inference()
    _check_display(analysis, "composition_debiased")
    _check_display(corpus, "random")
    _check_display(analysis.head("L0H3"), "L0H3")
    result = patching.mask_swap_by_layer(model, corpus.tokens, progress=False)
    _check_display(result, "mask_swap_layer", "L0")
    reading = sink_reading(model, corpus.tokens[:4], source_token_id=7)
    _check_display(reading, "source_token_id")
    _check_display(position_zero_trajectories(model, corpus.tokens[:4]), "causal")
    _check_display(fingerprint(model, corpus.tokens, [(1, 0)]), "L1H0")


# -- explorer errors ---------------------------------------------------------------------------
def test_explore_errors_name_the_valid_values(model, corpus, analysis):
    tokens = corpus.tokens[:2]
    with pytest.raises(HeadSpecError, match=r"layer 7 does not exist.*layers 0\.\.1"):
        explore.head_patterns(model, tokens, 7)
    with pytest.raises(ValueError, match=r"'bidirectionl' is not one of \('causal', 'bidirectional'\)"):
        explore.head_patterns(model, tokens, 0, condition="bidirectionl")
    with pytest.raises(HeadSpecError, match=r"heads 0\.\.3"):
        explore.position_zero_patch(model, tokens, 0, 9, token_id=3)
    with pytest.raises(HeadSpecError, match=r"heads 0\.\.3"):
        explore.head_cell_maps(analysis, 1, 5)
    with pytest.raises(ValueError, match="not one of"):
        explore.head_cell_maps(analysis, "L1H1", condition="bidir")
    assert explore.head_patterns(model, tokens, "L1").shape == (N_HEADS, 16, 16)
    maps = explore.head_cell_maps(analysis, "L1H1")
    np.testing.assert_array_equal(maps["observed"], explore.head_cell_maps(analysis, 1, 1)["observed"])


# -- hooks behave alike under reset_hooks -------------------------------------------------------
INTERVENTIONS = {
    "replace_position_zero": lambda m: replace_position_zero(m, "token", token_id=5),
    "bidirectional_heads": lambda m: bidirectional(m, heads=[(0, 1), (1, 2)]),
    "bidirectional_all": lambda m: bidirectional(m),
    "patch_position_zero": lambda m: patch_position_zero(m, token_trajectory(m, 5), layers=[1]),
}


@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
def test_interventions_survive_reset_hooks_are_listed_and_restore(model, corpus, name):
    tokens = corpus.tokens[:3]
    baseline = _logits(model, tokens)
    make = INTERVENTIONS[name]
    with make(model):
        patched = _logits(model, tokens)
        listed = model.list_hooks()
        model.reset_hooks()
        after_reset = _logits(model, tokens)
        # the temporary hooks of run_with_cache do not strip it either
        logits, _ = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    assert not torch.equal(patched, baseline), "the intervention changes nothing on this model"
    torch.testing.assert_close(after_reset, patched, rtol=0, atol=0)
    torch.testing.assert_close(logits, patched, rtol=0, atol=0)
    if name != "bidirectional_all":  # a full swap is an override flag, no hook needed
        assert listed and all(h.is_permanent for handles in listed.values() for h in handles)
    assert model.list_hooks() == {}
    torch.testing.assert_close(_logits(model, tokens), baseline, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"):
        with make(model):
            raise RuntimeError("boom")
    assert model.list_hooks() == {}
    torch.testing.assert_close(_logits(model, tokens), baseline, rtol=0, atol=0)


def test_mask_hook_comes_before_user_hooks(model, corpus):
    seen = {}

    def spy(scores, hook):
        seen["scores"] = scores.detach().clone()

    with bidirectional(model, heads=[(0, 1)]):
        model.run_with_hooks(corpus.tokens[:1], fwd_hooks=[("blocks.0.attn.hook_attn_scores", spy)])
    scores = seen["scores"][0]
    upper = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)
    assert torch.isfinite(scores[1][upper]).all()  # swapped head sees every key
    assert torch.isinf(scores[0][upper]).all()  # the others keep the causal mask


# -- names of the estimators, Corpus input ---------------------------------------------------
def test_estimator_names_and_corpus_input(model, corpus, analysis):
    # the fixture's settings with the tokens instead of the Corpus: the same bits
    same = rl.analyze(model, corpus.tokens, n_boot=40, progress=False, cell_maps=True)
    np.testing.assert_array_equal(same.heads()["pattern_L_total_crossfit"],
                                  analysis.heads()["pattern_L_total_crossfit"])
    summary, heads, layers = analysis.summary(), analysis.heads(), analysis.layers()
    inf = analysis.inference()
    assert summary["L_total_debiased"] == pytest.approx(float(inf.total.estimate.mean()))
    assert summary["composition_debiased_ci"] == pytest.approx([float(inf.composition.low),
                                                                float(inf.composition.high)])
    # one name per quantity: no unsuffixed duplicate, and every suffixed name is registered
    assert not {"L_total", "L_resid", "L_mask", "composition", "L_total_ci", "composition_ci"} & set(summary)
    suffixed = [name for name in (*summary, *heads.columns, *layers.columns)
                if re.search(r"_(debiased|crossfit)(_ci)?$", name)]
    assert suffixed
    for name in suffixed:
        stem = re.sub(r"_(debiased|crossfit)(_ci)?$", "", name)
        stem = re.sub(r"^(pattern|log_pattern|scores)_", "", stem)
        assert stem in QUANTITIES, f"{name}: {stem!r} is not in the estimator registry"
    np.testing.assert_array_equal(heads["pattern_L_total_crossfit"], analysis.decomposition().total.ravel())
    np.testing.assert_array_equal(heads["L_total_debiased"], inf.total.estimate.ravel())
    kept = np.where(inf.degenerate, np.nan, analysis.decomposition().total)
    np.testing.assert_allclose(layers["L_total_crossfit"], np.nanmean(kept, 1), rtol=1e-12)
    with pytest.raises(TypeError, match="Corpus or a"):
        rl.analyze(model, [[0, 1, 2]], progress=False)


def test_save_writes_the_results(analysis, tmp_path):
    out = analysis.save(tmp_path / "out", report=False, statistics=False)
    assert (out / "results.json").exists() and (out / "heads.csv").exists()
    with pytest.raises(FileExistsError):
        analysis.save(tmp_path / "out")


# -- progress switches -------------------------------------------------------------------------
def test_progress_bars_can_be_switched(model, corpus, capsys):
    patching.mask_swap_by_layer(model, corpus.tokens, layers=[0], progress=False)
    quiet = rl.analyze(model, corpus, n_boot=20, progress=False)
    quiet.heads()
    assert "patching" not in capsys.readouterr().err
    patching.mask_swap_by_layer(model, corpus.tokens, layers=[0], progress=True)
    loud = rl.analyze(model, corpus, n_boot=20, progress=True)
    loud.heads()
    err = capsys.readouterr().err
    assert "patching" in err and "forward passes" in err and "bootstrap CIs" in err


# -- no process-wide side effects -------------------------------------------------------------
def test_analysis_leaves_the_allocator_alone_until_asked():
    root = str(Path(__file__).resolve().parents[1])
    script = (
        "import rope_leak as rl\n"
        "from rope_leak.engine import allocator\n"
        "from rope_leak.corpus import make_random_corpus\n"
        "m = rl.tiny_rope_model()\n"
        "rl.run_statistics(m, make_random_corpus(4, 8, 50, bos_token_id=0).tokens, progress=False)\n"
        "print(allocator._applied)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split()[-1] == "None"


def test_kernel_is_built_portably():
    from rope_leak.engine import kernel

    assert not any("native" in flag for flag in kernel.PORTABLE_FLAGS.split())
