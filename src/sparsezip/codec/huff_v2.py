"""Codec huff-v2 (id 2): bitmap + canonical Huffman code of each value's 7-bit (exponent, top-2-mantissa)
symbol, raw sign bits, and the low byte stored raw or as an E5M2 exception list.

Codec huff-v2 (id 2). Values are split as
  bits = sign << 15 | symbol << 8 | low,   symbol = 5 exponent bits + top 2 mantissa bits (7 bits),
because in pruned weights the symbol is skewed (~3.6 bits of entropy) while sign and low byte
are nearly uniform, and after L2 rounding (E5M2 values) the low byte is almost always 0.
  payload = TABLE (128 bytes) + tiles back to back. Index offsets are relative to the payload
            start, so tile 0 is at offset 128.
  TABLE   = u8 code length (0..12, 0 = symbol unused) of each symbol 0..127, for a Huffman code
            over the symbols of all present values of the matrix, limited to 12 bits. Codes are
            canonical: symbols sorted by (length, symbol) get increasing codes (the first gets
            all zeros; code = (previous + 1) << (length - previous length)). A matrix with one
            distinct symbol gives it length 1 (code "0"). The lengths must satisfy Kraft's
            inequality (sum 2^-len <= 1).
  tile (rows r <= 128, cols c <= 128, nnz present values taken in row-major order,
        G = ceil(r / 8) row groups):
    u8  mode             0 = raw low bytes, 1 = E5M2 (low bytes are 0 except the listed ones)
    u8  reserved         0
    u16 n_exceptions     0 in mode 0
    u16 sub_len[G]       byte length of the Huffman substream of row group g (rows 8g..8g+7);
                         0 exactly when the group has no present value
    bitmap               r * ceil(c / 8) bytes (see above)
    signs                ceil(nnz / 8) bytes, bit i (LSB first) = sign of present value i
    substreams           G byte-aligned bitstreams back to back: the codes of the symbols of
                         group g's present values, in order, MSB first, zero-padded to a byte
    low bytes            mode 0: nnz bytes, (bits & 0xFF) of each present value
                         mode 1: n_exceptions u16 positions (index among the tile's present
                         values, strictly increasing, < nnz), then n_exceptions u8 low bytes
                         (each != 0). All other low bytes are 0.
    (all multi-byte fields little-endian; no padding or alignment between fields)
  The encoder picks mode 1 when 3 * n_exceptions < nnz, else mode 0.
  A tile decodes from TABLE and its own bytes: substream g starts at the sum of sub_len[<g],
  its first value is the popcount of the bitmap rows above it, so a GPU block decodes the G
  substreams in parallel lanes and scatters by bitmap prefix sums.
  Decoders reject: a length > 12 or an over-subscribed TABLE, mode > 1, a nonzero reserved
  byte or n_exceptions in mode 0, n_exceptions > nnz, a sub_len that is 0 for a group with
  values (or not 0 for one without), a tile whose size differs from what its fields imply (or
  from the index), bitmap bits past the last column, nonzero padding bits (signs, substream
  ends), an invalid code, a substream whose codes do not end in its last byte, and exception
  lists out of order, out of range or with a 0 byte. decode() also checks the CRC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ..errors import SparsezipError
from . import native
from .huff_table import V2_MAX_CODE, V2_TABLE_SIZE, canonical_codes, huffman_lengths, v2_decode_table
from .registry import register_codec
from .tiled import TiledCodec
from .stream import HEADER_SIZE, ROW_BYTES, TILE, Grid, excl_cumsum, join, split, to_tiles
from .values import (MODE_E5M2, MODE_FULL, check_bitmap_padding, low_bytes, low_bytes_length, pack_segments,
                     unpack_lows, unpack_segments)

V2_GROUP_ROWS = 8  # rows per Huffman substream
_V2_GROUPS = TILE // V2_GROUP_ROWS  # substreams of a full tile (16)
_V2_MAX_HEADER = 4 + 2 * _V2_GROUPS  # tile header bytes of a full tile (36)
_V2_MAX_SUB = (V2_GROUP_ROWS * TILE * V2_MAX_CODE + 7) // 8  # longest possible substream (1536 bytes)


@dataclass(frozen=True)
class _V2Geometry:
    """Per-tile sizes that follow from the matrix shape alone, all int64 [T]."""

    rows: np.ndarray
    cols: np.ndarray
    groups: np.ndarray  # substreams per tile: ceil(rows / 8)
    header: np.ndarray  # 4 + 2 * groups
    bitmap: np.ndarray  # rows * ceil(cols / 8)

    @classmethod
    def of(cls, grid: Grid) -> _V2Geometry:
        n_tr, n_tc = grid.shape
        rows = np.repeat(grid.rows, n_tc)
        cols = np.tile(grid.cols, n_tr)
        groups = (rows + V2_GROUP_ROWS - 1) // V2_GROUP_ROWS
        return cls(rows, cols, groups, 4 + 2 * groups, rows * ((cols + 7) // 8))

    def group_mask(self) -> np.ndarray:
        """bool [T, 16]: which of a padded tile's 16 row groups exist (are stored)."""
        return np.arange(_V2_GROUPS)[None, :] < self.groups[:, None]


