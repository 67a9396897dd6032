"""Gemma 3 (local sliding-window + global layers): conversion, mask exactness against HF
for every layer kind, depth metrics, and the ``compare`` command on tiny HF folders.

HF reference for masks (transformers 5.24, ``Gemma3TextModel.forward``): a 4D tensor
``attention_mask`` is returned *as is* by both ``create_causal_mask`` and
``create_sliding_window_causal_mask``, i.e. one custom 4D mask would be applied to local
and global layers alike (the window is not re-imposed). A dict
``{"full_attention": m, "sliding_attention": m'}`` is used per layer kind instead, so
the reference gives each kind its own explicit mask. A second, independent reference
is HF's own ``config.use_bidirectional_attention`` (full for global layers,
``|i - j| < sliding_window`` for local ones).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from rope_leak.fits.depth import depth_slope, slopes_over_depth
from rope_leak.interventions.mask import bidirectional
from rope_leak.quantities import QUANTITIES, column

N = 12
WINDOW = 4
TOL = 2e-5  # measured: ~6e-7 on the tiny model


@pytest.fixture(scope="module")
def gemma_tokens():
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(2, 50, (2, N), generator=gen)
    t[:, 0] = 0
    return t


def _additive(allowed: torch.Tensor, batch: int) -> torch.Tensor:
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    return mask[None, None].expand(batch, 1, *allowed.shape)


def _allowed(kind: str, mode: str) -> torch.Tensor:
    i = torch.arange(N)
    diff = i[:, None] - i[None, :]  # query - key
    if mode == "causal":
        allowed = diff >= 0
        return allowed & (diff < WINDOW) if kind == "local" else allowed
    if mode == "bidirectional" and kind == "local":
        return diff.abs() < WINDOW
    return torch.ones(N, N, dtype=torch.bool)  # global bidirectional, or window="none"


def _hf_logits(hf, tokens, full: torch.Tensor, sliding: torch.Tensor) -> torch.Tensor:
    masks = {"full_attention": _additive(full, len(tokens)),
             "sliding_attention": _additive(sliding, len(tokens))}
    with torch.no_grad():
        return hf(tokens, attention_mask=masks).logits


def test_tiny_gemma_has_both_layer_kinds(tiny_gemma_hooked):
    m = tiny_gemma_hooked
    assert [b.attn.attn_type for b in m.blocks] == ["local", "global", "local", "global"]
    assert m.cfg.window_size == WINDOW
    assert {m.blocks[0].attn._rotary_base(), m.blocks[1].attn._rotary_base()} == {1e3, 1e5}


def test_causal_logits_match_hf(tiny_gemma_hf, tiny_gemma_hooked, gemma_tokens):
    with torch.no_grad():
        ref = tiny_gemma_hf(gemma_tokens).logits
        got = tiny_gemma_hooked(gemma_tokens)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    # the explicit per-kind causal reference is the same thing
    explicit = _hf_logits(tiny_gemma_hf, gemma_tokens, _allowed("global", "causal"),
                          _allowed("local", "causal"))
    torch.testing.assert_close(explicit, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("window", ["symmetric", "none"])
def test_bidirectional_matches_hf_custom_mask(tiny_gemma_hf, tiny_gemma_hooked, gemma_tokens, window):
    mode = "bidirectional" if window == "symmetric" else "none"
    ref = _hf_logits(tiny_gemma_hf, gemma_tokens, _allowed("global", mode), _allowed("local", mode))
    with torch.no_grad(), bidirectional(tiny_gemma_hooked, window=window):
        got = tiny_gemma_hooked(gemma_tokens)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    with torch.no_grad():
        causal = tiny_gemma_hooked(gemma_tokens)
    assert (got - causal).abs().max() > 1e-2  # the swap changes something


def test_symmetric_window_matches_hf_use_bidirectional_attention(tiny_gemma_hf, tiny_gemma_hooked,
                                                                  gemma_tokens):
    hf = tiny_gemma_hf
    try:
        hf.config.use_bidirectional_attention = True
        with torch.no_grad():
            ref = hf(gemma_tokens).logits
    finally:
        hf.config.use_bidirectional_attention = False
    with torch.no_grad(), bidirectional(tiny_gemma_hooked):
        got = tiny_gemma_hooked(gemma_tokens)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("layers", [[0, 2], [1, 3]])
def test_single_layer_kind_swaps_match_hf(tiny_gemma_hf, tiny_gemma_hooked, gemma_tokens, layers):
    """Swap only local or only global layers: the HF reference then gives the swapped
    kind its bidirectional mask and keeps the other kind causal."""
    kinds = {tiny_gemma_hooked.blocks[l].attn.attn_type for l in layers}
    all_of_kind = [l for l, b in enumerate(tiny_gemma_hooked.blocks) if b.attn.attn_type in kinds]
    if sorted(layers) != all_of_kind:
        pytest.skip("the per-kind HF reference swaps every layer of a kind")
    full = _allowed("global", "bidirectional" if "global" in kinds else "causal")
    sliding = _allowed("local", "bidirectional" if "local" in kinds else "causal")
    ref = _hf_logits(tiny_gemma_hf, gemma_tokens, full, sliding)
    with torch.no_grad(), bidirectional(tiny_gemma_hooked, layers=layers):
        got = tiny_gemma_hooked(gemma_tokens)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)


def test_patterns_respect_window(tiny_gemma_hooked, gemma_tokens):
    """Per layer: the pattern's support is exactly the expected mask of that layer kind."""
    patterns = {}
    hooks = [(f"blocks.{l}.attn.hook_pattern",
              lambda x, hook: patterns.__setitem__(hook.layer(), x.detach()))
             for l in range(4)]
    with torch.no_grad(), bidirectional(tiny_gemma_hooked), tiny_gemma_hooked.hooks(fwd_hooks=hooks):
        tiny_gemma_hooked(gemma_tokens, return_type=None)
    for layer, pattern in patterns.items():
        kind = tiny_gemma_hooked.blocks[layer].attn.attn_type
        support = (pattern > 0).all(0).all(0)
        assert torch.equal(support, _allowed(kind, "bidirectional")), (layer, kind)


