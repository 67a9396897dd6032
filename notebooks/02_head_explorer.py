# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Head explorer
#
# Pick a layer and a head and see, for that one head:
#
# * its mean attention pattern under the causal mask and under the bidirectional ablation;
# * how well the offset `i - j` alone explains it (`M_rel`) against offset plus absolute
#   query and key position (`M_abs`): residual heat maps over the `(i, j)` cells;
# * its sink score (mean attention to key 0);
# * its fitted absolute-position profiles: `M_abs` is `a[i - j] + b[i] + c[j]`, and
#   `analysis.head(l, h)` returns `b[i]` (query) and `c[j]` (key) with the shares;
# * what replacing the token at position 0 does to it (its pattern, its sink score and its
#   output at later positions).
#
# Run live with `ipywidgets` installed, the last cell gives a layer/head picker;
# otherwise (and when executed by the tests) the figures are static, for the head chosen
# by `ROPE_LEAK_HEAD` (e.g. `L3H1`) or else the head with the largest share.
#
# `ROPE_LEAK_NOTEBOOK_SMALL=1` uses a tiny random model; by default SmolLM2-135M on
# `ROPE_LEAK_NOTEBOOK_PROMPTS` x `ROPE_LEAK_NOTEBOOK_TOKENS` Wikipedia chunks (default
# 16 x 64 here: single heads are readable on short prompts).

# %%
import os

import plotly.graph_objects as go
import plotly.io as pio
import torch

import rope_leak as rl
from rope_leak.analyses import explore
from rope_leak.backends import TINY_BOS_TOKEN_ID
from rope_leak.corpus import make_random_corpus
from rope_leak.output import plots

pio.renderers.default = "plotly_mimetype+notebook"
torch.set_grad_enabled(False)
settings = explore.notebook_settings(default_prompts=16, default_tokens=64)
print("settings:", settings.to_dict())
HELD_OUT = 4  # prompts kept out of the fits, for the loss effects at the end
if settings.real_model:
    model = rl.load_model(settings.model)
    corpus = rl.load_corpus(model, "wikipedia", n_prompts=settings.n_prompts + HELD_OUT,
                            n_tokens=settings.n_tokens)
else:
    model = rl.tiny_rope_model(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=64, d_vocab=50, seed=0)
    corpus = make_random_corpus(settings.n_prompts + HELD_OUT, settings.n_tokens, model.cfg.d_vocab, seed=0,
                                bos_token_id=TINY_BOS_TOKEN_ID)
