"""Products with weights that stay fp16 (dense, or in a sparse layout) while CPU activations are fp32.

A CPU decode step is bound by the bytes of weight it reads; fp16 weights read half the bytes of an fp32
copy. Few activation rows (decode steps, small batches; short prompts on large weights) go to the native fp16
GEMV (native/gemv.c), which accumulates in fp32; more rows (a prefill, an evaluation window) convert the weight
to fp32 for torch's matmul, where the arithmetic, not the bytes, is the cost. Without the extension everything
takes that path.

`SparseWeight` holds a pruned fp16 matrix as a bitmap plus its nonzero values -- for E5M2-valued weights one
byte per value, two in the groups that hold an exception -- and `sparse_linear` multiplies from it, expanding in
registers: at 50% sparsity 5 bits per weight (pure E5M2 values) to 9 (fp16 values) instead of 16, and the same
results as the dense fp16 GEMV.
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


VALUE_PAD = 64  # bytes readable past the last value (the AVX-512 walk loads 64 at a time); native/gemv.c's
TILE = 128  # the summation order's unit: native/spz.h's SPZ_TILE, the codec's tile edge (a test holds all three equal)
CHUNK_TILES = 4  # tiles whose groups the layout interleaves: native/gemv.c's
GROUPS_PER_TILE = TILE // 8
WIDE_SHIFT = 48  # chunk_start bit 48 + g: the chunk's groups g store 2 bytes per value
PACK_VALUES = 2**22  # matrix entries per block of rows while packing: bounds the temporaries


@dataclass(frozen=True, eq=False)
class SparseWeight:
    """An fp16 matrix [n, k] as the bitmap of its nonzero entries (bit patterns != 0) and their values. Each row
    goes in chunks of CHUNK_TILES tiles (512 columns; the last chunk holds the rest), and a chunk interleaves its
    tiles' groups of 8 columns: group 0 of each tile, then group 1 of each, and so on, as the kernels take them
    (one accumulator per tile, the shared summation order). codes holds one bitmap byte per group in that order
    (LSB = the group's first column; 16 per tile, 0 past the matrix's columns), values the groups' nonzero values
    in that order. The groups g of a chunk's tiles (a chunk group) store one byte per value (the high byte) when
    all their values have a low byte of 0 (E5M2 values, as after L2 rounding), else two (the fp16 pattern). So one
    32-bit load gives the bitmaps of a whole chunk group and one 64-byte load its values, which AVX-512 expands in
    one instruction.
    Row r's values are values[row_start[r]:row_start[r+1]]; chunk c's start chunk_start[r, c] & (2**48 - 1) bytes
    in, and bit WIDE_SHIFT + g of chunk_start[r, c] says its chunk group g is wide. A runtime layout built by
    pack_sparse (the byte layout is native/gemv.c's), not a file format; the arrays are read-only.
    """

    shape: tuple[int, int]
    codes: np.ndarray  # uint8 [n, 16 * ceil(k / 128)]: each chunk's bitmap bytes, group-major
    values: np.ndarray  # uint8 [row_start[n] + VALUE_PAD]
    row_start: np.ndarray  # int64 [n + 1]
    chunk_start: np.ndarray  # uint64 [n, ceil(k / 512)]: where each chunk's values start | wide groups << 48

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.codes, self.values, self.row_start, self.chunk_start


def chunk_order(k: int) -> tuple[np.ndarray, np.ndarray]:
    """The layout's column order over the whole tiles' columns (past k included), and each position's chunk group
    (chunk * 16 + g): position p holds column order[p]; chunk c takes positions [512 c, 512 c + 128 * its tiles)."""
    tiles = -(-k // TILE)
    order, group_of = [], []
    for t0 in range(0, tiles, CHUNK_TILES):
        nt = min(CHUNK_TILES, tiles - t0)
        group, tile, col = np.meshgrid(np.arange(GROUPS_PER_TILE), np.arange(nt), np.arange(8), indexing="ij")
        order.append(((t0 + tile) * TILE + 8 * group + col).reshape(-1))  # [group][tile][column]
        group_of.append((t0 // CHUNK_TILES * GROUPS_PER_TILE + group).reshape(-1))
    return np.concatenate(order), np.concatenate(group_of)


def pack_sparse(weight: torch.Tensor) -> SparseWeight:
    """The sparse layout of a CPU fp16 matrix (vectorised numpy, a loop over blocks of rows only)."""
    if weight.dtype != torch.float16 or weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"pack_sparse takes a 2-D CPU float16 tensor, got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    bits = weight.contiguous().view(torch.int16).numpy().view(np.uint16)
    tiles = -(-k // TILE)
    chunks = -(-tiles // CHUNK_TILES)
    order, group_of = chunk_order(k)
    group_first = np.flatnonzero(np.diff(group_of, prepend=-1))  # each chunk group's first position
    chunk_first = np.arange(0, len(order), CHUNK_TILES * TILE)  # each chunk's first position
    codes = np.empty((n, tiles * GROUPS_PER_TILE), np.uint8)
    chunk_bytes = np.empty((n, chunks), np.int64)
    wide_bits = np.empty((n, chunks), np.uint64)
    streams = []
    step = max(1, PACK_VALUES // k)
    for r0 in range(0, n, step):  # bounds the per-entry temporaries to one block of rows
        block = np.zeros((min(step, n - r0), tiles * TILE), np.uint16)
        block[:, :k] = bits[r0:r0 + step]
        ordered = block[:, order]
        present = ordered != 0
        codes[r0:r0 + step] = np.packbits(present, axis=1, bitorder="little")
        low_used = (present & ((ordered & 0xFF) != 0)).astype(np.uint8)
        wide = np.add.reduceat(low_used, group_first, axis=1) > 0  # [rows, chunk groups]: any low byte in use
        wide_bits[r0:r0 + step] = (wide.reshape(len(block), chunks, GROUPS_PER_TILE).astype(np.uint64)
                                   << np.arange(WIDE_SHIFT, WIDE_SHIFT + GROUPS_PER_TILE, dtype=np.uint64)).sum(
                                       2, dtype=np.uint64)
        wide_position = wide[:, group_of]
        width = present * (1 + wide_position)  # bytes per position
        chunk_bytes[r0:r0 + step] = np.add.reduceat(width, chunk_first, axis=1)
        wide_value = wide_position[present]  # per value in row-major layout order
        offset = np.concatenate([[0], np.cumsum(1 + wide_value.astype(np.int64))[:-1]])
        stream = np.zeros(int(width.sum()), np.uint8)
        values = ordered[present]
        stream[offset + wide_value] = values >> 8  # the high byte: first of one, second of two (little-endian)
        stream[offset[wide_value]] = values[wide_value] & 0xFF
        streams.append(stream)
    row_start = np.concatenate([[0], np.cumsum(chunk_bytes.sum(1))]).astype(np.int64)
    chunk_start = (np.cumsum(chunk_bytes, axis=1) - chunk_bytes).astype(np.uint64) | wide_bits
    held = one_buffer([codes, (int(row_start[-1]) + VALUE_PAD,), row_start, chunk_start])
    held_codes, values, held_row_start, held_chunk_start = held
    held_codes[...], held_row_start[...], held_chunk_start[...] = codes, row_start, chunk_start
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
    order, group_of = chunk_order(k)
    present = np.unpackbits(sparse.codes, axis=1, bitorder="little").astype(bool)
    chunk, g = np.divmod(group_of, GROUPS_PER_TILE)
    wide_position = ((sparse.chunk_start[:, chunk] >> (WIDE_SHIFT + g).astype(np.uint64)) & 1) == 1
    wide_value = wide_position[present]
    offset = np.concatenate([[0], np.cumsum(1 + wide_value.astype(np.int64))[:-1]])
    values = sparse.values[offset + wide_value].astype(np.uint16) << 8
    values[wide_value] |= sparse.values[offset[wide_value]]
    ordered = np.zeros((n, len(order)), dtype=np.uint16)
    ordered[present] = values
    dense = np.zeros((n, len(order)), dtype=np.uint16)
    dense[:, order] = ordered
    dense = np.ascontiguousarray(dense[:, :k])
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
