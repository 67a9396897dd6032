"""How much memory a streaming run needs, checked before its first forward pass.

A run that cannot fit used to end with the allocator's own words
(``DefaultCPUAllocator: can't allocate memory: you tried to allocate 9663676416 bytes``),
or, without an address-space limit, with the kernel's OOM killer and no message at all.
:func:`check_memory` (called by :func:`rope_leak.engine.run.run_statistics` before it
allocates anything) estimates the run's peak and refuses, with what fits, when it exceeds
what is available; ``force=True`` runs anyway. An allocation failure that still happens
is reported the same way (:func:`allocation_failure`).

What the estimate counts (bytes; ``E = batch x heads x n^2`` score elements of one layer,
``e`` the model dtype's size), all of it checked against measured peaks in
``bench/memory_estimate.py`` (``docs/memory.md``):

* **model**: parameters and buffers (already resident: counted in the total, not in what
  the run still needs);
* **attention**: one layer at a time holds the scores of all heads at once. TransformerLens
  3.9 (``AbstractAttention.forward``) makes ``q k^T`` and its scaled copy (``2 e E``),
  the causally masked copy (``torch.where``), and, after ``hook_attn_scores``, the
  softmax, ``torch.zeros_like`` of it, a bool ``isnan`` mask and the ``torch.where`` that
  zeroes NaNs, while the masked scores are still alive: ``(4 e + 1) E`` at the peak. The
  hooks work on the masked scores while they are alive: off the CPU kernel, the start
  cut (:func:`~rope_leak.engine.start_cut.start_cut_rows`) in chunks of ``K`` elements
  (``K = n^2 x min(batch x heads, max(1, 2^24 // n^2))``, a float64 ``log A`` and its
  square: ``16 K``) and the pure-torch accumulator (GPU, float64, no C compiler) a float32
  pattern, a masked copy and per-prompt float64 copies (``8 E + 16 E / batch``); a
  float32 upcast of float16/bfloat16 scores (``4 E``). The CPU kernel makes the start
  cut's rows and every sum in its own pass, with no temporary of the scores' size.
  The largest of these phases counts, times 1.5 on the CPU when one layer's scores are
  small enough (< 32 MiB) for glibc to serve them from its heap, which they fragment;
* **activations**: the rest of one forward pass (residual stream, q/k/v and their
  rotations, the MLP), ``O(batch x n x d)``;
* **statistics**: every condition's accumulators (``[bucket, layer, head, 3n]`` float64
  sums per dense target, row sums, the start cut's profile and its per-prompt
  ``[layer, head, n]`` float64 rows, kept for every prompt of the run);
* **transient**: between batches the start cut's per-prompt rows are concatenated (at
  the end, and for a checkpoint, which also serialises the statistics: about two more
  copies, on the host).

The total is ``model + statistics + max(attention + activations, transient)``; the
check compares everything but the model with the memory available now: on CPU the
smallest of ``MemAvailable`` (psutil, else ``/proc/meminfo``), a cgroup limit's headroom
and an ``RLIMIT_AS`` / ``RLIMIT_DATA`` headroom; on CUDA ``torch.cuda.mem_get_info`` plus
what PyTorch's caching allocator holds unused.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from rope_leak.engine.kernel import load_kernel
from rope_leak.engine.start_cut import DEFAULT_WINDOW
from rope_leak.engine.statistics import TARGETS, default_buckets, required_targets

try:  # optional: without psutil, MemAvailable comes from /proc/meminfo
    import psutil
except ImportError:  # pragma: no cover - psutil is not a dependency
    psutil = None
try:  # POSIX only
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None

#: the start cut works in chunks of at most this many score elements (see start_cut.py)
START_CUT_CHUNK = 1 << 24
MIB, GIB = 1 << 20, 1 << 30
#: glibc serves blocks below this from the heap (rope_leak.engine.allocator fixes it there)
HEAP_BLOCKS = 32 << 20
#: on the heap, freed score blocks between live ones fragment it: measured on SmolLM2 at
#: n = 256 and 512 (bench/memory_estimate.py), the attention phase's resident peak is about
#: 1.5 x its live bytes; above the mmap threshold each block is its own mapping (no excess)
HEAP_FRAGMENTATION = 1.5


class InsufficientMemoryError(MemoryError, RuntimeError):
    """A run that does not fit in the memory available (refused before it starts), or an
    allocation that failed during it. ``estimate``: the :class:`MemoryEstimate`;
    ``available``: bytes available (None when unknown); ``max_tokens``: the largest
    prompt length that fits at batch 1; ``max_batch_size``: the largest batch that fits
    at this length (0: none)."""

    def __init__(self, message: str, *, estimate: MemoryEstimate | None = None,
                 available: int | None = None, max_tokens: int | None = None,
                 max_batch_size: int | None = None) -> None:
        super().__init__(message)
        self.estimate, self.available = estimate, available
        self.max_tokens, self.max_batch_size = max_tokens, max_batch_size


class MemoryWarning(UserWarning):
    """A run forced past the memory check (``force=True``)."""


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``340 MiB``, ``2.5 MiB``."""
    if abs(n) >= GIB:
        return f"{n / GIB:.1f} GiB"
    if abs(n) >= 10 * MIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / MIB:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one :func:`~rope_leak.engine.run.run_statistics` call, in
    bytes, by part (see the module docstring). ``run``: what the run needs beyond the
    loaded model; ``total``: with the model."""

    n_tokens: int
    batch_size: int
    n_prompts: int
    device: str
    model: int
    attention: int
    activations: int
    statistics: int
    transient: int = 0
    kernel: bool = False  # whether the CPU kernel accumulates (no O(n^2) temporaries)

    @property
    def run(self) -> int:
        return self.statistics + max(self.attention + self.activations, self.transient)

    @property
    def total(self) -> int:
        return self.model + self.run

    def parts(self) -> str:
        """``model 652 MiB, already loaded; one layer's attention ...; ...``."""
        items = [f"model {format_bytes(self.model)}, already loaded",
                 f"one layer's attention scores and patterns {format_bytes(self.attention)}",
                 f"other activations {format_bytes(self.activations)}",
                 f"statistics {format_bytes(self.statistics)}"]
        if self.transient > self.attention + self.activations:
            items.append(f"checkpoint copies {format_bytes(self.transient)}")
        return "; ".join(items)


