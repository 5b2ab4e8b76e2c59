"""Linear layers whose weights stay fp16 while CPU activations are fp32.

A CPU decode step is bound by the bytes of weight it reads; fp16 weights read half the bytes of an fp32
copy. Few activation rows (decode steps, small batches; short prompts on large weights) go to the native fp16
GEMV (`_cpugemv`), which accumulates in fp32; more rows (a prefill, an evaluation window) convert the weight
to fp32 for torch's matmul, where the arithmetic, not the bytes, is the cost. Without the extension everything takes that path.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger("sparsezip")

try:  # optional: built by setup.py when a C compiler is present
    from . import _cpugemv as _native
except ImportError as exc:
    _native = None
    logger.debug("native fp16 GEMV not available (%s); converting weights per call", exc)

# Rows up to which the native kernel beats converting the weight for torch's sgemm. Measured (ms per call, 2
# threads, GEMV / convert + sgemm): a 3072 x 576 weight 1.53 / 2.94 at 16 rows but 8.68 / 5.83 at 128; an
# 11264 x 2048 weight 10.8 / 85.2 at 16 rows and 126.7 / 123.0 at 128 -- a fresh fp32 copy of a large weight costs
# page faults on every call, so large weights keep the GEMV for short prompts too.
GEMV_MAX_ROWS = 16
GEMV_MAX_ROWS_LARGE = 128
LARGE_WEIGHT = 4 * 2**20  # elements


def available() -> bool:
    return _native is not None


@functools.cache  # asked ~100 times per decode step: one environment read and syscall per process is enough
def gemv_threads() -> int:
    """Threads for the GEMV: OMP_NUM_THREADS when set (torchrun sets 1 per process), else the CPUs this process
    may use. Not torch.get_num_threads(): decode steps run torch's own small ops on one thread (see generate.py)."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def mixed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] @ weight[n, k]^T (+ bias) -> [..., n] in x's dtype; the weight may be fp16 under fp32 x."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    max_rows = GEMV_MAX_ROWS_LARGE if weight.numel() >= LARGE_WEIGHT else GEMV_MAX_ROWS
    if (_native is None or rows > max_rows or x.dtype != torch.float32 or weight.dtype != torch.float16
            or x.device.type != "cpu" or not weight.is_contiguous()):
        return F.linear(x, weight.to(x.dtype), bias)
    n = weight.shape[0]
    flat = x.reshape(rows, k).contiguous()
    y = torch.empty(rows, n, dtype=torch.float32)
    # starting a thread costs ~30 us: below ~1M multiply-adds one thread finishes first
    threads = gemv_threads() if n * k * rows >= 2**20 else 1
    _native.gemv_f16(weight.numpy(), flat.numpy(), y.numpy(), n, k, rows, threads)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], n)
