"""Codec nibble-v3 (id 3): bitmap + a 4-bit code per value from a per-matrix codebook of its 15 commonest
symbols (escape otherwise), raw sign bits, and the low byte stored raw or as an E5M2 exception list.

Why: huff-v2's Huffman codes are about 0.5 bit per value shorter, but decoding them is serial; here 16 values are
decoded by one table shuffle (pshufb), so a product straight from the stream keeps up with the dense fp16 one.
Values are split as in huff-v2: bits = sign << 15 | symbol << 8 | low, symbol = 5 exponent bits + top 2 mantissa
bits; after pruning and L2 rounding a matrix uses few symbols, so 15 of them cover nearly every value.
  payload  = CODEBOOK (16 bytes) + tiles back to back. Index offsets are relative to the payload start, so tile 0
             is at offset 16.
  CODEBOOK = the symbol (0..127) of codes 0..14; 0xFF marks a code no value uses. Byte 15 (the escape code's) is
             0xFF. The encoder gives codes to the 15 commonest symbols, commonest first (ties: smaller symbol).
  tile (rows r <= 128, cols c <= 128, nnz present values taken in row-major order):
    u8  mode             0 = raw low bytes, 1 = E5M2 exception list (codec/values.py)
    u8  reserved         0
    u16 n_exceptions     0 in mode 0
    u16 n_escapes        the number of values with code 15
    bitmap               r * ceil(c / 8) bytes, each row LSB first (bit j of byte b = column 8b + j)
    signs                ceil(nnz / 8) bytes, bit i (LSB first) = sign of present value i
    codes                ceil(nnz / 2) bytes: value i's code in byte i // 2, the low nibble for even i
    escapes              n_escapes bytes: the symbols of the values with code 15, in order
    low bytes            mode 0: nnz bytes; mode 1: n_exceptions u16 positions, then n_exceptions u8 bytes
    (multi-byte fields little-endian; no padding or alignment between fields)
  Decoders reject: a codebook byte > 127 other than 0xFF or byte 15 not 0xFF, mode > 1, a nonzero reserved byte or
  n_exceptions in mode 0, n_exceptions > nnz, a tile whose size differs from what its fields imply (or from the
  index), bitmap bits past the last column, nonzero padding (signs, the last code byte's high nibble), a code whose
  codebook byte is 0xFF (but 15), an n_escapes that differs from the count of code 15, an escape byte > 127, and
  exception lists out of order, out of range or with a 0 byte. decode() also checks the CRC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ..errors import SparsezipError
from . import native
from .registry import register_codec
from .tiled import TiledCodec
from .stream import HEADER_SIZE, ROW_BYTES, TILE, Grid, excl_cumsum, join, split, to_tiles
from .values import (MODE_E5M2, MODE_FULL, check_bitmap_padding, low_bytes, low_bytes_length, pack_segments,
                     unpack_lows, unpack_segments)

CODEBOOK_SIZE = 16
ESCAPE = 15  # the code of a value whose symbol follows in the escape bytes
UNUSED = 0xFF  # codebook byte of a code no value uses (and of the escape code)
TILE_HEADER = 6
NAME = "nibble-v3"


@dataclass(frozen=True)
class _Fields:
    """A tile's header fields and sizes, all int64 [T]."""

    mode: np.ndarray
    reserved: np.ndarray
    n_exc: np.ndarray
    n_esc: np.ndarray
    nnz: np.ndarray

    def lengths(self) -> np.ndarray:
        """[T, 4]: bytes of the signs, codes, escapes and low-byte fields."""
        return np.stack([(self.nnz + 7) // 8, (self.nnz + 1) // 2, self.n_esc,
                         low_bytes_length(self.mode, self.n_exc, self.nnz)], 1)


def codebook_of(counts: np.ndarray) -> np.ndarray:
    """The 16-byte codebook for a matrix's symbol counts [128]: its 15 commonest symbols, commonest first (ties:
    smaller symbol). The numpy and native encoders both take it from here, so they write identical bytes."""
    order = np.lexsort((np.arange(128), -counts))  # by count descending, then symbol ascending
    used = order[counts[order] > 0][:ESCAPE]
    book = np.full(CODEBOOK_SIZE, UNUSED, dtype=np.uint8)
    book[: len(used)] = used
    return book


def check_codebook(book: np.ndarray) -> None:
    bad = (book[:ESCAPE] > 127) & (book[:ESCAPE] != UNUSED)
    if bad.any():
        code = int(np.argmax(bad))
        raise SparsezipError(f"{NAME} codebook is corrupted: code {code} has symbol {int(book[code])} "
                             "(symbols are 0..127)")
    if book[ESCAPE] != UNUSED:
        raise SparsezipError(f"{NAME} codebook is corrupted: the escape code's byte is {int(book[ESCAPE])}, not 255")