# ------------------------------------------------------------------ depth metrics


def test_depth_slope_closed_form():
    y = 0.1 + 0.3 * np.linspace(0, 1, 10)
    fit = depth_slope(y)
    assert fit.slope == pytest.approx(0.3) and fit.intercept == pytest.approx(0.1)
    assert fit.ci_low == pytest.approx(0.3, abs=1e-6) and fit.ci_high == pytest.approx(0.3, abs=1e-6)
    noisy = y + np.random.default_rng(0).normal(0, 0.05, 10)
    f2 = depth_slope(noisy)
    assert f2.ci_low < f2.slope < f2.ci_high


def test_vectorised_slopes_match_linregress():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(5, 7))
    np.testing.assert_allclose(slopes_over_depth(y), [depth_slope(r).slope for r in y], atol=1e-12)


def test_summarize_model_on_tiny(tiny_model, tiny_tokens):
    from rope_leak.analyses.architectures import summarize_model
    from rope_leak.engine.run import run_statistics
    from rope_leak.fits.projection import BucketProjection
    from rope_leak.fits.shares import fit_shares
    from rope_leak.inference.intervals import decomposition_inference

    stats = run_statistics(tiny_model, tiny_tokens, targets=("pattern",), n_buckets=4, progress=False)
    result = summarize_model(stats, "tiny", n_boot=50)
    row = result.row
    for stem in ("L_total", "L_mask", "L_resid", "composition", "depth_slope_L_resid", "depth_slope_L_mask",
                 "depth_slope_L_total"):
        value = row[column(stem)]
        assert np.isfinite(value) and row[f"{stem}_ci_low"] <= row[f"{stem}_ci_high"], stem
        assert np.isfinite(row[column(stem, "crossfit")]), stem
    assert row["L_mask_debiased"] == pytest.approx(row["L_total_debiased"] - row["L_resid_debiased"])
    # the cross-fitted columns, aggregated as the debiased ones: means over the
    # non-degenerate heads, the composition pooling their sums of squares
    causal, bidirectional = stats.conditions["causal"], stats.conditions["bidirectional"]
    c, b = causal.targets["pattern"], bidirectional.targets["pattern"]
    keep = ~decomposition_inference(causal, bidirectional, n_boot=1).degenerate
    total, resid = fit_shares(c).share[keep], fit_shares(b).share[keep]
    w_c, w_b = (BucketProjection.from_statistics(t).per_prompt_sst()[0][keep] for t in (c, b))
    assert row["L_total_crossfit"] == pytest.approx(total.mean())
    assert row["L_mask_crossfit"] == pytest.approx((total - resid).mean())
    expected = 1 - (resid @ w_b / w_b.sum()) / (total @ w_c / w_c.sum())
    assert row["composition_crossfit"] == pytest.approx(expected, rel=1e-12)
    assert list(result.layers["layer"]) == [0, 1]
    assert {"L_resid_ci_low", "L_mask_ci_high", "L_resid_crossfit", "L_resid_debiased"} <= set(result.layers.columns)


