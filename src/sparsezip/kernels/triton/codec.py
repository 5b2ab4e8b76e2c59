"""Triton kernels for compressed linear weights: a decode-only kernel and a fused decompress + matmul.

Why: at batch 1..16 a linear layer is bound by the bytes it reads. The fused kernel reads the
compressed tiles and multiplies them in registers, so the fp16 weight never exists in global memory.
Both codecs of sparsezip.codec have kernels: bitmap-v1 (id 1) and huff-v2 (id 2).

The device form of a stored weight (DeviceWeight, built and validated by prepare()) is in device_weight.py.

Work unit: a "strip" = rows r0..r0+BN (BN in 16..128) of TC consecutive tiles of one tile row. Each
tile of a strip becomes fp16 bit patterns [BN, 128] in registers: the presence bit comes from the
bitmap, the value's number is row_start + an in-row prefix sum of presence bits, and the value is
gathered by that number. bitmap-v1 reads the value's two bytes. huff-v2 first decodes the strip's
TC * BN/8 Huffman substreams in parallel lanes (one lane per 8-row group per tile, one symbol per
lane per step, through `lut`) into a per-program scratch buffer indexed by value number (registers
cannot be indexed by a lane's running position), ORs the E5M2 exception low bytes in, then gathers
symbol, sign bit and raw low byte by value number. Scratch is BN * 128 int16 per tile, in L1/L2.
  decode: grid (P,): program p decodes strips p, p + P, ... and stores them (int16, so NaN payloads
          survive); P = number of strips for bitmap-v1, about 8 per multiprocessor for huff-v2.
          Default strip: 64 rows x 1 tile (bitmap-v1) or x 2 tiles (huff-v2), 8 warps.
  linear: grid (tile rows * 128/BN, S): program (row block, split s) walks its share of the tile
          columns strip by strip, acc[BM, BN] += x[:, tile cols] @ tile.T via tl.dot (fp32
          accumulation), and stores its partial sum; the host adds the S partials (deterministic:
          no atomics) and rounds once to fp16. S (split-k) is chosen to give ~2 programs per SM.
          Default strip: 64 rows x 1 tile (bitmap-v1) or x 4 tiles (huff-v2), 8 warps.
Register use was checked by compiling for sm_90 without a GPU (triton.compile + ptxas -v): with the
defaults the linear kernels do not spill and the huff-v2 decode spills 24 bytes; 128-row blocks
spill more (16 warps leave 128 registers a thread).

Under TRITON_INTERPRET=1 (set before this module is imported) the same kernels run on the CPU with
numpy, which is how CI checks them against sparsezip.codec without a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ...codec.stream import describe
from ...errors import SparsezipError
from .device_weight import BITMAP, HUFF, KERNEL_CODECS, TILE, DeviceWeight, prepare  # noqa: F401  (the API)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the module still imports, available() says False
    triton = None
    tl = SimpleNamespace(constexpr=int)  # only read by the kernel signatures below, which never run

    def _jit(fn):  # noqa: ANN001, ANN202 - stand-in for triton.jit when triton is absent
        return fn
else:
    _jit = triton.jit

MAX_FUSED_M = 16  # default: rows of x the fused kernel takes; larger batches decode once and use cuBLAS


# ---------------------------------------------------------------------------- device side
# Kernels call only builtins of triton.language plus jit functions from this file, never the jit'd
# helpers of triton's standard library (tl.cumsum, tl.sum, tl.zeros, ...): those are built interpreted
# or compiled once, when triton is imported, so avoiding them lets an interpreted copy of this module
# (tests/test_triton.py) run in a process where triton was first imported for the GPU. (Passing
# tl.standard._sum_combine to a scan is fine: the interpreter only compares it, never calls it.)


@_jit
def _cumsum(x, axis: tl.constexpr):
    """Inclusive prefix sum. Triton's own sum combiner is named (not tl.cumsum) because the interpreter
    recognises it and runs numpy's cumsum instead of calling a Python combiner per element."""
    return tl.associative_scan(x, axis, tl.standard._sum_combine)


