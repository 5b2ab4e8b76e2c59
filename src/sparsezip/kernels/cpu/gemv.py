"""Products with weights that stay fp16 (dense, or in a sparse layout) while CPU activations are fp32.

A CPU decode step is bound by the bytes of weight it reads; fp16 weights read half the bytes of an fp32
copy. Few activation rows (decode steps, small batches; short prompts on large weights) go to the native fp16
GEMV (native/gemv.c), which accumulates in fp32; more rows (a prefill, an evaluation window) convert the weight
to fp32 for torch's matmul, where the arithmetic, not the bytes, is the cost. Without the extension everything
takes that path.

`SparseWeight` holds a pruned fp16 matrix as a bitmap plus its nonzero values -- for L2-rounded (E5M2-valued)
weights one byte per value plus a short exception list -- and `sparse_linear` multiplies from it, expanding in
registers: ~6 bits per weight at 50% sparsity instead of 16, and the same results as the dense fp16 GEMV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import native, threads_for

# Rows up to which the native kernel beats converting the weight for torch's sgemm (bench/codec.py measures both):
# the GEMV reads the weight once per 8 rows, sgemm pays for a fresh fp32 copy first -- and for a large weight that
# copy also costs page faults on every call, so large weights keep the GEMV for short prompts too.
GEMV_MAX_ROWS = 16
GEMV_MAX_ROWS_LARGE = 128
LARGE_WEIGHT = 4 * 2**20  # elements


def gemv_max_rows(weight_numel: int) -> int:
    """Most activation rows the native kernels take for a weight of this size (see GEMV_MAX_ROWS)."""
    return GEMV_MAX_ROWS_LARGE if weight_numel >= LARGE_WEIGHT else GEMV_MAX_ROWS


def mixed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] @ weight[n, k]^T (+ bias) -> [..., n] in x's dtype; the weight may be fp16 under fp32 x."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    if (native is None or rows > gemv_max_rows(weight.numel()) or x.dtype != torch.float32
            or weight.dtype != torch.float16 or x.device.type != "cpu" or not weight.is_contiguous()):
        return F.linear(x, weight.to(x.dtype), bias)
    n = weight.shape[0]
    y = torch.empty(x.shape[:-1] + (n,), dtype=torch.float32)  # the kernel sees x and y as [rows, k] and [rows, n]
    native.gemv_f16(weight.numpy(), x.contiguous().numpy(), y.numpy(), n, k, rows, threads_for(n * k * rows))
    if bias is not None:
        y += bias
    return y


VALUE_PAD = 16  # bytes readable past the last value (the kernel loads 16 at a time); as in _cpugemv.c


@dataclass(frozen=True, eq=False)
class SparseWeight:
    """An fp16 matrix [n, k] as the bitmap of its nonzero entries (bit patterns != 0) and their values.

    Row r's values are values[row_start[r]:row_start[r+1]], in column order. With `e5m2` (chosen when under a
    third of the values have a nonzero low byte, as after L2 rounding) `values` holds only their high bytes, and
    the low bytes that are not 0 sit in exc_low, at column exc_col, for row r's exceptions row_exc[r]:row_exc[r+1].
    A runtime layout built by pack_sparse, not a file format; the arrays are read-only.
    """

    shape: tuple[int, int]
    bitmap: np.ndarray  # uint8 [n, ceil(k / 8)], LSB first
    values: np.ndarray  # uint8 high bytes (e5m2) or uint16 bit patterns, [nnz] + VALUE_PAD bytes of padding
    row_start: np.ndarray  # int64 [n + 1]
    exc_col: np.ndarray  # int32 [E], increasing within each row
    exc_low: np.ndarray  # uint8 [E]
    row_exc: np.ndarray  # int64 [n + 1]
    e5m2: bool

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.bitmap, self.values, self.row_start, self.exc_col, self.exc_low,
                                      self.row_exc))

    def arrays(self) -> tuple:
        return self.bitmap, self.values, self.row_start, self.exc_col, self.exc_low, self.row_exc, self.e5m2


def pack_sparse(weight: torch.Tensor) -> SparseWeight:
    """The sparse layout of a CPU fp16 matrix (vectorised numpy, no loop over rows or elements)."""
    if weight.dtype != torch.float16 or weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"pack_sparse takes a 2-D CPU float16 tensor, got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    bits = weight.contiguous().view(torch.int16).numpy().view(np.uint16)
    present = bits != 0
    row_start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.count_nonzero(present, axis=1), out=row_start[1:])
    values = bits[present]  # row-major: row by row, columns in order
    low = (values & 0xFF).astype(np.uint8)
    exceptions = np.flatnonzero(low)
    e5m2 = 3 * exceptions.size < values.size
    if e5m2:
        stored = np.concatenate([(values >> 8).astype(np.uint8), np.zeros(VALUE_PAD, np.uint8)])
        exc_col = np.nonzero(present)[1][exceptions].astype(np.int32)
        exc_low, row_exc = low[exceptions], np.searchsorted(exceptions, row_start).astype(np.int64)
    else:
        stored = np.concatenate([values, np.zeros(VALUE_PAD // 2, np.uint16)])
        exc_col, exc_low, row_exc = np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(n + 1, np.int64)
    bitmap = np.packbits(present, axis=1, bitorder="little")
    arrays = (bitmap, stored, row_start, exc_col, exc_low, row_exc)
    for a in arrays:
        a.flags.writeable = False
    return SparseWeight((n, k), *arrays, bool(e5m2))


def unpack_sparse(sparse: SparseWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense fp16 matrix of a SparseWeight, written into `out` ([n, k] fp16, contiguous) when given."""
    n, k = sparse.shape
    out = torch.empty(n, k, dtype=torch.float16) if out is None else out
    if native is not None:
        native.sparse_unpack(*sparse.arrays(), out.view(torch.int16).numpy(), n, k, threads_for(n * k // 4))
        return out
    present = np.unpackbits(sparse.bitmap, axis=1, count=k, bitorder="little").astype(bool)
    nnz = int(sparse.row_start[-1])
    values = sparse.values[:nnz].astype(np.uint16) << 8 if sparse.e5m2 else sparse.values[:nnz]
    dense = np.zeros((n, k), dtype=np.uint16)
    dense[present] = values
    dense[np.repeat(np.arange(n), np.diff(sparse.row_exc)), sparse.exc_col] |= sparse.exc_low
    out.copy_(torch.from_numpy(dense.view(np.int16)).view(torch.float16))
    return out


def sparse_linear(x: torch.Tensor, sparse: SparseWeight, bias: torch.Tensor | None = None,
                  scratch: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """x [..., k] fp32 @ W^T (+ bias) from the sparse layout, bit-identical to mixed_linear on the dense W.

    Few rows multiply straight from the layout; more rows unpack W into `scratch()` (an fp16 [n, k] buffer) or a
    fresh one, then take mixed_linear's path.
    """
    n, k = sparse.shape
    rows = x.numel() // k
    if native is None or rows > gemv_max_rows(n * k) or x.dtype != torch.float32:
        dense = unpack_sparse(sparse, None if scratch is None else scratch())
        return mixed_linear(x, dense, bias)
    y = torch.empty(x.shape[:-1] + (n,), dtype=torch.float32)
    native.sparse_gemv(*sparse.arrays(), x.contiguous().numpy(), y.numpy(), n, k, rows, threads_for(n * k * rows))
    if bias is not None:
        y += bias
    return y