def test_sliding_vs_global_summary_on_tiny_gemma(tiny_gemma_hooked):
    """Per-layer kinds and the sliding-vs-global summary on a model with both kinds
    (layers 0, 2 local with window 4; 1, 3 global) and prompts longer than the window.
    Checked against the per-layer table (the point estimates) and against a direct
    reconstruction of the pivotal interval from per-layer bootstrap replicates."""
    from rope_leak.analyses.architectures import model_layer_kinds, summarize_model
    from rope_leak.engine.run import run_statistics
    from rope_leak.fits.projection import BucketProjection
    from rope_leak.inference import bootstrap_statistic

    model = tiny_gemma_hooked
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(2, 50, (12, 3 * WINDOW), generator=gen)
    tokens[:, 0] = 0
    stats = run_statistics(model, tokens, targets=("pattern",), n_buckets=6, progress=False)
    kinds = model_layer_kinds(model)
    assert kinds == ["local", "global", "local", "global"]
    n_boot, seed = 60, 5
    result = summarize_model(stats, "tiny-g3", n_boot=n_boot, seed=seed, kinds=kinds)
    row, layers = result.row, result.layers
    assert list(layers["kind"]) == kinds
    assert (row["n_local_layers"], row["n_global_layers"]) == (2, 2)
    for comp in ("L_total", "L_mask", "L_resid"):
        assert (layers[f"{comp}_ci_low"] <= layers[f"{comp}_ci_high"]).all()
        local = layers.loc[layers["kind"] == "local", column(comp)].mean()
        glob = layers.loc[layers["kind"] == "global", column(comp)].mean()
        assert row[f"{comp}_local_debiased"] == pytest.approx(local, abs=1e-12)
        assert row[f"{comp}_global_debiased"] == pytest.approx(glob, abs=1e-12)
        assert row[f"{comp}_local_minus_global_debiased"] == pytest.approx(local - glob, abs=1e-12)
    # with no degenerate head, the overall mean is the layer-weighted mix of the two kinds
    assert not row["heads_degenerate"]
    assert row["L_resid_debiased"] == pytest.approx((row["L_resid_local_debiased"] + row["L_resid_global_debiased"]) / 2)

    # the difference's interval from per-layer replicates of the same resample
    c = stats.conditions["causal"].targets["pattern"]
    b = stats.conditions["bidirectional"].targets["pattern"]
    boot = bootstrap_statistic({"causal": c, "bidirectional": b},
                               lambda sh: sh["bidirectional"].mean(2), n_boot=n_boot, seed=seed,
                               share="debiased", method="percentile", keep_samples=True)
    is_local = np.array([k == "local" for k in kinds])
    diff = boot.samples[:, is_local].mean(1) - boot.samples[:, ~is_local].mean(1)
    q_lo, q_hi = np.quantile(diff, [0.025, 0.975])
    plug_in = BucketProjection.from_statistics(b).in_sample_share().mean(-1)[0]
    truth = plug_in[is_local].mean() - plug_in[~is_local].mean()
    estimate = row["L_resid_local_minus_global_debiased"]
    assert row["L_resid_local_minus_global_ci_low"] == pytest.approx(estimate + truth - q_hi, abs=1e-10)
    assert row["L_resid_local_minus_global_ci_high"] == pytest.approx(estimate + truth - q_lo, abs=1e-10)


