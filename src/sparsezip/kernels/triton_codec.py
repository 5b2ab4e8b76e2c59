"""Triton kernels for compressed linear weights: a decode-only kernel and a fused decompress + matmul.

Why: at batch 1..16 a linear layer is bound by the bytes it reads. The fused kernel reads the
compressed tiles and multiplies them in registers, so the fp16 weight never exists in global memory.

Device form of one stored weight (built once by prepare(), which validates everything on the host):
  payload    uint8 [P]       the stored stream without its 24-byte header (index offsets are relative to it)
  tile_off   int64 [T]       byte offset of each tile in the payload (the .index tensor)
  row_start  int16 [T, 128]  index, among its tile's present values, of each tile row's first value: a
                             host-side prefix sum of bitmap popcounts, so that any block of rows decodes
                             without reading the rows above it

Kernels work on "blocks": BN consecutive rows (BN divides 128) of one 128 x 128 tile. A block decodes
to fp16 bit patterns [BN, 128] in registers: each element's presence bit comes from the bitmap, its
value index is row_start + an in-row prefix sum of presence bits (a scan), and the value is then
gathered from the payload.
  decode: grid (T * 128/BN,): one program per block (BN = 128: one program per tile) stores its block.
  linear: grid (tile rows * 128/BN, S): program (row block, split s) walks its share of the tile columns,
          acc[BM, BN] += x[:, tile cols] @ block.T via tl.dot (fp32 accumulation), and stores its partial
          sum; the host adds the S partials (deterministic: no atomics) and rounds once to fp16.

Under TRITON_INTERPRET=1 (set before this module is imported) the same kernels run on the CPU with
numpy, which is how CI checks them against sparsezip.codec without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from .. import codec
from ..errors import SparsezipError

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

TILE = codec.TILE  # 128: kernels hard-code tl.arange(0, 128) for the tile width
MAX_FUSED_M = 16  # rows of x the fused kernel takes; larger batches decode once and use cuBLAS
BITMAP = 1  # codec ids with a kernel here
KERNEL_CODECS = (BITMAP,)


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
def _bitmap_block(payload, tile_off, row_start, t, r, rows, cols):
    """bitmap-v1: fp16 bit patterns (int32 0..65535) [BN, 128] of tile t's rows r; 0 outside the tile."""
    row_bytes = (cols + 7) // 8
    base = tl.load(tile_off + t)  # int64: payloads may exceed 2 GiB
    present = _presence(payload, base, row_bytes, r, rows, cols)
    at = payload + base + rows * row_bytes + 2 * _value_index(row_start, t, r, rows, present)
    # Values are little-endian u16 at any byte alignment (bitmaps have odd lengths), so two byte loads.
    lo = tl.load(at, mask=present != 0, other=0).to(tl.int32)
    hi = tl.load(at + 1, mask=present != 0, other=0).to(tl.int32)
    return (hi << 8) | lo


@_jit
def _block(payload, tile_off, row_start, t, r, rows, cols, CODEC: tl.constexpr):
    """Bit patterns [BN, 128] of one block, for the codec chosen at compile time."""
    tl.static_assert(CODEC == 1, "no kernel for this codec id")
    return _bitmap_block(payload, tile_off, row_start, t, r, rows, cols)


