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
WIDE_COLS = 4096  # columns above which a CPU fp16 matrix is held in column blocks (blocks_columns)


def gemv_max_rows(weight_numel: int) -> int:
    """Most activation rows the native kernels take for a weight of this size (see GEMV_MAX_ROWS)."""
    return GEMV_MAX_ROWS_LARGE if weight_numel >= LARGE_WEIGHT else GEMV_MAX_ROWS


def mixed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] @ weight[n, k]^T (+ bias) -> [..., n] in x's dtype; the weight may be fp16 under fp32 x."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if (native is None or rows > gemv_max_rows(weight.numel()) or x.dtype != torch.float32
            or weight.dtype != torch.float16 or x.device.type != "cpu" or not weight.is_contiguous()):
        return F.linear(x, weight.to(x.dtype), bias)
    return native_gemv(x, weight, weight.shape[0], False, bias)


def native_gemv(x: torch.Tensor, weight: torch.Tensor, n: int, blocked: bool,
                bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 x [..., k] @ W^T (+ bias) by the native fp16 GEMV; weight holds W's n * k fp16 values, in column blocks
    when `blocked`."""
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    y = torch.empty(x.shape[:-1] + (n,), dtype=torch.float32)  # the kernel sees x and y as [rows, k] and [rows, n]
    native.gemv_f16(weight.numpy(), x.contiguous().numpy(), y.numpy(), n, k, rows, blocked, threads_for(n * k * rows))
    if bias is not None:
        y += bias
    return y


def blocks_columns(k: int) -> bool:
    """Whether a CPU fp16 matrix of k columns is held in column blocks (native/gemv.c): one fp32 activation row of
    more than WIDE_COLS columns (16 KB) does not stay in L1 beside the streamed weights, and reading it from L2 for
    every weight row halved the matrix's streaming speed on an AMD Zen 4."""
    return native is not None and k > WIDE_COLS


def block_columns(weight: torch.Tensor) -> torch.Tensor:
    """The [n, k] matrix's values in column blocks of native.BLOCK_COLS, flat: the block of columns [c, c + b) at
    element c * n, row-major."""
    width = native.BLOCK_COLS
    return torch.cat([weight[:, c:c + width].reshape(-1) for c in range(0, weight.shape[1], width)])


def unblock_columns(flat: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The [n, k] matrix held flat in column blocks (block_columns' inverse), as a new tensor."""
    width = native.BLOCK_COLS
    return torch.cat([flat[c * n:(c + min(width, k - c)) * n].view(n, -1) for c in range(0, k, width)], dim=1)


def blocked_linear(x: torch.Tensor, flat: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., k] @ W^T (+ bias) for fp32 x and W held flat in column blocks; as mixed_linear with the [n, k] W."""
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    if rows > gemv_max_rows(flat.numel()):
        return F.linear(x, unblock_columns(flat, n, k).to(x.dtype), bias)
    return native_gemv(x, flat, n, True, bias)


VALUE_PAD = 16  # bytes readable past the last value (a group's values are loaded 16 at a time); native/gemv.c's
TILE = 128  # the summation order's unit: native/spz.h's SPZ_TILE, the codec's tile edge (a test holds all three equal)
PACK_VALUES = 2**22  # matrix entries per block of rows while packing: bounds the temporaries


@dataclass(frozen=True, eq=False)
class SparseWeight:
    """An fp16 matrix [n, k] as the bitmap of its nonzero entries (bit patterns != 0) and their values, in groups
    of 8 columns: a group whose values all have a low byte of 0 (E5M2 values, as after L2 rounding) stores one
    byte per value (the high byte), any other ("wide") group two (the fp16 pattern). Each group's code holds its
    bytes of values, its bitmap byte and whether it is wide: one load gives the kernel the pointer step and the row
    of its pshufb table, one AND each.
    Row r's values are values[row_start[r]:row_start[r+1]], group by group, in column order. A runtime layout
    built by pack_sparse (the byte layout is native/gemv.c's), not a file format; the arrays are read-only.
    """

    shape: tuple[int, int]
    codes: np.ndarray  # uint16 [n, kb], kb = ceil(k / 8): bytes | bitmap byte (LSB = first column) << 5 | wide << 13
    values: np.ndarray  # uint8 [row_start[n] + VALUE_PAD]
    row_start: np.ndarray  # int64 [n + 1]
    tile_start: np.ndarray  # uint32 [n, ceil(k / 128)]: where each tile's values start, from the row's start

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.codes, self.values, self.row_start, self.tile_start


def present_per_group(present: np.ndarray, kb: int) -> np.ndarray:
    """Nonzero entries per group of 8 columns: [rows, k] bool -> [rows, kb] int64."""
    padded = np.zeros((len(present), 8 * kb), bool)
    padded[:, :present.shape[1]] = present
    return padded.reshape(len(present), kb, 8).sum(2)


def pack_sparse(weight: torch.Tensor) -> SparseWeight:
    """The sparse layout of a CPU fp16 matrix (vectorised numpy, a loop over blocks of rows only)."""
    if weight.dtype != torch.float16 or weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"pack_sparse takes a 2-D CPU float16 tensor, got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    bits = weight.contiguous().view(torch.int16).numpy().view(np.uint16)
    kb = -(-k // 8)
    tiles = -(-k // TILE)
    codes = np.empty((n, kb), np.uint16)
    tile_bytes = np.empty((n, tiles), np.int64)
    streams = []
    step = max(1, PACK_VALUES // k)
    for r0 in range(0, n, step):  # bounds the per-entry temporaries to one block of rows
        block = bits[r0:r0 + step]
        present = block != 0
        wide = np.zeros((len(block), 8 * kb), bool)  # [rows, columns padded to whole groups]
        wide[:, :k] = present & ((block & 0xFF) != 0)
        wide_groups = wide.reshape(len(block), kb, 8).any(2)  # [rows, kb]
        group_bytes = np.zeros((len(block), tiles * TILE // 8), np.int64)
        group_bytes[:, :kb] = present_per_group(present, kb) * (1 + wide_groups)
        bitmaps = np.packbits(present, axis=1, bitorder="little").astype(np.uint16)
        codes[r0:r0 + step] = group_bytes[:, :kb] | bitmaps << 5 | wide_groups.astype(np.uint16) << 13
        wide_value = np.repeat(wide_groups, 8, axis=1)[:, :k][present]  # per value in row-major order
        width = 1 + wide_value.astype(np.int64)
        offset = np.concatenate([[0], np.cumsum(width)[:-1]])
        stream = np.zeros(int(width.sum()), np.uint8)
        values = block[present]
        stream[offset + wide_value] = values >> 8  # the high byte: first of one, second of two (little-endian)
        stream[offset[wide_value]] = values[wide_value] & 0xFF
        tile_bytes[r0:r0 + step] = group_bytes.reshape(len(block), tiles, TILE // 8).sum(2)
        streams.append(stream)
    row_start = np.concatenate([[0], np.cumsum(tile_bytes.sum(1))]).astype(np.int64)
    tile_start = (np.cumsum(tile_bytes, axis=1) - tile_bytes).astype(np.uint32)
    held = one_buffer([codes, (int(row_start[-1]) + VALUE_PAD,), row_start, tile_start])
    held_codes, values, held_row_start, held_tile_start = held
    held_codes[...], held_row_start[...], held_tile_start[...] = codes, row_start, tile_start
    np.concatenate(streams + [np.zeros(VALUE_PAD, np.uint8)], out=values)  # straight into place: no second copy
    for a in held:
        a.flags.writeable = False
    return SparseWeight((n, k), *held)


def one_buffer(parts: list) -> list[np.ndarray]:
    """One view for each part (an array, for its shape and dtype, or a shape of bytes) into one uint8 allocation,
    each starting a multiple of 64 bytes from its start. Why one: numpy asks Linux for transparent huge pages only
    on allocations of 4 MiB or more, and most matrices' codes alone are smaller; held with the values, they stream
    out of 2 MiB pages too (in one process, alternating with separate arrays, the random 1.2B model's sparse linears
    took 2-3% less time a pass at one thread)."""
    specs = [(p.shape, p.dtype) if isinstance(p, np.ndarray) else (p, np.dtype(np.uint8)) for p in parts]
    sizes = [int(np.prod(shape)) * dtype.itemsize for shape, dtype in specs]
    starts = np.concatenate([[0], np.cumsum([-(-size // 64) * 64 for size in sizes])])
    buffer = np.empty(int(starts[-1]), np.uint8)
    return [buffer[start:start + size].view(dtype).reshape(shape)
             for (shape, dtype), start, size in zip(specs, starts, sizes)]


def unpack_sparse(sparse: SparseWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense matrix of a SparseWeight into `out` ([n, k] contiguous, fp16 or fp32; a new fp16 one if None)."""
    n, k = sparse.shape
    out = torch.empty(n, k, dtype=torch.float16) if out is None else out
    if out.dtype not in (torch.float16, torch.float32) or tuple(out.shape) != (n, k) or not out.is_contiguous():
        raise ValueError(f"unpack_sparse writes a contiguous fp16/fp32 [{n}, {k}] tensor, got {out.dtype} "
                         f"{list(out.shape)}")
    f32 = out.dtype == torch.float32
    if native is not None:
        native.sparse_unpack(*sparse.arrays(), out.view(torch.int32 if f32 else torch.int16).numpy(), n, k, f32,
                             threads_for(n * k // 4))
        return out
    bitmaps = (sparse.codes >> 5 & 0xFF).astype(np.uint8)
    present = np.unpackbits(bitmaps, axis=1, count=k, bitorder="little").astype(bool)
    wide_groups = (sparse.codes >> 13 & 1).astype(bool)
    wide_value = np.repeat(wide_groups, 8, axis=1)[:, :k][present]
    offset = np.concatenate([[0], np.cumsum(1 + wide_value.astype(np.int64))[:-1]])
    values = sparse.values[offset + wide_value].astype(np.uint16) << 8
    values[wide_value] |= sparse.values[offset[wide_value]]
    dense = np.zeros((n, k), dtype=np.uint16)
    dense[present] = values
    out.copy_(torch.from_numpy(dense.view(np.int16)).view(torch.float16))
    return out


def sparse_linear(x: torch.Tensor, sparse: SparseWeight, bias: torch.Tensor | None = None,
                  scratch: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """x [..., k] fp32 @ W^T (+ bias) from the sparse layout, bit-identical to mixed_linear on the dense W.

    Few rows multiply straight from the layout; more rows unpack W as fp32 into `scratch()` (an fp32 [n, k]
    buffer) or a fresh one, then call torch's matmul, as mixed_linear does with its own fp32 copy.
    """
    n, k = sparse.shape
    rows = x.numel() // k
    if native is None or rows > gemv_max_rows(n * k) or x.dtype != torch.float32:
        dense = scratch() if scratch is not None else torch.empty(n, k, dtype=torch.float32)
        return F.linear(x, unpack_sparse(sparse, dense).to(x.dtype), bias)
    y = torch.empty(x.shape[:-1] + (n,), dtype=torch.float32)
    native.sparse_gemv(*sparse.arrays(), x.contiguous().numpy(), y.numpy(), n, k, rows, threads_for(n * k * rows))
    if bias is not None:
        y += bias
    return y