def test_kind_summary_absent_with_one_kind(tiny_model, tiny_tokens):
    from rope_leak.analyses.architectures import model_layer_kinds, summarize_model
    from rope_leak.engine.run import run_statistics

    stats = run_statistics(tiny_model, tiny_tokens, targets=("pattern",), n_buckets=4, progress=False)
    result = summarize_model(stats, "tiny", n_boot=0, kinds=model_layer_kinds(tiny_model))
    assert list(result.layers["kind"]) == ["global", "global"]
    assert not any(name.startswith("L_resid_local") for name in result.row)
    assert result.row["n_local_layers"] == 0


# ------------------------------------------------------------------ compare CLI


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rope_leak.backends.gemma3 import tiny_gemma3_hf

    root = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1)
    LlamaForCausalLM(config).eval().save_pretrained(root / "tiny_llama")
    tiny_gemma3_hf(n_layers=4, sliding_window=4, d_vocab=300, seed=1).save_pretrained(root / "tiny_g3")
    return root / "tiny_llama", root / "tiny_g3"


@pytest.fixture(scope="module")
def compare_corpus(tmp_path_factory, synthetic_text):
    folder = tmp_path_factory.mktemp("compare_texts")
    for k in range(6):
        (folder / f"doc{k}.txt").write_text(synthetic_text(600, seed=k))
    return folder


def test_parse_model_spec():
    from rope_leak.analyses.architectures import parse_model_spec

    s = parse_model_spec("smollm2-135m+ntk4")
    assert (s.name, s.variant, s.value) == ("smollm2-135m", "ntk", 4.0)
    assert parse_model_spec("gemma3-270m").variant is None
    assert parse_model_spec("x+base5e5").value == 5e5
    assert parse_model_spec("/a/b+c").name == "/a/b+c"  # no recognised variant: a plain name
    with pytest.raises(ValueError):
        parse_model_spec("x+base1")