@_jit
def _decode_kernel(payload, tile_off, row_start, out, n, k, n_tc, BN: tl.constexpr, CODEC: tl.constexpr):
    """out int16 [n, k] = bit patterns of the decoded weight; one program per BN-row block of a tile."""
    pid = tl.program_id(0)
    t = (pid // (128 // BN)).to(tl.int64)
    tr = t // n_tc
    tc = t % n_tc
    rows = tl.minimum(n - tr * 128, 128)
    cols = tl.minimum(k - tc * 128, 128)
    r = (pid % (128 // BN)) * BN + tl.arange(0, BN)  # tile-local rows
    c = tl.arange(0, 128)
    bits = _block(payload, tile_off, row_start, t, r, rows, cols, CODEC)
    ptrs = out + (tr * 128 + r)[:, None] * k + tc * 128 + c[None, :]
    tl.store(ptrs, bits.to(tl.int16), mask=(r[:, None] < rows) & (c[None, :] < cols))


@_jit
def _linear_kernel(
    x, part, payload, tile_off, row_start, M, n, k, n_tc, tiles_per_split,
    BM: tl.constexpr, BN: tl.constexpr, CODEC: tl.constexpr,
):
    """part fp32 [S, M, n]: split s's share of x @ W.T, decoding W block by block in registers."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tr = (pid // (128 // BN)).to(tl.int64)
    r = (pid % (128 // BN)) * BN + tl.arange(0, BN)  # tile-local rows = output features tr*128 + r
    rows = tl.minimum(n - tr * 128, 128)
    m = tl.arange(0, BM)
    c = tl.arange(0, 128)
    acc = tl.full((BM, BN), 0.0, dtype=tl.float32)
    tc_end = tl.minimum(split * tiles_per_split + tiles_per_split, n_tc)
    for tc in range(split * tiles_per_split, tc_end):
        cols = tl.minimum(k - tc * 128, 128)
        bits = _block(payload, tile_off, row_start, tr * n_tc + tc, r, rows, cols, CODEC)
        w = bits.to(tl.int16).to(tl.float16, bitcast=True)  # [BN, 128]
        xs = tl.load(x + m[:, None] * k + tc * 128 + c[None, :], mask=(m[:, None] < M) & (c[None, :] < cols),
                     other=0.0)  # [BM, 128]; masked columns are 0 in both operands
        acc += tl.dot(xs, tl.trans(w))  # [BM, BN], fp32 accumulation
    ptrs = part + split * M * n + m[:, None] * n + tr * 128 + r[None, :]
    tl.store(ptrs, acc, mask=(m[:, None] < M) & (r[None, :] < rows))


# ---------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class DeviceWeight:
    """One compressed weight [n, k] on its device, validated and ready for the kernels."""

    codec_id: int
    n: int  # out_features
    k: int  # in_features
    payload: torch.Tensor  # uint8 [P]
    tile_off: torch.Tensor  # int64 [T]
    row_start: torch.Tensor  # int16 [T, 128]

    @property
    def device(self) -> torch.device:
        return self.payload.device

    @property
    def tile_grid(self) -> tuple[int, int]:
        """(tile rows, tile columns)."""
        return -(-self.n // TILE), -(-self.k // TILE)

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read for the whole weight: payload plus tables."""
        return sum(t.numel() * t.element_size() for t in (self.payload, self.tile_off, self.row_start))


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


def prepare(
    weight: torch.Tensor, index: torch.Tensor, info: torch.Tensor, device: torch.device | str
) -> DeviceWeight:
    """Validate one stored weight (.weight, .index, .info) on the host and move it to `device`.

    Checks the header, CRC, index and every tile's bitmap against its size, so the kernels only ever
    see consistent data. Raises SparsezipError for anything corrupt or for a codec without a kernel.
    """
    n, k, codec_id = codec._parse_info(info)
    name = codec.codec_for_id(codec_id).name  # unknown ids fail here with the list of known codecs
    if codec_id not in KERNEL_CODECS:
        raise SparsezipError(f"codec {name!r} (id {codec_id}) has no Triton kernel; use the torch reference decode")
    payload = codec._read_stream(weight, codec_id, check_crc=True)  # uint8 [P]
    grid = codec._Grid.of(n, k)
    offsets = codec._read_index(index, grid.count, len(payload))  # int64 [T]
    row_start = _bitmap_tables(payload, offsets, grid)

    def move(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    return DeviceWeight(codec_id, n, k, move(payload), move(offsets), move(row_start))


def decode(dw: DeviceWeight, block_rows: int = TILE) -> torch.Tensor:
    """Decompress to fp16 [n, k] on dw's device, bit for bit equal to sparsezip.codec.decode."""
    _check_block_rows(block_rows)
    out = torch.empty((dw.n, dw.k), dtype=torch.int16, device=dw.device)  # int16: NaN payloads stay exact
    n_tr, n_tc = dw.tile_grid
    _decode_kernel[(n_tr * n_tc * (TILE // block_rows),)](
        dw.payload, dw.tile_off, dw.row_start, out, dw.n, dw.k, n_tc, BN=block_rows, CODEC=dw.codec_id
    )
    return out.view(torch.float16)


def linear(x: torch.Tensor, dw: DeviceWeight, split_k: int | None = None, block_rows: int = 64) -> torch.Tensor:
    """y = x @ W.T for fp16 x [..., k], without materialising W when x has at most 16 rows.

    split_k: how many programs share one row block's tile columns (default: enough programs to fill
    the GPU). Larger batches decode W once and call torch (cuBLAS), which is then compute-bound anyway.
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float16 or x.dim() < 1 or x.shape[-1] != dw.k:
        raise SparsezipError(f"x must be a float16 tensor [..., {dw.k}], got {codec._describe(x)}")
    _check_block_rows(block_rows)
    x2 = x.reshape(-1, dw.k)  # [M, k]
    m = x2.shape[0]
    if m == 0 or m > MAX_FUSED_M:
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
        x2.contiguous(), part, dw.payload, dw.tile_off, dw.row_start, m, dw.n, dw.k, n_tc, per_split,
        BM=16, BN=block_rows, CODEC=dw.codec_id,
    )
    y = part[0] if splits == 1 else part.sum(0)  # [M, n] fp32
    return y.to(torch.float16).reshape(*x.shape[:-1], dw.n)


def _check_block_rows(block_rows: int) -> None:
    if block_rows not in (16, 32, 64, 128):
        raise SparsezipError(f"block_rows must be 16, 32, 64 or 128 (a divisor of the tile), got {block_rows}")


def _default_splits(device: torch.device, row_programs: int, n_tc: int) -> int:
    """Split the tile columns until there are about two programs per GPU multiprocessor."""
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: more of them only cost time
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tc, -(-2 * sms // row_programs)))


def _bitmap_tables(payload: np.ndarray, offsets: np.ndarray, grid: codec._Grid) -> np.ndarray:
    """bitmap-v1: check every tile's span against its bitmap; return row_start int16 [T, 128]."""
    bm_len = grid.bitmap_bytes()  # [T]
    sizes = np.append(offsets[1:], len(payload)) - offsets  # [T]
    if offsets[0] != 0:
        raise SparsezipError(f"index offsets do not match the stream: tile 0 starts at {offsets[0]}, not 0")
    _first_bad(sizes < bm_len, lambda t: f"tile {t} spans {sizes[t]} bytes, less than its {bm_len[t]}-byte bitmap")
    bitmap = _gather_bitmaps(payload, offsets, grid)  # [n_tr, n_tc, 128, 16]
    counts = np.bitwise_count(bitmap).sum(axis=-1, dtype=np.int32).reshape(grid.count, TILE)  # [T, 128]
    nnz = counts.sum(axis=1, dtype=np.int64)  # [T]
    _first_bad(
        sizes != bm_len + 2 * nnz,
        lambda t: f"tile {t} spans {sizes[t]} bytes but its bitmap implies {bm_len[t]} + 2 * {nnz[t]}",
    )
    # Set bits past the last column would make values vanish from the decoded matrix.
    codec.BitmapCodec._check_padding_bits(bitmap[:, -1], int(grid.cols[-1]))
    return (np.cumsum(counts, axis=1) - counts).astype(np.int16)  # < 128 * 128, fits int16


def _gather_bitmaps(payload: np.ndarray, bm_starts: np.ndarray, grid: codec._Grid) -> np.ndarray:
    """All tiles' bitmaps, zero-padded to uint8 [n_tr, n_tc, 128, 16], from payload offsets bm_starts.

    The caller has checked that the bitmaps lie in order, without overlap, inside the payload.
    """
    bm_len = grid.bitmap_bytes()  # [T]
    gaps = bm_starts - np.append(0, bm_starts[:-1] + bm_len[:-1])  # bytes between consecutive bitmaps
    mask = np.repeat(np.tile(np.array([False, True]), grid.count), np.stack([gaps, bm_len], 1).reshape(-1))
    mask = np.append(mask, np.zeros(len(payload) - len(mask), dtype=bool))  # bool [P]: bitmap bytes
    n_tr, n_tc = grid.shape
    bitmap = np.zeros((n_tr, n_tc, TILE, TILE // 8), dtype=np.uint8)
    bitmap[grid.bitmap_keep()] = payload[mask]  # tile-major, row-major: the order they are stored in
    return bitmap


def _first_bad(bad: np.ndarray, describe) -> None:  # noqa: ANN001 - describe: Callable[[int], str]
    """Raise for the first True of `bad`, a per-tile check, with describe(tile) as the detail."""
    if bad.any():
        raise SparsezipError(f"index offsets do not match the stream: {describe(int(np.argmax(bad)))}")
