"""All heads' gauged M_abs profiles in one solve equal each head's own fit."""

import numpy as np

from rope_leak import analyze
from rope_leak.fits.profiles import abs_profiles, gauged_coefficients, per_prompt_xty


def test_one_solve_for_all_heads_equals_each_heads_fit(tiny_model, tiny_tokens):
    stats = analyze(tiny_model, tiny_tokens, progress=False).statistics.conditions["causal"].targets["pattern"]
    a, b, c = gauged_coefficients(stats.design, per_prompt_xty(stats))
    for layer in range(stats.n_layers):
        for head in range(stats.n_heads):
            one = abs_profiles(stats, layer, head)
            np.testing.assert_allclose(a[layer, head], one.offset.to_numpy(), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(b[layer, head], one.query.to_numpy(), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(c[layer, head], one.key.to_numpy(), rtol=1e-10, atol=1e-12)
            # the gauge: b and c centred, equal slopes; and the fitted cells are reproduced
            assert abs(b[layer, head].mean()) < 1e-12 and abs(c[layer, head].mean()) < 1e-12
            slope = lambda v, x: np.polyfit(x, v, 1)[0]  # noqa: E731
            assert np.isclose(slope(b[layer, head], stats.design.queries),
                              slope(c[layer, head], stats.design.keys), atol=1e-10)
