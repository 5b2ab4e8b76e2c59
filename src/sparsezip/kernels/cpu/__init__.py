"""The native CPU kernels: one C extension (`_native`, built from native/*.c by setup.py) with one CPU-feature
detection, one thread pool and one summation order (native/spz.h).

`native` is the loaded extension, or None when it was not built (no C compiler): every caller then takes its
numpy/torch path. The kernel level (scalar, avx2, avx512) is the best this CPU and OS support; the environment
variable SPARSEZIP_ISA caps it, e.g. SPARSEZIP_ISA=scalar to run the portable fallbacks.
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from typing import Iterator

from ...errors import SparsezipError

log = logging.getLogger("sparsezip")
ISA_ENV = "SPARSEZIP_ISA"
LEVELS = ("scalar", "avx2", "avx512")

try:  # loaded once; the handle never changes afterwards
    from . import _native as native
except ImportError as exc:  # not built (no compiler) or built for another Python
    native = None
    log.debug("native CPU kernels not available (%s); using the numpy/torch paths", exc)


def _apply_isa_cap() -> None:
    cap = os.environ.get(ISA_ENV, "").strip().lower()
    if not cap or native is None:
        return
    if cap not in LEVELS:
        raise SparsezipError(f"{ISA_ENV}={cap!r} is not a kernel level; use one of {', '.join(LEVELS)}")
    native.set_level(cap)


_apply_isa_cap()


def available() -> bool:
    """True when the C extension is loaded."""
    return native is not None


def require() -> None:
    if native is None:
        raise SparsezipError("the native CPU kernels are not built; reinstall with `pip install -e .` on a machine "
                             "with a C compiler, or use the numpy backend")


def features() -> dict:
    """{'level': the kernel level in use, 'detected': the best this CPU supports, 'flags': {feature: bool}}."""
    if native is None:
        return {"level": "none (extension not built)", "detected": "none", "flags": {}}
    return native.features()


def describe_level(level: str) -> str:
    """The level as users read it: at avx512 the batch bands of the dense GEMV and of the sparse layout, and the
    compressed layout's batch product, have code of their own (AVX-512VL's 32 registers, two activation rows per
    512-bit FMA), and so has the sparse layout's one-row walk (a vpexpandb per 32 columns); the other kernels run
    their AVX2 code."""
    return f"{level} (batches and prompts of dense rows, sparse rows and batches of compressed tiles in AVX-512 " \
        "registers; the rest AVX2 code)" if level == "avx512" else level


@contextmanager
def capped_level(level: str) -> Iterator[None]:
    """Run the kernels at most at `level` inside the block (tests use it to exercise every fallback)."""
    require()
    previous = native.set_level(level)
    try:
        yield
    finally:
        native.set_level(previous)


@functools.cache  # asked on every kernel call: one environment read and syscall per process is enough
def threads() -> int:
    """Threads for the kernels: OMP_NUM_THREADS when set (torchrun sets 1 per process), else the CPUs this process
    may run on. Not torch.get_num_threads(): decode steps run torch's own small ops on one thread."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def threads_for(multiply_adds: int) -> int:
    """Threads for a native call of this much work (the rule is native/spz.h's spz_threads_for)."""
    return threads() if multiply_adds >= native.PARALLEL_MIN_WORK else 1