@register_codec
class HuffCodec(TiledCodec):
    """huff-v2 (format in the module docstring). This class holds the numpy reference, the source of truth, and
    takes the native path (codec.native) when the extension is built, unless told `backend="numpy"`."""

    name = "huff-v2"
    version = "2.0"
    codec_id = 2

    def native_stream(self, bits: np.ndarray) -> tuple[bytearray, bytes]:
        return native.encode_v2(bits, HEADER_SIZE)

    def reference_payload(self, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_payload(bits)

    def reference_tiles(self, payload, offsets, grid, tiles):
        return self._decode_tiles(payload, offsets, grid, tiles)

    # ------------------------------------------------------------ encode (numpy reference)

    def encode_payload(self, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reference encoder: uint16 [n, k] -> (payload uint8 [P], tile offsets int64 [T])."""
        n, k = bits.shape
        grid = Grid.of(n, k)
        geo = _V2Geometry.of(grid)
        tiles = to_tiles(bits, grid)  # uint16 [n_tr, n_tc, 128, 128]
        present = np.not_equal(tiles, 0, order="C")
        bitmap = np.packbits(present, axis=-1, bitorder="little")  # uint8 [n_tr, n_tc, 128, 16]
        values = tiles[present]  # uint16 [N], tile-major, row-major within a tile
        del tiles, present
        group_cnt = np.bitwise_count(bitmap).reshape(grid.count, _V2_GROUPS, -1).sum(-1, dtype=np.int64)  # [T, 16]
        nnz = group_cnt.sum(1)  # [T]

        sym = ((values >> 8) & 0x7F).astype(np.uint8)  # [N]
        lengths = huffman_lengths(np.bincount(sym, minlength=V2_TABLE_SIZE))
        sub_bytes = np.zeros((grid.count, _V2_GROUPS), dtype=np.int64)  # [T, 16]
        stored = geo.group_mask()
        substreams, sub_bytes[stored] = self._huffman_pack(sym, group_cnt[stored], lengths)

        signs = pack_segments(values >= 0x8000, nnz, "little")
        low_parts, low_lens, mode, n_exc = low_bytes((values & 0xFF).astype(np.uint8), nnz)

        head = np.zeros((grid.count, _V2_MAX_HEADER // 2), dtype="<u2")  # [T, 18]
        head[:, 0] = mode  # u8 mode, u8 reserved = 0
        head[:, 1] = n_exc
        head[:, 2:] = sub_bytes
        head_bytes = head.view(np.uint8)[np.arange(_V2_MAX_HEADER)[None, :] < geo.header[:, None]]

        parts = [head_bytes, bitmap[grid.bitmap_keep()], signs, substreams, *low_parts]
        seg = np.stack([geo.header, geo.bitmap, (nnz + 7) // 8, sub_bytes.sum(1), *low_lens], axis=1)
        body = join(parts, seg)
        payload = np.concatenate([lengths, body])
        offsets = V2_TABLE_SIZE + excl_cumsum(seg.sum(1))[:-1]
        return payload, offsets

    @staticmethod
    def _huffman_pack(sym: np.ndarray, counts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Huffman-code sym [N] into byte-aligned substreams of counts [S] symbols each (MSB-first).

        Returns (all substreams back to back, byte length of each [S]).
        """
        codes = canonical_codes(lengths)
        vlen = lengths[sym].astype(np.int64)  # [N]
        vcode = codes[sym].astype(np.int64)
        cum = excl_cumsum(vlen)  # bit offset of each value in an unpadded stream
        bounds = excl_cumsum(counts)  # first value of each substream
        sub_bits = cum[bounds[1:]] - cum[bounds[:-1]]
        sub_bytes = (sub_bits + 7) // 8
        # Bit position of each value's first code bit once substreams start on byte boundaries.
        start = cum[:-1] + np.repeat(8 * excl_cumsum(sub_bytes)[:-1] - cum[bounds[:-1]], counts)
        stream = np.zeros(8 * int(sub_bytes.sum()), dtype=bool)
        for j in range(V2_MAX_CODE):  # loop over code bit positions, not values
            has = vlen > j
            stream[start[has] + j] = (vcode[has] >> (vlen[has] - 1 - j)) & 1
        return np.packbits(stream, bitorder="big"), sub_bytes

    # ------------------------------------------------------------ decode (numpy reference)

    def _decode_tiles(self, payload: np.ndarray, offsets: np.ndarray, grid: Grid, which: np.ndarray):
        """Validate and decode the tiles `which` (sorted tile ids); every tile is checked against the
        size implied by its own fields and the index.

        Returns (present bool [len(which), 128, 128], values uint16 [nnz of those tiles]).
        """
        if len(payload) < V2_TABLE_SIZE:
            raise SparsezipError(
                f"wrong weight stream length: payload of {len(payload)} bytes is shorter than the "
                f"{V2_TABLE_SIZE}-byte code table"
            )
        sym_of, len_of = v2_decode_table(payload[:V2_TABLE_SIZE])
        if offsets[0] != V2_TABLE_SIZE:
            raise SparsezipError(
                f"index offsets do not match the stream: tile 0 starts at {offsets[0]}, not {V2_TABLE_SIZE}"
            )
        full_geo = _V2Geometry.of(grid)
        geo = _V2Geometry(*(getattr(full_geo, f)[which] for f in ("rows", "cols", "groups", "header", "bitmap")))
        ends = np.append(offsets[1:], len(payload))
        starts, sizes = offsets[which], ends[which] - offsets[which]
        fixed = geo.header + geo.bitmap
        short = sizes < fixed
        if short.any():
            i = int(np.argmax(short))
            raise SparsezipError(
                f"index offsets do not match the stream: tile {which[i]} spans {sizes[i]} bytes, "
                f"less than its {geo.header[i]}-byte header and {geo.bitmap[i]}-byte bitmap"
            )
        if len(which) == grid.count:  # all tiles: they tile the payload after the table exactly
            own = payload[V2_TABLE_SIZE:]
        else:  # gather just these tiles' bytes
            own = payload[np.repeat(starts - excl_cumsum(sizes)[:-1], sizes) + np.arange(int(sizes.sum()))]
        head_bytes, bm_bytes, rest = split(own, np.stack([geo.header, geo.bitmap, sizes - fixed], 1))

        head = np.zeros((len(which), _V2_MAX_HEADER), dtype=np.uint8)
        head[np.arange(_V2_MAX_HEADER)[None, :] < geo.header[:, None]] = head_bytes
        mode, reserved = head[:, 0].astype(np.int64), head[:, 1]
        head16 = head.view("<u2").astype(np.int64)
        n_exc, sub_len = head16[:, 1], head16[:, 2:]  # [T], [T, 16] (0 past the tile's groups)

        bitmap = np.zeros((len(which), TILE, ROW_BYTES), dtype=np.uint8)
        row_ok = np.arange(TILE)[None, :, None] < geo.rows[:, None, None]
        byte_ok = np.arange(ROW_BYTES)[None, None, :] < ((geo.cols + 7) // 8)[:, None, None]
        bitmap[row_ok & byte_ok] = bm_bytes
        check_bitmap_padding(bitmap, geo.cols)
        group_cnt = np.bitwise_count(bitmap).reshape(len(which), _V2_GROUPS, -1).sum(-1, dtype=np.int64)
        nnz = group_cnt.sum(1)

        check_tile_fields(which, mode, reserved, n_exc, nnz, sub_len, group_cnt)
        lows_len = low_bytes_length(mode, n_exc, nnz)
        seg = np.stack([(nnz + 7) // 8, sub_len.sum(1), lows_len], 1)
        mismatch = seg.sum(1) != sizes - fixed
        if mismatch.any():
            i = int(np.argmax(mismatch))
            raise SparsezipError(
                f"index offsets do not match the stream: tile {which[i]} spans {sizes[i]} bytes but its "
                f"fields imply {fixed[i] + seg[i].sum()}"
            )
        sign_bytes, subs, lows = split(rest, seg)

        signs = unpack_segments(sign_bytes, nnz, "sign bits", "huff-v2")
        stored = np.arange(_V2_GROUPS)[None, :] < geo.groups[:, None]
        sym = self._huffman_unpack(subs, group_cnt[stored], sub_len[stored], sym_of, len_of)
        low = unpack_lows(lows, mode, n_exc, nnz, which, "huff-v2")
        values = (signs.astype(np.uint16) << 15) | (sym.astype(np.uint16) << 8) | low
        present = np.unpackbits(bitmap, axis=-1, bitorder="little").view(bool)  # [T, 128, 128]
        return present, values

    @staticmethod
    def _huffman_unpack(subs, counts, sub_len, sym_of, len_of) -> np.ndarray:
        """Decode substreams (back to back, sub_len bytes each) of counts symbols each, in lock-step:
        step j decodes symbol j of every substream that has one (loop over positions, not values).
        """
        total = int(counts.sum())
        out = np.empty(total, dtype=np.uint8)
        if total == 0:
            return out
        data = np.concatenate([subs, np.zeros(3, dtype=np.uint8)]).astype(np.uint32)
        last = len(data) - 3  # clamp reads here: an overrunning (corrupt) substream is caught below
        order = np.argsort(-counts, kind="stable")  # active substreams form a prefix at every step
        cnt = counts[order]
        first_bit = 8 * excl_cumsum(sub_len)[:-1][order]
        pos = first_bit.copy()
        dest = excl_cumsum(counts)[:-1][order]
        active = np.searchsorted(-cnt, -np.arange(int(cnt[0])), side="left")  # substreams with > j symbols
        for j, a in enumerate(active):
            p = pos[:a]
            byte = np.minimum(p >> 3, last)
            window = (data[byte] << 16) | (data[byte + 1] << 8) | data[byte + 2]
            peek = (window >> (12 - (p & 7)).astype(np.uint32)) & 0xFFF
            step = len_of[peek]
            if not step.all():
                raise SparsezipError("huff-v2 stream is corrupted: a substream holds an invalid Huffman code")
            out[dest[:a] + j] = sym_of[peek]
            p += step
        used = pos - first_bit
        if ((used + 7) // 8 != sub_len[order]).any():
            raise SparsezipError("huff-v2 stream is corrupted: a substream length disagrees with its codes")
        tail = used % 8 != 0
        last_byte = data[(first_bit[tail] + used[tail]) >> 3]
        if (last_byte & ((1 << (8 - used[tail] % 8)) - 1)).any():
            raise SparsezipError("huff-v2 stream is corrupted: nonzero padding bits after a substream")
        return out


def check_tile_fields(which, mode, reserved, n_exc, nnz, sub_len, group_cnt) -> None:
    """Header fields that can be checked before touching the tile's payload."""
    checks = [
        (mode > MODE_E5M2, "has unknown low-byte mode {}", mode),
        (reserved != 0, "has nonzero reserved byte {}", reserved),
        ((mode == MODE_FULL) & (n_exc != 0), "is in raw mode but lists {} exceptions", n_exc),
        (n_exc > nnz, "lists {} exceptions, more than its values", n_exc),
        (((sub_len == 0) != (group_cnt == 0)).any(1), "has a substream length that disagrees with its bitmap",
         None),
        ((sub_len > _V2_MAX_SUB).any(1), "has a substream longer than {} bytes".format(_V2_MAX_SUB), None),
    ]
    for bad, msg, field in checks:
        if bad.any():
            i = int(np.argmax(bad))
            text = msg.format(field[i]) if field is not None else msg
            raise SparsezipError(f"huff-v2 stream is corrupted: tile {which[i]} {text}")
