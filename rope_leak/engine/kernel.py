"""The fused CPU accumulation kernel (``_accumulate.c``): compiled on first use, cached.

Built with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) with portable
flags (``-O3``, no ``-march=native``: the library runs on any CPU of the same
architecture, so a cache folder shared between machines is safe) into the rope_leak
cache folder (``~/.cache/rope_leak/kernels``, or ``$ROPE_LEAK_CACHE``), keyed by the
source's sha256, the flags, the platform and the compiler, and called through
``ctypes``. No torch headers are needed, so the build takes about a second. It is built
with OpenMP (``-fopenmp``) where the compiler has it, and runs its work units on
``torch.get_num_threads()`` threads: in a torch built on OpenMP the process has one
libgomp, so these are torch's own pool threads, which are still spinning when the hook
runs and take the work at once (threads of its own would compete with them for the
cores). A compiler without OpenMP gives a one-thread build. ``ROPE_LEAK_KERNEL_FLAGS``
replaces the portable flags, ``-fopenmp`` still being tried on top (e.g. add
``-march=native`` for a build tuned to this CPU). When no
compiler is available, the build fails, or ``ROPE_LEAK_KERNEL=0``, :func:`load_kernel`
returns None and the engine falls back to its pure-torch path (same statistics, slower
on CPU).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

from rope_leak.download_cache import cache_dir, file_lock

SOURCE = Path(__file__).with_name("_accumulate.c")
KERNEL_ENV_VAR = "ROPE_LEAK_KERNEL"
PORTABLE_FLAGS = (
    "-O3 -fopenmp-simd -fno-math-errno -fno-trapping-math -fassociative-math -fno-signed-zeros "
    "-fPIC -shared -std=gnu99"
)
OPENMP_FLAGS = ("-fopenmp",)
FLAGS = tuple(os.environ.get("ROPE_LEAK_KERNEL_FLAGS", PORTABLE_FLAGS).split())

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str, target: Path) -> None:
    """Build with OpenMP, or without it when the compiler cannot (one thread)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        for extra in (OPENMP_FLAGS, ()):
            try:
                subprocess.run([compiler, *FLAGS, *extra, "-o", str(out), str(SOURCE), "-lm"],
                               check=True, capture_output=True, text=True, timeout=300)
                break
            except subprocess.CalledProcessError:
                if not extra:
                    raise
        os.replace(out, target)


@lru_cache(maxsize=1)
def load_kernel():
    """The ctypes function ``rl_accumulate``, or None when it cannot be built."""
    if os.environ.get(KERNEL_ENV_VAR, "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    key = hashlib.sha256(
        SOURCE.read_bytes() + repr((FLAGS, OPENMP_FLAGS, platform.machine(), sys.platform, compiler)).encode()
    ).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"rl_accumulate_{key}.so"
    try:
        if not target.exists():
            with file_lock(target):
                if not target.exists():
                    _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"rope_leak: could not build the CPU kernel ({detail}); using the slower "
                      "pure-torch path.", RuntimeWarning, stacklevel=2)
        return None
    fn = lib.rl_accumulate
    fn.restype = ctypes.c_int
    fn.argtypes = [_ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _ptr,
                   _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
                   _i64, _i64, _i64, _ptr, _ptr,
                   _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr]
    return fn