@_jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@_jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@_jit
def _u16(ptr, mask):
    """Little-endian u16 (as int32) at any byte address: two byte loads, as fields are unaligned."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.int32)
    return (hi << 8) | lo


@_jit
def _presence(payload, bm_base, row_bytes, r, rows, cols):
    """Presence bits (int32 0/1) [BN, 128] of tile rows r, from a bitmap of row_bytes per row at bm_base."""
    c = tl.arange(0, 128)
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    # Eight neighbouring lanes read the same bitmap byte: one memory transaction, no shuffles.
    byte = tl.load(payload + bm_base + r[:, None] * row_bytes + (c[None, :] >> 3), mask=inside, other=0)
    return (byte.to(tl.int32) >> (c[None, :] & 7)) & 1


@_jit
def _value_index(row_start, t, r, rows, present):
    """Index [BN, 128] of each present element among its tile's present values (row-major order)."""
    first = tl.load(row_start + t * 128 + r, mask=r < rows, other=0).to(tl.int32)  # [BN]
    return first[:, None] + _cumsum(present, 1) - present


@_jit
def _row_first(row_start, nnz, t, rr, rows):
    """Number of the first value of tile row(s) rr of tile(s) t; nnz (one past the last) from `rows` on."""
    inside = rr + 0 * t < rows  # shaped like t and rr together: the interpreter cannot broadcast bool masks
    return tl.where(inside, tl.load(row_start + t * 128 + rr, mask=inside, other=0).to(tl.int32), nnz)


@_jit
def _bitmap_block(payload, tile_off, row_start, t, r0, rows, cols, BN: tl.constexpr):
    """bitmap-v1: fp16 bit patterns (int32 0..65535) [BN, 128] of tile t's rows r0..; 0 outside the tile."""
    r = r0 + tl.arange(0, BN)
    row_bytes = (cols + 7) // 8
    base = tl.load(tile_off + t)  # int64: payloads may exceed 2 GiB
    present = _presence(payload, base, row_bytes, r, rows, cols)
    at = payload + base + rows * row_bytes + 2 * _value_index(row_start, t, r, rows, present)
    return _u16(at, present != 0)


