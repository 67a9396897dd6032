"""The pre-flight memory check of run_statistics: a run that cannot fit is refused before
its first forward pass, with the estimate, what is available and what fits; force=True
runs anyway; an allocation that fails during the passes gets the same clear message, with
no allocator text (also for a real failure under RLIMIT_AS, in a subprocess). The estimate
itself is checked against measured peaks in bench/memory_estimate.py, not here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from rope_leak.engine import memory
from rope_leak.engine.accumulate import LayerAccumulator
from rope_leak.engine.memory import (
    InsufficientMemoryError,
    MemoryWarning,
    available_memory,
    estimate_memory,
    is_allocation_failure,
    model_bytes,
    requested_bytes,
)
from rope_leak.engine.run import run_statistics

ROOT = Path(__file__).resolve().parents[2]
CPU_MESSAGE = ("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
               "you tried to allocate 9663676416 bytes. Error code 12 (Cannot allocate memory)")


def settings(tokens, n=None):
    """The estimate's settings run_statistics uses for these tokens (its defaults; prompts
    shorter than the start cut's window + 2 skip it)."""
    n = tokens.shape[1] if n is None else n
    return dict(n_prompts=len(tokens), conditions=["causal", "bidirectional"],
                start_cut_window=32 if n >= 34 else None)


def test_estimate_counts_the_parts(tiny_model):
    est = estimate_memory(tiny_model, 48, 2, n_prompts=6)
    assert est.model == model_bytes(tiny_model) == sum(
        t.numel() * t.element_size() for t in (*tiny_model.parameters(), *tiny_model.buffers()))
    assert est.run == est.statistics + est.attention + est.activations
    assert est.total == est.model + est.run
    H = tiny_model.cfg.n_heads
    # At least the forward pass' own peak: masked scores, softmax, zeros_like, isnan, pattern.
    assert est.attention >= 17 * 2 * H * 48 * 48
    # Grows with n and with the batch; the statistics grow with the prompts (start cut rows).
    assert estimate_memory(tiny_model, 64, 2, n_prompts=6).run > est.run
    assert estimate_memory(tiny_model, 48, 4, n_prompts=6).run > est.run
    more = estimate_memory(tiny_model, 48, 2, n_prompts=600)
    assert more.statistics > est.statistics and more.attention == est.attention
    # The pure-torch path (CUDA, float64, no compiler) makes more temporaries than the kernel.
    assert (estimate_memory(tiny_model, 48, 2, n_prompts=6, kernel=False, start_cut_window=None).attention
            > estimate_memory(tiny_model, 48, 2, n_prompts=6, kernel=True, start_cut_window=None).attention)
    # A checkpoint's serialised copies are counted when there is one.
    assert (estimate_memory(tiny_model, 48, 2, n_prompts=6, checkpoint=True).transient
            > estimate_memory(tiny_model, 48, 2, n_prompts=6).transient)


def test_available_memory_on_cpu():
    avail = available_memory("cpu")
    assert avail.bytes is not None and avail.bytes > 0 and avail.source


def test_run_that_cannot_fit_is_refused_before_the_first_forward_pass(tiny_model, tiny_tokens, monkeypatch):
    n, batch = tiny_tokens.shape[1], 4
    est = estimate_memory(tiny_model, n, batch, **settings(tiny_tokens))
    calls = []
    real_forward = tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    budget = est.run // 3
    with pytest.raises(InsufficientMemoryError) as info:
        run_statistics(tiny_model, tiny_tokens, batch_size=batch, progress=False, memory_budget=budget)
    assert not calls, "refused only after a forward pass"
    err = info.value
    text = str(err)
    print(text)
    assert isinstance(err, MemoryError) and isinstance(err, RuntimeError)  # the CLI prints RuntimeErrors
    assert f"needs about {memory.format_bytes(est.total)}" in text
    assert "available" in text and memory.format_bytes(budget) in text
    assert "at batch 1" in text and "Fix:" in text and "--force" in text
    assert err.estimate == est and err.available == budget
    # What fits is what the estimate says fits: the largest n at batch 1, the largest batch at n.
    fits = lambda m, b: estimate_memory(tiny_model, m, b, **settings(tiny_tokens, m)).run <= budget  # noqa: E731
    assert 3 <= err.max_tokens < n
    assert fits(err.max_tokens, 1) and not fits(err.max_tokens + 1, 1)
    assert f"n <= {err.max_tokens} at batch 1" in text
    if err.max_batch_size:
        assert fits(n, err.max_batch_size) and not fits(n, err.max_batch_size + 1)
        assert f"batch size <= {err.max_batch_size} at n = {n}" in text
    else:
        assert not fits(n, 1) and f"no batch size at n = {n}" in text
    # The advice works: a run at what fits goes through under the same budget.
    stats = run_statistics(tiny_model, tiny_tokens[:, :err.max_tokens], batch_size=1, progress=False,
                           memory_budget=budget)
    assert stats.prompts_done == list(range(len(tiny_tokens)))


def test_largest_batch_that_fits(tiny_model, tiny_tokens):
    n = tiny_tokens.shape[1]
    one = estimate_memory(tiny_model, n, 1, **settings(tiny_tokens)).run
    budget = estimate_memory(tiny_model, n, 2, **settings(tiny_tokens)).run  # batch 2 fits, 4 not
    assert budget > one
    with pytest.raises(InsufficientMemoryError) as info:
        run_statistics(tiny_model, tiny_tokens, batch_size=4, progress=False, memory_budget=budget)
    assert info.value.max_batch_size in (2, 3)
    assert f"lower --batch-size to {info.value.max_batch_size}" in str(info.value)