def test_compare_cli_on_tiny_hf_folders(tiny_folders, compare_corpus, tmp_path):
    from rope_leak.cli import main

    llama, gemma = tiny_folders
    out = tmp_path / "cmp"
    args = ["compare", str(llama), str(gemma), f"{llama}+ntk4", "--corpus", str(compare_corpus),
            "--prompts", "8", "--tokens", "16", "--n-boot", "20", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    table = pd.read_csv(out / "comparison.csv")
    assert len(table) == 3 and table["model"].iloc[2].endswith("+ntk4")
    for col in ("L_total_debiased", "L_mask_debiased", "L_resid_debiased", "composition_debiased",
                "sink_heads", "depth_slope_L_resid_debiased", "L_total_ci_low", "L_total_ci_high",
                "composition_ci_low", "depth_slope_L_resid_ci_low", "depth_slope_L_resid_t_low",
                "sink_heads_ci_low", "L_total_crossfit", "composition_crossfit"):
        assert col in table, col
    np.testing.assert_allclose(table["L_mask_debiased"], table["L_total_debiased"] - table["L_resid_debiased"],
                               atol=1e-12)
    assert (table["L_total_ci_low"] <= table["L_total_ci_high"]).all()
    # NTK-by-parts at factor 4 changes the tiny Llama's shares
    assert table["L_total_debiased"].iloc[0] != table["L_total_debiased"].iloc[2]
    layers = pd.read_csv(out / "comparison_layers.csv")
    assert len(layers) == 3 + 4 + 3
    assert list(layers["kind"]) == ["global"] * 3 + ["local", "global"] * 2 + ["global"] * 3
    assert {"L_total_ci_low", "L_total_ci_high"} <= set(layers.columns)
    # the sliding-vs-global summary exists for the tiny Gemma only, and is the per-layer means'
    g3 = layers[layers["model"] == str(gemma)]
    diff = (g3.loc[g3["kind"] == "local", "L_resid_debiased"].mean()
            - g3.loc[g3["kind"] == "global", "L_resid_debiased"].mean())
    assert table["L_resid_local_minus_global_debiased"].iloc[1] == pytest.approx(diff, abs=1e-12)
    assert table["L_resid_local_minus_global_debiased"].iloc[[0, 2]].isna().all()
    assert (table["n_local_layers"].tolist(), table["n_global_layers"].tolist()) == ([0, 2, 0], [3, 2, 3])
    # every estimate names its estimator, as the registry spells it; no bare duplicate is left
    suffixed = {name for name, quantity in QUANTITIES.items() if quantity.suffixed}
    for frame in (table, layers):
        assert not suffixed & set(frame.columns)
        for name in frame.columns:
            match = re.fullmatch(r"(.+?)(_local_minus_global|_local|_global)?_(debiased|crossfit)", name)
            if match:
                assert column(match[1], match[3], (match[2] or "_")[1:] or None) == name, name
    payload = json.loads((out / "comparison.json").read_text())
    assert payload["settings"]["models"][2].endswith("+ntk4") and len(payload["models"]) == 3
    assert "plotly" in (out / "comparison.html").read_text()[:5_000_000]
    assert main(args) == 2  # refuses to overwrite
    assert main(args + ["--overwrite"]) == 0


# ------------------------------------------------------------------ real Gemma 3


@pytest.mark.real_model
@pytest.mark.slow
def test_real_gemma3_causal_and_bidirectional_match_hf():
    """Gemma-3-270M (15 local layers, window 512; 3 global): causal logits within 2e-3 of
    HF (float32), and the bidirectional swap against HF's per-kind custom masks. The
    window only binds beyond 512 tokens, so here it is checked on the tiny model above."""
    from rope_leak.backends import load_hf_model, load_model

    model = load_model("gemma3-270m")
    hf, tokenizer = load_hf_model("gemma3-270m")
    hf.config._attn_implementation = "eager"
    ids = tokenizer("The quick brown fox jumps over the lazy dog because it is bored.",
                    return_tensors="pt").input_ids[:, :16]
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids)
        assert (got - ref).abs().max().item() < 2e-3
        n = ids.shape[1]
        full = torch.zeros(1, 1, n, n)
        ref_bi = hf(ids, attention_mask={"full_attention": full, "sliding_attention": full}).logits
        with bidirectional(model):
            got_bi = model(ids)
        assert (got_bi - ref_bi).abs().max().item() < 2e-3


def test_compare_and_analyze_report_the_same_composition(tiny_model):
    """One definition per aggregate: compare's row is analyze's summary, for the ablation's
    composition, the component means and the completed split."""
    from rope_leak.analyses.analysis import analyze
    from rope_leak.analyses.architectures import summarize_model

    tokens = torch.randint(1, 50, (12, 40), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = 0
    analysis = analyze(tiny_model, tokens, progress=False, n_boot=50, window=8)
    row = summarize_model(analysis.statistics, "tiny", n_boot=50).row
    summary = analysis.summary()
    for name in ("composition", "L_total", "L_resid", "L_mask"):
        assert row[column(name)] == pytest.approx(summary[column(name)], rel=1e-12), name
        assert row[f"{name}_ci_low"] == pytest.approx(summary[f"{column(name)}_ci"][0], rel=1e-12), name
    # the cross-fitted composition: one formula in both
    assert row["composition_crossfit"] == pytest.approx(analysis.decomposition().composition(), rel=1e-12)
    assert row["completed_mask_share"] == pytest.approx(summary["completed_split"]["mask_share"], rel=1e-12)
    assert row["completed_cross"] == pytest.approx(summary["completed_split"]["cross"], rel=1e-12)
