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
# # Reproduction: decomposition and BOS interventions
#
# The full measurement (`docs/method.md`) on one model, printed as tables the way a paper
# would, and the shareable HTML report:
#
# * **Table 1** — model-level absolute-position share (debiased, with 95% CIs) and its split
#   into causal mask and residual stream, for each target (`pattern`, `log_pattern`, `scores`);
# * **Table 2** — the same by layer (target `pattern`);
# * **Table 3** — the heads with the largest share, with their sink scores;
# * **Table 4** — BOS interventions: replace the embedding at position 0 and report what
#   changes at early queries (the scores' absolute-position sum of squares and `L_total`,
#   relative to baseline where that ratio is estimable).
#
# Defaults: SmolLM2-135M, 64 Wikipedia chunks of 256 tokens (reported setup), BOS
# interventions on queries `i < 32`. `ROPE_LEAK_NOTEBOOK_SMALL=1` runs a tiny random model
# on 8 x 32 tokens (tests); `ROPE_LEAK_NOTEBOOK_PROMPTS`/`_TOKENS` override the sizes and
# `ROPE_LEAK_NOTEBOOK_OUT` names the output folder (default: a temporary folder).
#
# One call, `rl.run`, does what `rope-leak analyze` does: it loads the model and the
# corpus, runs the main analysis and the sink analysis (with the BOS interventions) and
# writes every result file and the report into the output folder.

# %%
import os
import tempfile
from pathlib import Path

import pandas as pd
import plotly.io as pio
import torch

import rope_leak as rl
from rope_leak.analyses import explore
from rope_leak.backends import TINY_BOS_TOKEN_ID
from rope_leak.corpus import make_random_corpus
from rope_leak.output import plots, plots_sinks

pio.renderers.default = "plotly_mimetype+notebook"
torch.set_grad_enabled(False)
pd.set_option("display.precision", 4)
settings = explore.notebook_settings(default_prompts=64, default_tokens=256)
out_dir = Path(os.environ.get("ROPE_LEAK_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="rope_leak_repro_"))
print("settings:", settings.to_dict(), "| output:", out_dir)

# %%
if settings.real_model:  # a model name and a corpus source: rl.run loads both
    model, corpus = settings.model, "wikipedia"
else:  # a model and a Corpus built here are used as they are
    model = rl.tiny_rope_model(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=64, d_vocab=50, seed=0)
    corpus = make_random_corpus(settings.n_prompts, settings.n_tokens, model.cfg.d_vocab, seed=0,
                                bos_token_id=TINY_BOS_TOKEN_ID)
# progress=True (the default) shows a bar for every long step
result = rl.run(model, corpus, out_dir, prompts=settings.n_prompts, tokens=settings.n_tokens,
                overwrite=True, progress=False)
model, analysis, summary = result.model, result.analysis, result.summary()
tokens = result.corpus.tokens
print(f"{settings.model}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads; "
      f"{analysis.n_prompts} prompts x {tokens.shape[1]} tokens; {result.run_info['seconds']:.0f} s")
result


def print_table(title: str, table: pd.DataFrame, note: str = "") -> None:
    print(title)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if note:
        print(note)
    print()


# %% [markdown]
# ## Table 1: composition by target

# %%
def with_ci(value: float, ci) -> str:
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


rows = []
for t in analysis.targets:
    inf = analysis.inference(t).summary()  # debiased shares, bootstrap CIs over prompt buckets
    rows.append({"target": t, **{name: with_ci(inf[f"{name}_mean"], inf[f"{name}_mean_ci"])
                                 for name in ("L_total", "L_resid", "L_mask")},
                 # a ratio over a pooled L_total whose interval reaches 0 is not a number to read
                 "composition": with_ci(inf["composition"], inf["composition_ci"]) if inf["composition_estimable"]
                 else f"{rl.NOT_ESTIMABLE} (point {inf['composition_point']:.2f})",
                 "degenerate heads": inf["degenerate_heads"],
                 "composition (cross-fitted)": analysis.decomposition(t).composition() if inf["composition_estimable"]
                 else rl.NOT_ESTIMABLE})
table1 = pd.DataFrame(rows)
print_table(f"Table 1. Mean absolute-position share per head (debiased ΔR², 95% CIs) under the causal "
            f"mask (L_total) and the bidirectional ablation (L_resid); L_mask = L_total − L_resid. "
            f"{settings.model}, {analysis.n_prompts} prompts x {tokens.shape[1]} tokens.", table1,
            f"Aggregation: {summary['composition_aggregation']}. The cross-fitted composition (the "
            "definition) is biased at few prompts. Heads with L_mask < 0 beyond their CI: "
            f"{summary['heads_additivity_violated']} (additivity violated; flagged, not clipped).")

# %% [markdown]
# ## Table 2: by layer

# %%
table2 = analysis.layers()
print_table(f"Table 2. Decomposition by layer (target {analysis.target}; means over heads).", table2)
plots.layer_composition(analysis).show()

# %% [markdown]
# ## Table 3: top heads, with bootstrap intervals

# %%
table3 = analysis.top_heads(10)
print_table("Table 3. Heads with the largest L_total (debiased share), with 95% bootstrap "
            "intervals over prompt buckets and Benjamini-Hochberg q-values of a sign-flip null. "
            "Sink score = mean attention to key 0.", table3,
            f"Sink heads (score > {analysis.sink_threshold}): {', '.join(summary['sink_heads']) or 'none'}.")
plots.share_heatmaps(analysis).show()

# %% [markdown]
# ## Table 4: BOS interventions
#
# The sink analysis of `rl.run` re-ran the causal model on the first tokens of its first
# prompts with the embedding at position 0 replaced before the forward pass (another
# token's embedding, the mean token embedding, zeros, norm-matched noise), and measured
# what is there at early queries: the scores' absolute-position sum of squares and
# `L_total`, with their ratios to the baseline ("not estimable" where the baseline's CI
# includes 0).

# %%
table4 = result.sinks.bos_table()
early = result.sinks.settings["early_queries"]
print_table(f"Table 4. BOS interventions at early queries (i < {early}), "
            f"{result.sinks.settings['bos_prompts']} prompts.", table4,
            "NaN ratio: not estimable (the baseline's CI includes 0).")
plots_sinks.bos_interventions_figure(table4).show()

# %% [markdown]
# ## Results files and the HTML report
#
# `rl.run` wrote them (`result.files`); the same call from the command line is
# `rope-leak analyze --out DIR`.

# %%
print("REPORT:", out_dir / "report.html", result.files)
