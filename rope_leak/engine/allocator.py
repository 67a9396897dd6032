"""Keep freed memory in the process (glibc malloc), so that a streaming pass does not
page-fault its way through every forward pass.

glibc returns the top of the heap to the OS once more than ``M_TRIM_THRESHOLD`` of it is
free, and its adaptive thresholds move with the allocation history. A forward pass frees
tens of MB of attention scores and patterns per layer, so whether the next layer's
tensors come back as fresh (zero-filled, faulted-in) pages depends on which small
allocations happen to sit at the heap top: measured on SmolLM2 at 16 x 256 tokens, 0 to
1.5 million minor page faults per pass, and 10-30% of the wall time, for the same work.
Fixing the thresholds (the usual advice is jemalloc or tcmalloc through ``LD_PRELOAD``,
which a library cannot do after start-up) removes them.

This is process-wide and, like any ``mallopt``, cannot be undone to the adaptive state,
so the library never does it by itself: call :func:`tune_allocator` (exported as
``rope_leak.tune_allocator``) once, early, in a program that runs long streaming passes.
The ``rope-leak`` command line does. It does nothing off glibc, and nothing when
``ROPE_LEAK_MALLOC=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ALLOCATOR_ENV_VAR = "ROPE_LEAK_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free heap top
MMAP_THRESHOLD = 32 << 20  # glibc's maximum: smaller blocks come from the heap

_applied: bool | None = None


def tune_allocator() -> bool:
    """Fix glibc's malloc trim and mmap thresholds for this process (see the module
    docstring); True when they are set. Idempotent; a no-op off glibc or with
    ``ROPE_LEAK_MALLOC=0``."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ALLOCATOR_ENV_VAR, "1") == "0" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _applied = bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        _applied = False
    return _applied


