"""The fast accumulation paths (fused C kernel on CPU, pure torch elsewhere) against a
straightforward float64 reference written cell by cell from the definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rope_leak.engine.accumulate import LayerAccumulator, NonFiniteAttentionError
from rope_leak.engine.diagonals import diagonal_sums, lower_diagonal_sums
from rope_leak.engine.kernel import load_kernel
from rope_leak.engine.pairs import PairDesign, PairSpec
from rope_leak.engine.statistics import TARGETS

MASKED = TARGETS


def _log_z(s: np.ndarray) -> np.ndarray:
    m = s.max(-1, keepdims=True)
    return (m + np.log(np.exp(s - m).sum(-1, keepdims=True)))[..., 0]


def reference_statistics(scores: np.ndarray, prompt_ids: np.ndarray, design: PairDesign,
                         n_buckets: int, full: np.ndarray | None = None) -> dict:
    """Per-cell loops in float64: y for every target, then X^T y, sum y^2, fold cell sums."""
    B, H, n, _ = scores.shape
    s = scores.astype(np.float64)
    log_z = _log_z(s)
    values = {
        "pattern": np.exp(s - log_z[..., None]),
        "log_pattern": s - log_z[..., None],
        "scores": s,
        "neg_log_z": np.broadcast_to(-log_z[..., None], s.shape),
    }
    qs, ks = design.cells
    cols = design.cell_columns
    out = {}
    for target, y in values.items():
        xty = np.zeros((n_buckets, H, design.n_columns))
        sumsq = np.zeros((n_buckets, H))
        cell_sum = np.zeros((2, H, design.n_cells))
        for b in range(B):
            g, f = prompt_ids[b] % n_buckets, prompt_ids[b] % 2
            for h in range(H):
                cells = y[b, h, qs, ks]
                for a in range(3):
                    np.add.at(xty[g, h], cols[:, a], cells)
                sumsq[g, h] += (cells**2).sum()
                cell_sum[f, h] += cells
        out[target] = (xty, sumsq, cell_sum)
    sink = np.zeros((n_buckets, H))
    for b in range(B):
        sink[prompt_ids[b] % n_buckets] += values["pattern"][b, :, 1:, 0].mean(-1)
    return out, sink


SPECS = [PairSpec(), PairSpec(include_sink=True), PairSpec(min_query=3, max_query=11)]


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
@pytest.mark.parametrize("causal", ["causal", "bidirectional"])
@pytest.mark.parametrize("cell_maps", [True, False], ids=["cells", "no-cells"])
def test_fast_paths_equal_reference(path, spec, causal, cell_maps):
    """Both paths against a float64 numpy reference (without cell sums the kernel sums both
    dense targets in one pass per row)."""
    if path == "kernel" and load_kernel() is None:
        pytest.skip("no C compiler: the kernel path is not available")
    gen = torch.Generator().manual_seed(1)
    B, H, n, n_buckets = 5, 3, 13, 4
    scores = 4 * torch.randn(2, B, H, n, n, generator=gen)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    if causal != "bidirectional":
        scores = scores.masked_fill(upper, float("-inf"))
    ids = torch.tensor([7, 2, 4, 9, 10])
    design = PairDesign(spec, n)
    acc = LayerAccumulator(design, 2, H, n_buckets, TARGETS, cell_maps=cell_maps)
    acc.use_kernel = path == "kernel"
    for layer in range(2):
        acc.add_layer(layer, scores[layer], ids)
    acc.add_prompts(ids)
    stats = acc.to_statistics()
    for layer in range(2):
        ref, sink = reference_statistics(scores[layer].numpy(), ids.numpy(), design, n_buckets)
        for target in TARGETS:
            xty, sumsq, cell_sum = ref[target]
            got = stats[target]
            np.testing.assert_allclose(got.xty[:, layer], xty, rtol=2e-6, atol=2e-5, err_msg=target)
            np.testing.assert_allclose(got.sumsq[:, layer], sumsq, rtol=2e-6, atol=2e-5, err_msg=target)
            if cell_maps:
                np.testing.assert_allclose(got.fold_cell_sums()[:, layer], cell_sum, rtol=2e-6, atol=2e-5,
                                           err_msg=target)
        np.testing.assert_allclose(acc.sink_sum[:, layer].numpy(), sink, rtol=2e-6, atol=1e-7)


def test_kernel_and_torch_paths_agree_on_smollm2_sized_rows():
    if load_kernel() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(2)
    n = 96
    scores = (3 * torch.randn(2, 4, n, n, generator=gen)).masked_fill(
        torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    ids = torch.tensor([0, 1])
    accs = []
    for use_kernel in (True, False):
        acc = LayerAccumulator(PairDesign(PairSpec(), n), 1, 4, 4, MASKED, cell_maps=True)
        acc.use_kernel = use_kernel
        acc.add_layer(0, scores, ids)
        acc.add_prompts(ids)
        accs.append(acc.to_statistics())
    for t in MASKED:
        np.testing.assert_allclose(accs[0][t].xty, accs[1][t].xty, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(accs[0][t].sumsq, accs[1][t].sumsq, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(accs[0][t].fold_cell_sums(), accs[1][t].fold_cell_sums(),
                                   rtol=1e-5, atol=1e-5)


def test_kernel_and_torch_paths_agree_when_masked_keys_are_not_a_suffix():
    """Rows whose -inf keys are scattered (a finite key after a masked one): the kernel
    finds each row's last finite key without assuming a causal mask."""
    if load_kernel() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(8)
    n = 40
    scores = 3 * torch.randn(3, 4, n, n, generator=gen)
    # holes among the keys after the query only (a scored key must be finite)
    holes = (torch.rand(3, 4, n, n, generator=gen) < 0.3) & torch.ones(n, n, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(holes, float("-inf"))
    scores[:, :2] = scores[:, :2].masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    ids = torch.tensor([0, 1, 2])
    accs = []
    for use_kernel in (True, False):
        acc = LayerAccumulator(PairDesign(PairSpec(), n), 1, 4, 4, MASKED)
        acc.use_kernel = use_kernel
        acc.add_layer(0, scores, ids)
        acc.add_prompts(ids)
        accs.append(acc.to_statistics())
    for t in MASKED:
        np.testing.assert_allclose(accs[0][t].xty, accs[1][t].xty, rtol=1e-5, atol=1e-4, err_msg=t)
        np.testing.assert_allclose(accs[0][t].sumsq, accs[1][t].sumsq, rtol=1e-5, atol=1e-4, err_msg=t)
        assert np.isfinite(accs[0][t].sumsq).all()


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_raise_on_both_paths(path, bad):
    if path == "kernel" and load_kernel() is None:
        pytest.skip("no C compiler")
    scores = torch.randn(2, 3, 8, 8)
    scores[1, 2, 5, 3] = bad
    acc = LayerAccumulator(PairDesign(PairSpec(), 8), 4, 3, 4, MASKED)
    acc.use_kernel = path == "kernel"
    # the kernel stops at the row; the torch path keeps a device-side flag (no host read
    # per layer) that check_finite reads after the batch
    where = "layer 2, head 2 \\(query 5, prompt 11\\)" if path == "kernel" else "layer 2, head 2\\."
    with pytest.raises(NonFiniteAttentionError, match=where):
        acc.add_layer(2, scores, torch.tensor([10, 11]))
        acc.check_finite()


@pytest.mark.parametrize("key", [0, 3, 9, 16])
def test_a_nan_anywhere_in_a_causal_row_is_caught_by_the_kernel(key):
    """The kernel has no NaN pass of its own: a NaN must reach log Z from any key."""
    if load_kernel() is None:
        pytest.skip("no C compiler")
    n = 17
    scores = torch.randn(1, 2, n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    scores[0, 1, 16, key] = float("nan")
    acc = LayerAccumulator(PairDesign(PairSpec(), n), 1, 2, 4, MASKED)
    with pytest.raises(NonFiniteAttentionError, match="head 1 \\(query 16"):
        acc.add_layer(0, scores, torch.tensor([0]))


def test_lower_diagonal_sums_match_diagonal_sums():
    y = torch.randn(3, 2, 9, 9).tril()
    np.testing.assert_allclose(lower_diagonal_sums(y).numpy(), diagonal_sums(y).numpy(), atol=1e-5)


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_log_pattern_sum_of_squares_keeps_precision_with_large_scores(path):
    """log_pattern's sum of squares is derived (sum s^2 + 2 sum z rowsum(s) + sum n z^2),
    which cancels large terms: with scores around 200 it must still match the reference."""
    if path == "kernel" and load_kernel() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(6)
    n = 24
    scores = (200 + 3 * torch.randn(3, 2, n, n, generator=gen)).masked_fill(
        torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    ids = torch.tensor([0, 1, 2])
    design = PairDesign(PairSpec(), n)
    acc = LayerAccumulator(design, 1, 2, 4, MASKED, cell_maps=True)
    acc.use_kernel = path == "kernel"
    acc.add_layer(0, scores, ids)
    acc.add_prompts(ids)
    ref, _ = reference_statistics(scores.numpy(), ids.numpy(), design, 4, scores.numpy())
    got = acc.to_statistics()["log_pattern"].sumsq[:, 0]
    np.testing.assert_allclose(got, ref["log_pattern"][1], rtol=2e-6)




def test_kernel_statistics_do_not_depend_on_the_thread_count():
    """Each work unit (a head-prompt pair, or a head with cell sums) is summed by one
    thread in a fixed order, so one thread and several give the same bits."""
    if load_kernel() is None:
        pytest.skip("no C compiler")
    from rope_leak.engine.pairs import start_cut_spec

    n = 48
    scores = (3 * torch.randn(4, 5, n, n, generator=torch.Generator().manual_seed(9))).masked_fill(
        torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    design = PairDesign(PairSpec(), n)
    states = []
    for count, cell_maps in ((1, False), (3, False), (1, True), (3, True)):
        acc = LayerAccumulator(design, 1, 5, 4, MASKED, cell_maps=cell_maps,
                               start_cut=(8, PairDesign(start_cut_spec(design.spec, 8, n), n)))
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            acc.add_layer(0, scores, torch.arange(4))
        finally:
            torch.set_num_threads(previous)
        states.append({**acc.state(), **{f"start_cut/{k}": v for k, v in zip("abcd", acc.last_start_cut_rows)}})
    for one, several in ((0, 1), (2, 3)):
        for name, value in states[one].items():
            assert torch.equal(value, states[several][name]), name


def test_kernel_built_without_openmp_gives_the_same_statistics(tmp_path, monkeypatch):
    """A compiler that rejects -fopenmp gets a one-thread build, whose statistics are the
    OpenMP build's bit for bit (each work unit is summed in the same order)."""
    if load_kernel() is None:
        pytest.skip("no C compiler")
    import rope_leak.engine.accumulate as accumulate
    import rope_leak.engine.kernel as kernel
    from rope_leak.engine.pairs import start_cut_spec

    monkeypatch.setenv("ROPE_LEAK_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel, "OPENMP_FLAGS", ("-fno-such-option-anywhere",))
    single = kernel.load_kernel.__wrapped__()
    assert single is not None and list((tmp_path / "kernels").glob("*.so"))
    n = 40
    scores = (3 * torch.randn(3, 4, n, n, generator=torch.Generator().manual_seed(4))).masked_fill(
        torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    design = PairDesign(PairSpec(), n)
    states = []
    for fn in (load_kernel(), single):
        monkeypatch.setattr(accumulate, "load_kernel", lambda fn=fn: fn)
        acc = LayerAccumulator(design, 1, 4, 4, MASKED, start_cut=(8, PairDesign(start_cut_spec(design.spec, 8, n), n)))
        acc.add_layer(0, scores, torch.arange(3))
        states.append({**acc.state(), **{f"start_cut/{k}": v for k, v in zip("abcd", acc.last_start_cut_rows)}})
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