def test_budget_boundary_and_force(tiny_model, tiny_tokens):
    n = tiny_tokens.shape[1]
    est = estimate_memory(tiny_model, n, 2, n_buckets=4, **settings(tiny_tokens))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryWarning)
        fitted = run_statistics(tiny_model, tiny_tokens, batch_size=2, progress=False, n_buckets=4,
                                memory_budget=est.run)  # exactly enough: runs, no warning
    with pytest.raises(InsufficientMemoryError):
        run_statistics(tiny_model, tiny_tokens, batch_size=2, progress=False, n_buckets=4,
                       memory_budget=est.run - 1)
    with pytest.warns(MemoryWarning, match="forced past the memory check"):
        forced = run_statistics(tiny_model, tiny_tokens, batch_size=2, progress=False, n_buckets=4,
                                memory_budget=1, force=True)
    for c, cond in fitted.conditions.items():
        for t, st in cond.targets.items():
            np.testing.assert_array_equal(forced.conditions[c].targets[t].xty, st.xty)


@pytest.mark.parametrize("kind", ["cpu", "cuda", "python"])
def test_allocation_failure_gets_the_clear_message(tiny_model, tiny_tokens, monkeypatch, kind):
    original = {
        "cpu": RuntimeError(CPU_MESSAGE),
        "cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has a total "
                                       "capacity of 23.6 GiB of which 1.2 GiB is free."),
        "python": MemoryError(),
    }[kind]
    real = LayerAccumulator.add_layer

    def failing(self, layer, scores, prompt_ids):
        if int(prompt_ids[0]) >= 2:  # the second batch
            raise original
        return real(self, layer, scores, prompt_ids)

    monkeypatch.setattr(LayerAccumulator, "add_layer", failing)
    with pytest.raises(InsufficientMemoryError) as info:
        run_statistics(tiny_model, tiny_tokens, batch_size=2, progress=False)
    err = info.value
    text = str(err)
    print(text)
    assert text.startswith("out of memory during the forward pass of prompts 2..3 under condition 'causal'")
    if kind != "python":
        assert "allocating 9.0 GiB failed" in text
    assert "Fix:" in text and "lower --" in text
    assert "Allocator" not in text and "enforce fail" not in text and "GPU 0" not in text
    # Nothing of the allocator's text travels with it (no chained exception to print).
    assert err.__cause__ is None and err.__context__ is None
    assert err.estimate is not None and err.estimate.n_tokens == tiny_tokens.shape[1]


def test_other_errors_pass_through(tiny_model, tiny_tokens, monkeypatch):
    def failing(self, layer, scores, prompt_ids):
        raise RuntimeError("shape mismatch in a hook")

    monkeypatch.setattr(LayerAccumulator, "add_layer", failing)
    with pytest.raises(RuntimeError, match="shape mismatch") as info:
        run_statistics(tiny_model, tiny_tokens, batch_size=2, progress=False)
    assert not isinstance(info.value, InsufficientMemoryError)


def test_allocation_failure_classification():
    assert is_allocation_failure(RuntimeError(CPU_MESSAGE))
    assert is_allocation_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"))
    assert is_allocation_failure(MemoryError())
    assert not is_allocation_failure(RuntimeError("expected scalar type Float"))
    assert not is_allocation_failure(ValueError("out of memory"))
    assert not is_allocation_failure(InsufficientMemoryError("refused"))
    assert requested_bytes(RuntimeError(CPU_MESSAGE)) == 9663676416
    assert requested_bytes(RuntimeError("Tried to allocate 2.50 GiB")) == int(2.5 * 2**30)
    assert requested_bytes(MemoryError()) is None


# A real process under an address-space limit (the setting, scaled down): a tiny
# model with a long context, whose attention alone needs ~4 GiB at n = 8192.
RLIMIT_CHILD = textwrap.dedent(
    """
    import resource, sys, torch
    from rope_leak.backends import tiny_rope_model
    from rope_leak.engine.memory import InsufficientMemoryError, available_memory
    from rope_leak.engine.run import run_statistics
    model = tiny_rope_model(n_layers=1, n_heads=4, d_model=64, d_head=16, n_ctx=8192, d_vocab=50, seed=0)
    tokens = torch.randint(1, 50, (4, 8192), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    used = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    limit = used + (3 << 30)  # 3 GiB of address space left: one layer's scores take 1 GiB each
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    print("AVAILABLE", available_memory("cpu").source, flush=True)
    try:
        run_statistics(model, tokens, batch_size=1, progress=False, force=sys.argv[1] == "force")
    except InsufficientMemoryError as err:
        print("ERROR", err, flush=True)
        print("CHAINED", err.__context__ is not None or err.__cause__ is not None, flush=True)
        sys.exit(3)
    print("RAN", flush=True)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc are Linux")
@pytest.mark.parametrize("mode", ["check", "force"])
def test_under_an_address_space_limit(mode):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", RLIMIT_CHILD, mode], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    out = proc.stdout
    print(out, proc.stderr[-2000:])
    assert "AVAILABLE RLIMIT_AS" in out
    assert proc.returncode == 3, (out, proc.stderr[-3000:])
    assert "Allocator" not in out + proc.stderr and "Traceback" not in proc.stderr
    assert "CHAINED False" in out
    if mode == "check":  # refused before the first forward pass, with what fits
        assert "this run needs about" in out and "RLIMIT_AS" in out and "at batch 1" in out
    else:  # forced: the allocation fails for real, and is reported the same way
        assert "out of memory during the forward pass of prompts 0..0" in out and "Fix:" in out