@register_codec
class NibbleCodec(TiledCodec):
    """nibble-v3 (format in the module docstring): the numpy reference, and the native path when it is built."""

    name = NAME
    version = "3.0"
    codec_id = 3

    def native_stream(self, bits: np.ndarray) -> tuple[bytearray, bytes]:
        return native.encode_v3(bits, codebook_of(native.symbol_counts(bits)), HEADER_SIZE)

    def reference_payload(self, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return encode_payload(bits)

    def reference_tiles(self, payload, offsets, grid, tiles):
        return decode_tiles(payload, offsets, grid, tiles)


# ------------------------------------------------------------ encode (numpy reference)


def encode_payload(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint16 [n, k] -> (payload uint8 [P], tile offsets int64 [T])."""
    n, k = bits.shape
    grid = Grid.of(n, k)
    tiles = to_tiles(bits, grid)  # uint16 [n_tr, n_tc, 128, 128]
    present = np.not_equal(tiles, 0, order="C")
    bitmap = np.packbits(present, axis=-1, bitorder="little")  # uint8 [n_tr, n_tc, 128, 16]
    values = tiles[present]  # uint16 [N], tile-major, row-major within a tile
    del tiles, present
    nnz = np.bitwise_count(bitmap).reshape(grid.count, -1).sum(1, dtype=np.int64)  # [T]

    sym = ((values >> 8) & 0x7F).astype(np.uint8)  # [N]
    book = codebook_of(np.bincount(sym, minlength=128))
    code_of = np.full(128, ESCAPE, dtype=np.uint8)
    used = book[:ESCAPE] != UNUSED
    code_of[book[:ESCAPE][used]] = np.arange(ESCAPE, dtype=np.uint8)[used]
    codes = code_of[sym]  # [N]
    escaped = codes == ESCAPE
    bounds = excl_cumsum(nnz)
    n_esc = excl_cumsum(escaped)[bounds[1:]] - excl_cumsum(escaped)[bounds[:-1]]  # [T]

    signs = pack_segments(values >= 0x8000, nnz, "little")
    nibbles = pack_nibbles(codes, nnz)
    low_parts, low_lens, mode, n_exc = low_bytes((values & 0xFF).astype(np.uint8), nnz)

    head = np.zeros((grid.count, TILE_HEADER // 2), dtype="<u2")  # [T, 3]
    head[:, 0] = mode  # u8 mode, u8 reserved = 0
    head[:, 1] = n_exc
    head[:, 2] = n_esc
    bm_len = grid.bitmap_bytes()
    parts = [head.view(np.uint8).reshape(-1), bitmap[grid.bitmap_keep()], signs, nibbles, sym[escaped], *low_parts]
    seg = np.stack([np.full(grid.count, TILE_HEADER), bm_len, (nnz + 7) // 8, (nnz + 1) // 2, n_esc, *low_lens], 1)
    payload = np.concatenate([book, join(parts, seg)])
    offsets = CODEBOOK_SIZE + excl_cumsum(seg.sum(1))[:-1]
    return payload, offsets


def pack_nibbles(codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """4-bit codes into bytes (even index in the low nibble), each segment of counts[i] codes on fresh bytes."""
    padded = (counts + 1) // 2 * 2
    slots = np.zeros(int(padded.sum()), dtype=np.uint8)
    slots[np.arange(len(codes)) + np.repeat(excl_cumsum(padded)[:-1] - excl_cumsum(counts)[:-1], counts)] = codes
    return slots[0::2] | (slots[1::2] << 4)


# ------------------------------------------------------------ decode (numpy reference)


def decode_tiles(payload: np.ndarray, offsets: np.ndarray, grid: Grid,
                 which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and decode the tiles `which` (sorted tile ids); every tile is checked against the size implied by
    its own fields and the index. Returns (present bool [len(which), 128, 128], values uint16 [their nnz])."""
    if len(payload) < CODEBOOK_SIZE:
        raise SparsezipError(f"wrong weight stream length: payload of {len(payload)} bytes is shorter than the "
                             f"{CODEBOOK_SIZE}-byte codebook")
    book = payload[:CODEBOOK_SIZE]
    check_codebook(book)
    if offsets[0] != CODEBOOK_SIZE:
        raise SparsezipError(f"index offsets do not match the stream: tile 0 starts at {offsets[0]}, "
                             f"not {CODEBOOK_SIZE}")
    ends = np.append(offsets[1:], len(payload))
    starts, sizes = offsets[which], ends[which] - offsets[which]
    tr, tc = np.divmod(which, grid.shape[1])
    rows, cols = grid.rows[tr], grid.cols[tc]
    bm_len = rows * ((cols + 7) // 8)
    fixed = TILE_HEADER + bm_len
    if (sizes < fixed).any():
        i = int(np.argmax(sizes < fixed))
        raise SparsezipError(f"index offsets do not match the stream: tile {which[i]} spans {sizes[i]} bytes, "
                             f"less than its {TILE_HEADER}-byte header and {bm_len[i]}-byte bitmap")
    own = payload[np.repeat(starts - excl_cumsum(sizes)[:-1], sizes) + np.arange(int(sizes.sum()))]
    head_bytes, bm_bytes, rest = split(own, np.stack([np.full(len(which), TILE_HEADER), bm_len, sizes - fixed], 1))
    head = head_bytes.reshape(-1, TILE_HEADER)
    head16 = head.view("<u2").astype(np.int64)

    bitmap = np.zeros((len(which), TILE, ROW_BYTES), dtype=np.uint8)
    row_ok = np.arange(TILE)[None, :, None] < rows[:, None, None]
    byte_ok = np.arange(ROW_BYTES)[None, None, :] < ((cols + 7) // 8)[:, None, None]
    bitmap[row_ok & byte_ok] = bm_bytes
    check_bitmap_padding(bitmap, cols)
    nnz = np.bitwise_count(bitmap).reshape(len(which), -1).sum(1, dtype=np.int64)
    fields = _Fields(head[:, 0].astype(np.int64), head[:, 1].astype(np.int64), head16[:, 1], head16[:, 2], nnz)
    check_fields(fields, which)
    lengths = fields.lengths()
    mismatch = lengths.sum(1) != sizes - fixed
    if mismatch.any():
        i = int(np.argmax(mismatch))
        raise SparsezipError(f"index offsets do not match the stream: tile {which[i]} spans {sizes[i]} bytes but "
                             f"its fields imply {fixed[i] + lengths[i].sum()}")
    sign_bytes, code_bytes, escapes, lows = split(rest, lengths)
    signs = unpack_segments(sign_bytes, nnz, "sign bits", NAME)
    sym = symbols(unpack_nibbles(code_bytes, nnz), escapes, fields, book)
    low = unpack_lows(lows, fields.mode, fields.n_exc, nnz, which, NAME)
    values = (signs.astype(np.uint16) << 15) | (sym.astype(np.uint16) << 8) | low
    return np.unpackbits(bitmap, axis=-1, bitorder="little").view(bool), values


def check_fields(f: _Fields, which: np.ndarray) -> None:
    """Header fields that can be checked before touching the tile's payload."""
    checks = [
        (f.mode > MODE_E5M2, "has unknown low-byte mode {}", f.mode),
        (f.reserved != 0, "has nonzero reserved byte {}", f.reserved),
        ((f.mode == MODE_FULL) & (f.n_exc != 0), "is in raw mode but lists {} exceptions", f.n_exc),
        (f.n_exc > f.nnz, "lists {} exceptions, more than its values", f.n_exc),
        (f.n_esc > f.nnz, "has {} escapes, more than its values", f.n_esc),
    ]
    for bad, msg, field in checks:
        if bad.any():
            i = int(np.argmax(bad))
            raise SparsezipError(f"{NAME} stream is corrupted: tile {which[i]} {msg.format(field[i])}")


def unpack_nibbles(data: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Inverse of pack_nibbles; the unused high nibble of a segment with an odd count must be 0."""
    slots = np.empty(2 * len(data), dtype=np.uint8)
    slots[0::2], slots[1::2] = data & 0x0F, data >> 4
    padded = (counts + 1) // 2 * 2
    keep = np.arange(len(slots)) - np.repeat(excl_cumsum(padded)[:-1], padded) < np.repeat(counts, padded)
    if slots[~keep].any():
        raise SparsezipError(f"{NAME} stream is corrupted: nonzero padding nibble after a tile's codes")
    return slots[keep]


def symbols(codes: np.ndarray, escapes: np.ndarray, fields: _Fields, book: np.ndarray) -> np.ndarray:
    """Each value's symbol: its code's codebook entry, or the next escape byte for code 15."""
    sym = book[codes]
    escaped = codes == ESCAPE
    bad = (sym == UNUSED) & ~escaped
    if bad.any():
        raise SparsezipError(f"{NAME} stream is corrupted: code {int(codes[np.argmax(bad)])} is not in the codebook")
    bounds = excl_cumsum(fields.nnz)
    counted = excl_cumsum(escaped)[bounds[1:]] - excl_cumsum(escaped)[bounds[:-1]]  # escapes per tile
    if (counted != fields.n_esc).any():
        raise SparsezipError(f"{NAME} stream is corrupted: a tile's escape count disagrees with its codes")
    if (escapes > 127).any():
        raise SparsezipError(f"{NAME} stream is corrupted: an escape byte is not a symbol (0..127)")
    sym[escaped] = escapes
    return sym