tokens, held_out = corpus.tokens[:settings.n_prompts], corpus.tokens[settings.n_prompts:]
window = min(32, settings.n_tokens // 4)  # the completed split's window (queries w <= i <= n - 2 are scored)
analysis = rl.analyze(model, tokens, cell_maps=True, window=window, progress=False)  # cell maps: heat maps
analysis.top_heads(8).round(4)

# %% [markdown]
# ## Choose a head

# %%
# A label such as "L3H1" (checked against the model by analysis.head), or else the head
# with the largest debiased share.
choice = os.environ.get("ROPE_LEAK_HEAD") or analysis.top_heads(1)["label"].iloc[0]
chosen = analysis.head(choice.strip())
LAYER, HEAD = chosen.layer, chosen.head
print("HEAD:", chosen.label)
chosen  # a small table in a notebook

# %%
# Position 0 is replaced by another token's embedding: the second token of the first prompt.
OTHER_TOKEN = int(tokens[0, 1]) if int(tokens[0, 1]) != int(tokens[0, 0]) else int(tokens[0, 0]) + 1


def show_head(layer: int, head: int) -> dict:
    """All figures and numbers for one head."""
    one = analysis.head(layer, head)
    label, n, t = one.label, one.numbers, analysis.target
    print(f"{label}: L_total = {n['L_total_debiased']:.4f} [{n['L_total_ci_low']:.4f}, "
          f"{n['L_total_ci_high']:.4f}], L_resid = {n['L_resid_debiased']:.4f}, "
          f"L_mask = {n['L_mask_debiased']:.4f} (debiased ΔR² of {t}; cross-fitted L_total "
          f"{n[f'{t}_L_total_crossfit']:.4f}); R²(M_rel) = {n[f'{t}_causal_r2_rel']:.3f}, "
          f"R²(M_abs) = {n[f'{t}_causal_r2_abs']:.3f}; sink score = {n['sink_score']:.3f}"
          f"{' (sink head)' if n['sink_head'] else ''}")
    go.Figure(
        [go.Scatter(x=one.b.index, y=one.b.values, name="b[i] (query)"),
         go.Scatter(x=one.c.index, y=one.c.values, name="c[j] (key)")],
        layout={"title": f"{label}: absolute-position profiles of M_abs ({t}, causal)",
                "xaxis_title": "position", "yaxis_title": "coefficient"}).show()

    causal = explore.head_patterns(model, tokens, layer, "causal")[head].numpy()
    bidir = explore.head_patterns(model, tokens, layer, "bidirectional")[head].numpy()
    plots.pattern_figure({"causal mask": causal, "bidirectional ablation": bidir},
                         title=f"{label}: mean attention pattern over {len(tokens)} prompts").show()

    for condition in ("causal", "bidirectional"):
        maps = explore.head_cell_maps(analysis, layer, head, condition=condition)
        plots.head_fit_figure(maps, label).show()

    patch = explore.position_zero_patch(model, tokens, layer, head, replacement="token", token_id=OTHER_TOKEN)
    plots.pattern_figure({"as is": patch["pattern_before"],
                          f"position 0 ← token {OTHER_TOKEN}": patch["pattern_after"]},
                         title=f"{label}: replacing the token at position 0").show()
    print(f"{label}: position-0 patch: sink score {patch['sink_score_before']:.3f} -> "
          f"{patch['sink_score_after']:.3f}; head output at positions >= 1 changes by "
          f"{patch['output_change']:.1%} (mean relative L2)")
    return {"label": label, **{k: v for k, v in patch.items() if not k.startswith("pattern")}}


result = show_head(LAYER, HEAD)
print("HEAD RESULT:", result)

# %% [markdown]
# **Reading the residual maps.** The left two panels share one colour scale, the right two
# another (symmetric around 0). Structure left in "residual after M_rel" that disappears in
# "residual after M_abs" is what absolute position explains: typically a gradient down the
# query axis (the causal denominator) or a column near the start (position 0's
# fingerprint read through the residual stream).

# %% [markdown]
# ## Does the model use this head's absolute position?
#
# The completed split gives the head two counterfactuals: its pattern without the start
# cut (as if the sequence had a past; the missing mass goes to a virtual key holding the
# head's mean value) and its scores without their absolute key effect. Each is run on the
# held-out prompts; the effect is the change in mean next-token loss (nats), with t
# intervals over prompts (wide with so few).

# %%
effects = rl.loss_effects(model, analysis, tokens, held_out, heads=[(LAYER, HEAD)], layers=False,
                          progress=False)
print(f"EFFECTS of {chosen.label} (baseline loss {effects.baseline_loss:.3f} nats on {len(held_out)} prompts):")
effects.table[["label", "intervention", "queries", "effect_nats", "ci_low", "ci_high"]].round(5)

# %% [markdown]
# ## Interactive picker

# %%
try:
    import ipywidgets as widgets
except ImportError:
    widgets = None
    print("ipywidgets is not installed: static figures above. `pip install ipywidgets` for a picker.")
if widgets is not None and not settings.small:
    widgets.interact(show_head, layer=widgets.IntSlider(LAYER, 0, model.cfg.n_layers - 1),
                     head=widgets.IntSlider(HEAD, 0, model.cfg.n_heads - 1))