@dataclasses.dataclass(frozen=True)
class Available:
    """Memory available to the run now (bytes), and what bounds it."""

    bytes: int | None
    source: str


def _dtype_bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        key = (tensor.device, tensor.data_ptr())
        if key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def _uses_kernel(device: str, spec_window: bool) -> bool:
    """Whether the fused CPU kernel serves the scores (it makes no O(n^2) temporaries)."""
    if not device.startswith("cpu") or spec_window:
        return False
    try:
        return load_kernel() is not None
    except Exception:  # noqa: BLE001 - no kernel: the estimate takes the torch path
        return False


def estimate_memory(
    model,
    n_tokens: int,
    batch_size: int,
    *,
    n_prompts: int | None = None,
    conditions: Iterable[str] = ("causal", "bidirectional"),
    targets: Iterable[str] | None = None,
    n_buckets: int | None = None,
    cell_maps: bool = False,
    start_cut_window: int | None = DEFAULT_WINDOW,
    start_cut_conditions: Iterable[str] = ("causal",),
    checkpoint: bool = False,
    max_offset: int | None = None,
    kernel: bool | None = None,
    _model_bytes: int | None = None,
) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of ``run_statistics(model, tokens[P, n_tokens],
    batch_size=...)`` with these settings (the defaults are run_statistics' own).

    ``kernel``: whether the fused CPU kernel accumulates (default: it does on CPU when
    it builds). Pair counts are bounded by ``3 n`` columns and ``n (n + 1) / 2`` cells, so
    a restricted pair spec is slightly overestimated."""
    cfg = model.cfg
    n, B = int(n_tokens), int(batch_size)
    P = int(n_prompts if n_prompts is not None else B)
    B = max(1, min(B, P))
    L, H = int(cfg.n_layers), int(cfg.n_heads)
    d_model = int(cfg.d_model)
    d_head = int(getattr(cfg, "d_head", d_model // H) or d_model // H)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d_model)
    device = str(getattr(cfg, "device", "cpu") or "cpu")
    e = _dtype_bytes(getattr(cfg, "dtype", torch.float32))
    w = 8 if e == 8 else 4  # the hooks' working float size (float16/bfloat16 go to float32)
    upcast = 4 if e < 4 else 0
    G = int(n_buckets if n_buckets is not None else default_buckets(P))
    targets = required_targets(TARGETS if targets is None else targets)
    conditions = list(conditions)
    start_cut = set(start_cut_conditions) if start_cut_window is not None else set()
    if kernel is None:
        kernel = _uses_kernel(device, max_offset is not None) and e <= 4
    f64 = 8

    E = B * H * n * n
    n2 = n * n
    # TransformerLens' own copies: q k^T and its scaled copy; masked copy; after the hook the
    # scores stay alive beside softmax, zeros_like, the isnan mask and the NaN-zeroed pattern.
    forward_scores = 2 * e * E + n2
    forward_pattern = (4 * e + 1) * E
    if getattr(cfg, "use_attention_sinks", False):
        forward_pattern += 2 * e * E
    if getattr(cfg, "attn_scores_soft_cap", None):
        forward_scores += e * E
    dense = [t for t in ("pattern", "scores") if t in targets]
    if kernel:
        accumulator = upcast * E
    else:
        accumulator = upcast * E + 2 * w * E + 16 * E // B
        if cell_maps:
            accumulator += (w + f64) * E // 2
    chunk = n2 * min(B * H, max(1, START_CUT_CHUNK // n2))
    cut = 0 if kernel else 16 * chunk + n2
    attention = 0
    for name in conditions:
        hooks = e * E + max(accumulator, cut if name in start_cut else 0)
        attention = max(attention, forward_scores, forward_pattern, hooks)
    if device.startswith("cpu") and e * E < HEAP_BLOCKS:
        attention = int(attention * HEAP_FRAGMENTATION)
    # residual stream and layer norms, q/k/v with their rotations and z, the MLP
    activations = B * n * max(e, 4) * (6 * d_model + 4 * d_mlp + 8 * H * d_head)

    columns, cells = 3 * n, n * (n + 1) // 2
    per_head = G * L * H
    statistics = 0
    for name in conditions:
        statistics += per_head * f64 * (columns * len(dense) + len(targets) + 1)
        if {"log_pattern", "neg_log_z"} & set(targets):
            statistics += per_head * n * f64  # row sums of -log Z
        if cell_maps:
            statistics += 2 * L * H * cells * f64 * len(dense)
        if name in start_cut:
            statistics += per_head * f64 * (n + columns + 1)  # profile, log A sums
            statistics += (P + B) * L * H * n * f64  # per-prompt log rho, and the batch's
        statistics += (B + 8) * (L + 1) * d_model * f64  # position 0
    # between batches and at the end: the start cut's rows are concatenated (one copy); a
    # checkpoint also serialises everything into memory and takes its bytes (two copies)
    rows = sum(P * L * H * n * f64 for name in conditions if name in start_cut)
    transient = rows + (2 * statistics if checkpoint else 0)
    return MemoryEstimate(
        n_tokens=n, batch_size=B, n_prompts=P, device=device,
        model=model_bytes(model) if _model_bytes is None else int(_model_bytes),
        attention=int(attention), activations=int(activations), statistics=int(statistics),
        transient=int(transient), kernel=bool(kernel))


# ---------------------------------------------------------------------------------------
# What is available
# ---------------------------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _mem_available() -> int | None:
    if psutil is not None:
        try:
            return int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001 - psutil unsupported here: /proc/meminfo
            pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process' memory cgroup (v2 or v1), None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # v2
            candidates = [(root / rel / "memory.max", root / rel / "memory.current"),
                          (root / "memory.max", root / "memory.current")]
        elif "memory" in controllers.split(","):  # v1
            base = root / "memory"
            candidates = [(base / rel / "memory.limit_in_bytes", base / rel / "memory.usage_in_bytes"),
                          (base / "memory.limit_in_bytes", base / "memory.usage_in_bytes")]
        else:
            continue
        for limit_file, usage_file in candidates:
            limit, usage = _read_int(limit_file), _read_int(usage_file)
            if limit is None or usage is None or limit >= 1 << 60:  # "max" or no limit
                continue
            room = max(0, limit - usage)
            best = room if best is None else min(best, room)
            break
    return best


def _rlimit_headroom() -> tuple[int, str] | None:
    """The tightest of RLIMIT_AS (minus VmSize) and RLIMIT_DATA (minus VmData)."""
    if resource is None:
        return None
    out = None
    for name, used_key in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        kind = getattr(resource, name, None)
        if kind is None:
            continue
        soft, _ = resource.getrlimit(kind)
        if soft == resource.RLIM_INFINITY or soft < 0:
            continue
        used = _proc_status(used_key) or 0
        room = max(0, soft - used)
        if out is None or room < out[0]:
            out = (room, f"{name} {format_bytes(soft)} less {format_bytes(used)} in use")
    return out


def available_memory(device: str | torch.device = "cpu") -> Available:
    """Memory a run on ``device`` can still take, and what bounds it."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return Available(None, "no CUDA device")
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return Available(int(free + max(0, cached)),
                         f"free memory on {device} (torch.cuda.mem_get_info, plus PyTorch's unused cache)")
    if device.type != "cpu":
        return Available(None, f"unknown on {device.type}")
    candidates = []
    mem = _mem_available()
    if mem is not None:
        candidates.append((mem, "MemAvailable"))
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        candidates.append((cgroup, "the memory cgroup's limit less its usage"))
    rlimit = _rlimit_headroom()
    if rlimit is not None:
        candidates.append(rlimit)
    if not candidates:
        return Available(None, "unknown")
    return Available(*min(candidates, key=lambda c: c[0]))


# ---------------------------------------------------------------------------------------
# The check, and what fits
# ---------------------------------------------------------------------------------------


def what_fits(model, estimate_kwargs: dict, n_tokens: int, batch_size: int, available: int,
              model_size: int) -> tuple[int, int]:
    """``(largest n at batch 1, largest batch at n_tokens)`` whose run part fits in
    ``available`` (0 where none does); n is searched up to the model's context."""
    def run(n: int, b: int) -> int:
        return estimate_memory(model, n, b, _model_bytes=model_size, **estimate_kwargs).run

    n_ctx = int(getattr(model.cfg, "n_ctx", n_tokens) or n_tokens)
    hi_n = max(n_ctx, n_tokens)
    lo, hi = 0, hi_n
    while lo < hi:  # largest n in [3, hi_n] with run(n, 1) <= available
        mid = (lo + hi + 1) // 2
        if mid >= 3 and run(mid, 1) <= available:
            lo = mid
        else:
            hi = mid - 1
    max_n = lo
    P = int(estimate_kwargs.get("n_prompts") or batch_size)
    lo, hi = 0, max(1, min(batch_size, P))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if run(n_tokens, mid) <= available:
            lo = mid
        else:
            hi = mid - 1
    return max_n, lo


def _fix(n_tokens: int, batch_size: int, max_n: int, max_b: int, estimate: MemoryEstimate,
         available: int) -> str:
    """The "Fix: ..." of a run that does not fit."""
    options = []
    if max_b >= 1 and max_b < batch_size:
        options.append(f"lower --batch-size to {max_b} (the largest batch that fits at n = {n_tokens})")
    if max_n >= 3 and max_n < n_tokens:
        options.append(f"lower --tokens to {max_n} or less (the largest n that fits at batch 1)")
    if max_b == 0 and max_n >= n_tokens:
        options.append("use fewer prompts (the start cut keeps a float64 row per prompt, layer and head)")
    if max_n < 3 and max_b == 0:
        options.append("free memory or use a machine with more (even n = 3 at batch 1 does not fit)")
    options.append("run on a device with more memory, or pass --force (force=True) to run anyway")
    return "Fix: " + "; or ".join(options) + "."


def check_memory(
    model, n_tokens: int, batch_size: int, *, memory_budget: int | None = None, force: bool = False,
    **estimate_kwargs,
) -> MemoryEstimate:
    """Estimate the run (:func:`estimate_memory`) and refuse it, with what fits, when it
    needs more than is available (``memory_budget`` bytes when given, else
    :func:`available_memory` of the model's device). ``force=True``: warn and go on.
    Returns the estimate."""
    size = model_bytes(model)
    estimate = estimate_memory(model, n_tokens, batch_size, _model_bytes=size, **estimate_kwargs)
    if memory_budget is not None:
        available = Available(int(memory_budget), "the memory budget given")
    else:
        available = available_memory(estimate.device)
    if available.bytes is None or estimate.run <= available.bytes:
        return estimate
    max_n, max_b = what_fits(model, {**estimate_kwargs, "kernel": estimate.kernel}, n_tokens, batch_size,
                             available.bytes, size)
    message = (
        f"this run needs about {format_bytes(estimate.total)} ({estimate.parts()}) for prompts of "
        f"n = {n_tokens} tokens at batch size {estimate.batch_size} on {estimate.device}, but only "
        f"{format_bytes(available.bytes)} is available ({available.source}) beyond the loaded model. "
        f"What fits: n <= {max_n} at batch 1; " + (
            f"batch size <= {max_b} at n = {n_tokens}. " if max_b else f"no batch size at n = {n_tokens}. ")
        + _fix(n_tokens, estimate.batch_size, max_n, max_b, estimate, available.bytes))
    if force:
        warnings.warn(f"forced past the memory check: {message.split(' Fix:')[0]}", MemoryWarning,
                      stacklevel=3)
        return estimate
    raise InsufficientMemoryError(message, estimate=estimate, available=available.bytes,
                                  max_tokens=max_n, max_batch_size=max_b)


# ---------------------------------------------------------------------------------------
# An allocation that fails anyway
# ---------------------------------------------------------------------------------------

_ALLOCATOR_TEXT = re.compile(
    r"can't allocate memory|out of memory|not enough memory|DefaultCPUAllocator|"
    r"failed to allocate|Tried to allocate|cannot allocate memory", re.IGNORECASE)
_REQUESTED = (re.compile(r"allocate (\d+) bytes"),
              re.compile(r"[Tt]ried to allocate ([\d.]+) ?(GiB|MiB|KiB|B)\b"))
_UNITS = {"GiB": GIB, "MiB": MIB, "KiB": 1 << 10, "B": 1}


def is_allocation_failure(err: BaseException) -> bool:
    """An out-of-memory error from PyTorch (CPU or CUDA) or Python."""
    if isinstance(err, InsufficientMemoryError):
        return False
    if isinstance(err, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    return isinstance(err, RuntimeError) and bool(_ALLOCATOR_TEXT.search(str(err)))


def requested_bytes(err: BaseException | str) -> int | None:
    """The size of the allocation that failed, when the allocator said it."""
    text = str(err)
    match = _REQUESTED[0].search(text)
    if match:
        return int(match[1])
    match = _REQUESTED[1].search(text)
    if match:
        return int(float(match[1]) * _UNITS[match[2]])
    return None


def allocation_failure(err: BaseException | str, *, where: str, estimate: MemoryEstimate | None,
                       model=None, estimate_kwargs: dict | None = None) -> InsufficientMemoryError:
    """The clear error for an allocation that failed during a run (``where``: what was
    running; ``err``: the allocator's error or its text): what failed and what to lower,
    without the allocator's text. Build it once the failed frames are released (outside
    the ``except`` block), so that what is available is measured without their tensors."""
    requested = requested_bytes(err)
    what = f"allocating {format_bytes(requested)} failed" if requested else "an allocation failed"
    device = estimate.device if estimate is not None else "cpu"
    available = available_memory(device)
    parts = [f"out of memory during {where}: {what}."]
    max_n = max_b = None
    if estimate is not None:
        parts.append(f"The run was estimated at {format_bytes(estimate.total)} ({estimate.parts()});")
        if available.bytes is not None:
            parts.append(f"{format_bytes(available.bytes)} is available now ({available.source}).")
        if model is not None and available.bytes is not None:
            # Leave room for what the estimate missed (other processes, fragmentation).
            budget = int(min(available.bytes, estimate.run) * 0.8)
            max_n, max_b = what_fits(model, {**(estimate_kwargs or {}), "kernel": estimate.kernel},
                                     estimate.n_tokens, estimate.batch_size, budget, estimate.model)
    fix = []
    if estimate is not None:
        if max_b and max_b < estimate.batch_size:
            fix.append(f"lower --batch-size to {max_b}")
        elif estimate.batch_size > 1:
            fix.append(f"lower --batch-size (now {estimate.batch_size})")
        if max_n and 3 <= max_n < estimate.n_tokens:
            fix.append(f"lower --tokens to {max_n} or less")
        elif not fix:
            fix.append(f"lower --tokens (now {estimate.n_tokens})")
    else:
        fix.append("lower --tokens or --batch-size")
    fix.append("or free memory (other processes) / use a device with more")
    parts.append("Fix: " + "; ".join(fix) + ".")
    return InsufficientMemoryError(" ".join(parts), estimate=estimate, available=available.bytes,
                                   max_tokens=max_n, max_batch_size=max_b)


__all__ = [
    "Available", "InsufficientMemoryError", "MemoryEstimate", "MemoryWarning", "allocation_failure",
    "available_memory", "check_memory", "estimate_memory", "format_bytes", "is_allocation_failure",
    "model_bytes", "requested_bytes", "what_fits",
]

