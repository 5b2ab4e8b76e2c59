"""Linear layers whose weights stay fp16 while CPU activations are fp32.

A CPU decode step is bound by the bytes of weight it reads; fp16 weights read half the bytes of an fp32
copy. Few activation rows (a decode step, a small batch) go to the native fp16 GEMV (`_cpugemv`), which
accumulates in fp32; many rows (a prefill, an evaluation window) convert the weight to fp32 for torch's
matmul, where the arithmetic, not the bytes, is the cost. Without the extension everything takes that path.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("sparsezip")

try:  # optional: built by setup.py when a C compiler is present
    from . import _cpugemv as _native
except ImportError as exc:
    _native = None
    logger.debug("native fp16 GEMV not available (%s); converting weights per call", exc)

# Up to this many activation rows the GEMV reads each weight once for all of them and stays memory bound.
GEMV_MAX_ROWS = 16


def available() -> bool:
    return _native is not None


def mixed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] @ weight[n, k]^T (+ bias) -> [..., n] in x's dtype; the weight may be fp16 under fp32 x."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    if (_native is None or rows > GEMV_MAX_ROWS or x.dtype != torch.float32 or weight.dtype != torch.float16
            or x.device.type != "cpu" or not weight.is_contiguous()):
        return F.linear(x, weight.to(x.dtype), bias)
    n = weight.shape[0]
    flat = x.reshape(rows, k).contiguous()
    y = torch.empty(rows, n, dtype=torch.float32)
    _native.gemv_f16(weight.numpy(), flat.numpy(), y.numpy(), n, k, rows, torch.get_num_threads())
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], n)