@_jit
def _huff_symbols(payload, tile_off, row_start, tile_nnz, lut, scratch, t0, n_t, tc0, r0, rows, k,
                  BN: tl.constexpr, TC: tl.constexpr):
    """huff-v2 phase 1 for rows r0..r0+BN of tiles t0..t0+n_t-1 (tile columns tc0..; n_t <= TC).

    Lanes = TC * BN/8 substreams (one per 8-row group per tile), all decoded in lock-step, one
    symbol per lane per step, as `symbol << 8` into scratch slot s (BN * 128 int16 for tile t0 + s)
    at the value's number within the block: registers cannot be indexed by a lane's running
    position, memory can. More tiles per step = more lanes sharing each step's latency.
    """
    lane = tl.arange(0, TC * (BN // 8))
    slot = lane // (BN // 8)
    ok = slot < n_t
    slot = tl.where(ok, slot, 0)  # lanes past the last tile read tile t0's fields and decode nothing
    t = t0 + slot
    g = r0 // 8 + lane % (BN // 8)  # row group = substream number within the tile
    base = tl.load(tile_off + t)
    nnz = tl.load(tile_nnz + t)
    groups = (rows + 7) // 8
    row_bytes = (tl.minimum(k - (tc0 + slot) * 128, 128) + 7) // 8
    subs = base + 4 + 2 * groups + rows * row_bytes + (nnz + 7) // 8  # header, bitmap, signs, substreams
    h = tl.arange(0, 16)
    sub_len = _u16(payload + base[:, None] + 4 + 2 * h[None, :], (h[None, :] < groups) & ok[:, None])
    start = tl.where(ok, subs + _sum(tl.where(h[None, :] < g[:, None], sub_len, 0), 1), 0)
    block_first = _row_first(row_start, nnz, t, r0, rows)
    first = _row_first(row_start, nnz, t, 8 * g, rows) - block_first
    count = tl.where(ok, _row_first(row_start, nnz, t, 8 * g + 8, rows) - block_first - first, 0)
    dest = scratch + slot * (BN * 128) + first
    bit = start * 8  # [lanes] cursor, MSB-first
    tl.debug_barrier()  # the previous strip's readers are done with scratch
    for j in range(0, _max(count, 0)):
        live = j < count
        # Peek 12 bits (the longest code) from 3 bytes. No masks: a finished lane stays at its end,
        # so at most 2 bytes past a substream are read, and prepare() pads the payload's end.
        at = payload + (bit >> 3)
        window = (tl.load(at).to(tl.int32) << 16) | (tl.load(at + 1).to(tl.int32) << 8)
        window |= tl.load(at + 2).to(tl.int32)
        entry = tl.load(lut + ((window >> (12 - (bit & 7)).to(tl.int32)) & 0xFFF))  # length << 8 | symbol
        tl.store(dest + j, (entry & 0x7F) << 8, mask=live)
        bit += tl.where(live, entry >> 8, 0)
    tl.debug_barrier()


@_jit
def _huff_block(payload, tile_off, row_start, tile_nnz, scratch, t, r0, rows, cols, BN: tl.constexpr):
    """huff-v2 phases 2-3: bit patterns (int32) [BN, 128] of tile t's rows r0.., whose symbols are in
    `scratch` (this tile's slot); 0 outside the tile. cols = 0 yields zeros."""
    base = tl.load(tile_off + t)
    nnz = tl.load(tile_nnz + t)
    groups = (rows + 7) // 8
    row_bytes = (cols + 7) // 8
    mode = tl.load(payload + base).to(tl.int32)
    bm = base + 4 + 2 * groups
    signs = bm + rows * row_bytes
    h = tl.arange(0, 16)
    lows = signs + (nnz + 7) // 8 + _sum(_u16(payload + base + 4 + 2 * h, h < groups), 0)
    block_first = _row_first(row_start, nnz, t, r0, rows)

    if (mode == 1) & (cols > 0):  # E5M2 tile: low bytes are 0 but for a sorted exception list
        n_exc = _u16(payload + base + 2, mode == 1)
        block_count = _row_first(row_start, nnz, t, r0 + BN, rows) - block_first
        for e0 in range(0, n_exc, 128):
            e = e0 + tl.arange(0, 128)
            pos = _u16(payload + lows + 2 * e, e < n_exc) - block_first
            mine = (e < n_exc) & (pos >= 0) & (pos < block_count)
            low = tl.load(payload + lows + 2 * n_exc + e, mask=mine, other=0).to(tl.int16)
            tl.store(scratch + pos, tl.load(scratch + pos, mask=mine, other=0) | low, mask=mine)
        tl.debug_barrier()

    r = r0 + tl.arange(0, BN)
    present = _presence(payload, bm, row_bytes, r, rows, cols)
    i = _value_index(row_start, t, r, rows, present)  # [BN, 128] value number within the tile
    on = present != 0
    high = tl.load(scratch + i - block_first, mask=on, other=0).to(tl.int32)
    sign = (tl.load(payload + signs + (i >> 3), mask=on, other=0).to(tl.int32) >> (i & 7)) & 1
    raw = (on & (mode == 0)) != 0  # "!= 0": the interpreter turns tensor & scalar-bool into int32
    low = tl.load(payload + lows + i, mask=raw, other=0).to(tl.int32)
    return (sign << 15) | high | low


@_jit
def _strip_start(payload, tile_off, row_start, tile_nnz, lut, scratch, tr, r0, rows, tc0, tc_end, n_tc, k,
                 BN: tl.constexpr, TC: tl.constexpr, CODEC: tl.constexpr):
    """Work shared by the TC tiles of a strip (tile columns tc0..tc0+TC-1, rows r0..r0+BN of tile row tr)
    before any of them is placed: huff-v2 decodes their symbols; bitmap-v1 has nothing to do."""
    if CODEC == 2:
        _huff_symbols(payload, tile_off, row_start, tile_nnz, lut, scratch, tr * n_tc + tc0,
                      tl.minimum(tc_end - tc0, TC), tc0, r0, rows, k, BN, TC)


@_jit
def _strip_tile(payload, tile_off, row_start, tile_nnz, scratch, tr, r0, rows, tc0, s, tc_end, n_tc, k,
                BN: tl.constexpr, CODEC: tl.constexpr):
    """Bit patterns [BN, 128] of tile column tc0 + s of a strip, and its width (0 past tc_end)."""
    tl.static_assert((CODEC == 1) or (CODEC == 2), "no kernel for this codec id")
    tc = tc0 + s
    cols = tl.where(tc < tc_end, tl.minimum(k - tc * 128, 128), 0)
    t = tr * n_tc + tl.minimum(tc, tc_end - 1)  # past the end: a real tile, fully masked by cols = 0
    if CODEC == 1:
        bits = _bitmap_block(payload, tile_off, row_start, t, r0, rows, cols, BN)
    else:
        bits = _huff_block(payload, tile_off, row_start, tile_nnz, scratch + s * (BN * 128), t, r0, rows, cols,
                           BN)
    return bits, cols


@_jit
def _decode_kernel(payload, tile_off, row_start, tile_nnz, lut, scratch, out, n, k, n_tc, n_strips,
                   BN: tl.constexpr, TC: tl.constexpr, CODEC: tl.constexpr):
    """out int16 [n, k] = bit patterns of the decoded weight. A strip is BN rows x TC tiles of one tile
    row; program p decodes strips p, p + P, ... (P: one program per strip, or fewer when each needs
    scratch memory)."""
    pid = tl.program_id(0)
    my_scratch = scratch + pid * (TC * BN * 128)
    chunks = (n_tc + TC - 1) // TC
    c = tl.arange(0, 128)
    for strip in range(pid, n_strips, tl.num_programs(0)):
        tr = tl.cast(strip // ((128 // BN) * chunks), tl.int64)
        r0 = (strip // chunks) % (128 // BN) * BN  # first tile-local row
        tc0 = strip % chunks * TC
        rows = tl.minimum(n - tr * 128, 128)
        r = r0 + tl.arange(0, BN)
        _strip_start(payload, tile_off, row_start, tile_nnz, lut, my_scratch, tr, r0, rows, tc0, n_tc, n_tc, k,
                     BN, TC, CODEC)
        for s in tl.static_range(TC):
            bits, cols = _strip_tile(payload, tile_off, row_start, tile_nnz, my_scratch, tr, r0, rows, tc0, s,
                                     n_tc, n_tc, k, BN, CODEC)
            ptrs = out + (tr * 128 + r)[:, None] * k + (tc0 + s) * 128 + c[None, :]
            tl.store(ptrs, bits.to(tl.int16), mask=(r[:, None] < rows) & (c[None, :] < cols))


@_jit
def _linear_kernel(
    x, part, payload, tile_off, row_start, tile_nnz, lut, scratch, M, n, k, n_tc, tiles_per_split,
    BM: tl.constexpr, BN: tl.constexpr, TC: tl.constexpr, CODEC: tl.constexpr,
):
    """part fp32 [S, M, n]: split s's share of x @ W.T, decoding W strip by strip in registers."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    my_scratch = scratch + (pid * tl.num_programs(1) + split) * (TC * BN * 128)
    tr = tl.cast(pid // (128 // BN), tl.int64)
    r0 = (pid % (128 // BN)) * BN  # tile-local rows r0.. = output features tr*128 + r0..
    rows = tl.minimum(n - tr * 128, 128)
    m = tl.arange(0, BM)
    c = tl.arange(0, 128)
    acc = tl.full((BM, BN), 0.0, dtype=tl.float32)
    tc_end = tl.minimum(split * tiles_per_split + tiles_per_split, n_tc)
    for tc0 in range(split * tiles_per_split, tc_end, TC):
        _strip_start(payload, tile_off, row_start, tile_nnz, lut, my_scratch, tr, r0, rows, tc0, tc_end, n_tc, k,
                     BN, TC, CODEC)
        for s in tl.static_range(TC):
            bits, cols = _strip_tile(payload, tile_off, row_start, tile_nnz, my_scratch, tr, r0, rows, tc0, s,
                                     tc_end, n_tc, k, BN, CODEC)
            w = bits.to(tl.int16).to(tl.float16, bitcast=True)  # [BN, 128]
            xs = tl.load(x + m[:, None] * k + (tc0 + s) * 128 + c[None, :],
                         mask=(m[:, None] < M) & (c[None, :] < cols), other=0.0)  # [BM, 128]
            acc += tl.dot(xs, tl.trans(w))  # [BM, BN], fp32 accumulation; masked columns are 0 in both
    r = r0 + tl.arange(0, BN)
    ptrs = part + split * M * n + m[:, None] * n + tr * 128 + r[None, :]
    tl.store(ptrs, acc, mask=(m[:, None] < M) & (r[None, :] < rows))


# ---------------------------------------------------------------------------- host side


def available(device: torch.device | str) -> bool:
    """True when the kernels can run for tensors on `device`: triton is importable and either the
    device is a CUDA GPU or this module was imported under TRITON_INTERPRET=1 (numpy on the host)."""
    if triton is None:
        return False
    if interpreted():
        return True
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def interpreted() -> bool:
    """Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import time)."""
    return triton is not None and not isinstance(_decode_kernel, triton.runtime.JITFunction)


def decode(dw: DeviceWeight, block_rows: int = 64, tile_cols: int | None = None) -> torch.Tensor:
    """Decompress to fp16 [n, k] on dw's device, bit for bit equal to sparsezip.codec.decode.

    A program decodes strips of block_rows rows x tile_cols tiles (defaults: half a tile for
    bitmap-v1; for huff-v2 half of 2 tiles, i.e. 16 substream lanes per step): about the largest
    that compile for sm_90 without register spills (ptxas -v, 8 warps).
    """
    tc = _tiles_per_step(dw, block_rows, tile_cols, lanes=16)
    out = torch.empty((dw.n, dw.k), dtype=torch.int16, device=dw.device)  # int16: NaN payloads stay exact
    n_tr, n_tc = dw.tile_grid
    n_strips = n_tr * (TILE // block_rows) * -(-n_tc // tc)
    programs = n_strips if dw.codec_id == BITMAP else min(n_strips, _scratch_programs(dw.device))
    _decode_kernel[(programs,)](
        *dw.tables(), _scratch(dw, programs * tc * block_rows), out, dw.n, dw.k, n_tc, n_strips,
        BN=block_rows, TC=tc, CODEC=dw.codec_id, num_warps=_warps(block_rows),
    )
    return out.view(torch.float16)


def linear(
    x: torch.Tensor,
    dw: DeviceWeight,
    split_k: int | None = None,
    block_rows: int = 64,
    tile_cols: int | None = None,
    max_fused_m: int = MAX_FUSED_M,
) -> torch.Tensor:
    """y = x @ W.T for fp16 x [..., k], without materialising W when x has at most max_fused_m rows.

    split_k: how many programs share one row block's tile columns (default: enough programs to fill
    the GPU). tile_cols: tiles a program takes per step (huff-v2: their substreams decode together;
    default 4 tiles of 64 rows = 32 lanes, which compiles for sm_90 without register spills).
    Larger batches decode W once and call torch (cuBLAS): there the matmul, not the weight read, is
    the cost. max_fused_m (<= 64) moves that threshold, e.g. for benchmarks.
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float16 or x.dim() < 1 or x.shape[-1] != dw.k:
        raise SparsezipError(f"x must be a float16 tensor [..., {dw.k}], got {describe(x)}")
    if x.device != dw.device:
        raise SparsezipError(f"x is on {x.device} but the weight is on {dw.device}")
    tc = _tiles_per_step(dw, block_rows, tile_cols, lanes=32)
    if not 1 <= max_fused_m <= 64:
        raise SparsezipError(f"max_fused_m must be in 1..64, got {max_fused_m}")
    x2 = x.reshape(-1, dw.k)  # [M, k]
    m = x2.shape[0]
    if m == 0 or m > max_fused_m:
        return F.linear(x, decode(dw))
    n_tr, n_tc = dw.tile_grid
    row_programs = n_tr * (TILE // block_rows)
    splits = split_k if split_k is not None else _default_splits(dw.device, row_programs, n_tc)
    if not 1 <= splits <= n_tc:
        raise SparsezipError(f"split_k must be in 1..{n_tc} (tile columns), got {splits}")
    per_split = -(-n_tc // splits)
    splits = -(-n_tc // per_split)  # no split left without tiles
    part = torch.empty((splits, m, dw.n), dtype=torch.float32, device=dw.device)
    _linear_kernel[(row_programs, splits)](
        x2.contiguous(), part, *dw.tables(), _scratch(dw, row_programs * splits * tc * block_rows),
        m, dw.n, dw.k, n_tc, per_split, BM=max(16, 1 << (m - 1).bit_length()), BN=block_rows, TC=tc,
        CODEC=dw.codec_id, num_warps=_warps(block_rows),
    )
    y = part[0] if splits == 1 else part.sum(0)  # [M, n] fp32
    return y.to(torch.float16).reshape(*x.shape[:-1], dw.n)


def _tiles_per_step(dw: DeviceWeight, block_rows: int, tile_cols: int | None, lanes: int) -> int:
    """Validate block_rows / tile_cols; default tile_cols: 1 for bitmap-v1 (no shared work), else
    enough tiles for `lanes` huff-v2 substream lanes (block_rows / 8 per tile)."""
    if block_rows not in (16, 32, 64, 128):
        raise SparsezipError(f"block_rows must be 16, 32, 64 or 128 (a divisor of the tile), got {block_rows}")
    if tile_cols is None:
        return 1 if dw.codec_id == BITMAP else max(1, lanes // (block_rows // 8))
    if tile_cols not in (1, 2, 4, 8):
        raise SparsezipError(f"tile_cols must be 1, 2, 4 or 8, got {tile_cols}")
    return tile_cols


def _warps(block_rows: int) -> int:
    """Warps per program: about 32 of a block's block_rows x 128 elements per thread (more spills)."""
    return max(4, block_rows // 8)


def _default_splits(device: torch.device, row_programs: int, n_tc: int) -> int:
    """Split the tile columns until there are about two programs per GPU multiprocessor."""
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: more of them only cost time
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tc, -(-2 * sms // row_programs)))


def _scratch_programs(device: torch.device) -> int:
    """Programs for a huff-v2 decode: each owns scratch, so launch about as many as run at once (then
    loop) instead of one per strip."""
    if device.type != "cuda":
        return 64
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count


def _scratch(dw: DeviceWeight, rows: int) -> torch.Tensor:
    """huff-v2 symbol scratch: `rows` tile rows of 128 int16 (bitmap-v1 needs none: 1 element)."""
    return torch.empty(rows * TILE if dw.codec_id == HUFF else 1, dtype=torch.int16, device=dw.device)
