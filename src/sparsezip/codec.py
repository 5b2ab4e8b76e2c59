"""Tile-wise lossless codecs for pruned fp16 linear weights.

A weight W [n, k] (out_features x in_features) is cut into 128 x 128 tiles in row-major
tile order (t = tile_row * n_tile_cols + tile_col; edge tiles are smaller). Each tile is
self-describing and the index stores its byte offset, so CPU threads / GPU blocks can
decode tiles independently.

Stored tensors per weight:
  .weight  int8 [HEADER_SIZE + payload]  header, then the tiles back to back
  .index   int8 [8 * n_tiles]            little-endian int64 offset of each tile in the payload
  .info    int64 [5]                     [tile_k, tile_n, k, n, codec_id]

Stream header (HEADER_SIZE = 24 bytes, little-endian):
  0  4s  magic b"SPZW"
  4  u16 codec id (must equal info[4])
  6  u16 stream format version (1)
  8  u32 zlib.crc32 of the payload
  12 u32 reserved, must be 0
  16 u64 payload length in bytes (a payload may exceed 4 GiB, hence 64 bits)

Encode/decode work on whole matrices with numpy/torch array ops (no Python loops over
tiles, rows or elements), so throughput is bounded by memory bandwidth, not the interpreter.

"Present" means bit pattern != 0x0000 in every codec, so -0.0, subnormals, inf and NaN
payloads are stored exactly. Bitmaps: one bit per entry, each tile row ceil(cols_t / 8)
bytes, LSB first (bit j of byte b = column 8b + j).

Codec bitmap-v1 (id 1): tile = bitmap, then the present values as little-endian u16 in
row-major order. The index holds payload offsets (tile 0 at 0).

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

import operator
import struct
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from .errors import SparsezipError

TILE = 128
MAGIC = b"SPZW"
STREAM_VERSION = 1
_HEADER = struct.Struct("<4sHHIIQ")  # magic, codec_id, version, crc32, reserved, payload_len
HEADER_SIZE = _HEADER.size  # 24
_MAX_DIM = 2**31 - 1  # keeps every size/offset computation far from int64 overflow
_ROW_BYTES = TILE // 8  # bitmap bytes of one full tile row


@dataclass(frozen=True)
class EncodedWeight:
    """The three tensors stored for one compressed linear weight."""

    weight: torch.Tensor  # int8 [HEADER_SIZE + payload bytes]
    index: torch.Tensor  # int8 [8 * n_tiles]
    info: torch.Tensor  # int64 [5]: tile_k, tile_n, k, n, codec_id


class Codec(ABC):
    """A tile codec. Subclasses set the class attributes and register with @register_codec."""

    name: str
    version: str
    codec_id: int

    @abstractmethod
    def encode(self, weight: torch.Tensor) -> EncodedWeight:
        """Compress a 2-D float16 weight [n, k]."""

    @abstractmethod
    def decode(self, enc: EncodedWeight) -> torch.Tensor:
        """Validate everything and decompress to a CPU float16 tensor [n, k]."""

    @abstractmethod
    def decode_tile(self, enc: EncodedWeight, tile: int) -> torch.Tensor:
        """Decompress one tile [rows_t, cols_t], reading only that tile's bytes."""

    def _check_id(self, codec_id: int) -> None:
        if codec_id != self.codec_id:
            raise SparsezipError(f"info codec id {codec_id} does not belong to codec {self.name!r}")

    def _open_tile(self, enc: EncodedWeight, tile: int) -> tuple[np.ndarray, _Grid, int, np.ndarray]:
        """(payload, grid, checked tile number, tile offsets) for decode_tile; the CRC is not checked (it
        would read the whole stream)."""
        n, k, codec_id = _parse_info(enc.info)
        self._check_id(codec_id)
        payload = _read_stream(enc.weight, self.codec_id, check_crc=False)
        grid = _Grid.of(n, k)
        return payload, grid, _tile_number(tile, grid), _read_index(enc.index, grid.count, len(payload))


# The only global state: the codec registry, keyed both ways.
_BY_NAME: dict[str, Codec] = {}
_BY_ID: dict[int, Codec] = {}

_CodecT = TypeVar("_CodecT", bound=type[Codec])


def register_codec(cls: _CodecT) -> _CodecT:
    """Class decorator: instantiate the codec and make it findable by name and by id."""
    codec = cls()
    if not 1 <= codec.codec_id <= 0xFFFF:
        raise SparsezipError(f"codec {codec.name!r}: id {codec.codec_id} must be in 1..65535")
    if codec.name in _BY_NAME or codec.codec_id in _BY_ID:
        raise SparsezipError(
            f"codec {codec.name!r} (id {codec.codec_id}) clashes with a registered codec; "
            f"known codecs: {_known_codecs()}"
        )
    _BY_NAME[codec.name] = codec
    _BY_ID[codec.codec_id] = codec
    return cls


def _known_codecs() -> str:
    return ", ".join(f"{c.name} (id {c.codec_id})" for c in _BY_ID.values()) or "none"


def get_codec(name: str) -> Codec:
    """Look a codec up by its name, e.g. "bitmap-v1"."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise SparsezipError(f"unknown codec {name!r}; known codecs: {_known_codecs()}") from None


def codec_for_id(codec_id: int) -> Codec:
    """Look a codec up by the numeric id stored in info[4] and in the stream header."""
    try:
        return _BY_ID[operator.index(codec_id)]
    except (KeyError, TypeError):
        raise SparsezipError(f"unknown codec id {codec_id!r}; known codecs: {_known_codecs()}") from None


def n_tiles(n: int, k: int) -> int:
    """Number of 128 x 128 tiles (edge tiles included) covering an [n, k] matrix."""
    if not (isinstance(n, int) and isinstance(k, int) and n >= 1 and k >= 1):
        raise SparsezipError(f"matrix shape must be two positive ints, got ({n!r}, {k!r})")
    return -(-n // TILE) * -(-k // TILE)


def encode(weight: torch.Tensor, codec: str = "bitmap-v1") -> EncodedWeight:
    """Compress a 2-D float16 weight [n, k] with the named codec."""
    return get_codec(codec).encode(weight)


def decode(weight: torch.Tensor, index: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """Decompress a stored weight to CPU float16 [n, k]; the codec is chosen by info[4]."""
    _, _, codec_id = _parse_info(info)
    return codec_for_id(codec_id).decode(EncodedWeight(weight, index, info))


def decode_tile(weight: torch.Tensor, index: torch.Tensor, info: torch.Tensor, tile: int) -> torch.Tensor:
    """Decompress tile number `tile` only (seeks through the index) to float16 [rows_t, cols_t].

    The payload CRC is not checked here (that would read the whole stream, defeating random
    access); the tile's own bitmap/offset consistency is. Use decode() for a verified read.
    """
    _, _, codec_id = _parse_info(info)
    return codec_for_id(codec_id).decode_tile(EncodedWeight(weight, index, info), tile)


# ---------------------------------------------------------------------------- helpers


def _weight_bits(weight: torch.Tensor) -> np.ndarray:
    """uint16 bit patterns [n, k] of a validated 2-D float16 weight (no copy if already CPU-contiguous)."""
    if not isinstance(weight, torch.Tensor):
        raise SparsezipError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype != torch.float16:
        raise SparsezipError(f"weight must be torch.float16, got {weight.dtype}; convert with .half() first")
    if weight.dim() != 2:
        raise SparsezipError(f"weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
    n, k = weight.shape
    if n == 0 or k == 0 or n > _MAX_DIM or k > _MAX_DIM:
        raise SparsezipError(f"weight shape {list(weight.shape)} is not supported (each dim must be 1..{_MAX_DIM})")
    return weight.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def _edge_sizes(size: int) -> np.ndarray:
    """Extent of each tile along one axis: 128, ..., 128, remainder. int64 [tiles along axis]."""
    sizes = np.full(-(-size // TILE), TILE, dtype=np.int64)
    sizes[-1] = size - TILE * (len(sizes) - 1)
    return sizes


@dataclass(frozen=True)
class _Grid:
    """Tile geometry of an [n, k] matrix."""

    rows: np.ndarray  # int64 [n_tr] rows in each tile row
    cols: np.ndarray  # int64 [n_tc] columns in each tile column

    @classmethod
    def of(cls, n: int, k: int) -> _Grid:
        return cls(_edge_sizes(n), _edge_sizes(k))

    @property
    def shape(self) -> tuple[int, int]:  # (n_tr, n_tc)
        return len(self.rows), len(self.cols)

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)

    def bitmap_bytes(self) -> np.ndarray:
        """Bitmap length of every tile, int64 [T]: rows_t * ceil(cols_t / 8)."""
        return (self.rows[:, None] * ((self.cols + 7) // 8)[None, :]).reshape(-1)

    def bitmap_keep(self) -> np.ndarray:
        """bool [n_tr, n_tc, 128, 16]: which bytes of a padded bitmap are stored (edge tiles are shorter)."""
        row_ok = np.arange(TILE)[None, None, :, None] < self.rows[:, None, None, None]
        byte_ok = np.arange(_ROW_BYTES)[None, None, None, :] < ((self.cols + 7) // 8)[None, :, None, None]
        return row_ok & byte_ok


def _segment_mask(first: np.ndarray, total: np.ndarray) -> np.ndarray:
    """bool [sum(total)]: per segment, `first` Trues then `total - first` Falses.

    Marks the bitmap bytes (vs value bytes) of every tile in the payload in one pass.
    """
    lengths = np.stack([first, total - first], axis=1).reshape(-1)
    return np.repeat(np.tile(np.array([True, False]), len(first)), lengths)


def _to_tiles(bits: np.ndarray, grid: _Grid) -> np.ndarray:
    """uint16 [n, k] -> zero-padded [n_tr, n_tc, 128, 128]; a strided view unless padding is needed."""
    n_tr, n_tc = grid.shape
    n, k = bits.shape
    if n % TILE or k % TILE:
        padded = np.zeros((n_tr * TILE, n_tc * TILE), dtype=bits.dtype)
        padded[:n, :k] = bits
        bits = padded
    return bits.reshape(n_tr, TILE, n_tc, TILE).transpose(0, 2, 1, 3)


def _describe(t: object) -> str:
    return f"{t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _as_bytes(t: torch.Tensor, what: str) -> np.ndarray:
    """uint8 view [len] of a 1-D int8 tensor."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or t.dim() != 1:
        raise SparsezipError(f"{what} must be a 1-D torch.int8 tensor, got {_describe(t)}")
    return t.detach().cpu().contiguous().numpy().view(np.uint8)


def _parse_info(info: torch.Tensor) -> tuple[int, int, int]:
    """Validate info and return (n, k, codec_id)."""
    if not isinstance(info, torch.Tensor) or info.dtype != torch.int64 or tuple(info.shape) != (5,):
        raise SparsezipError(
            "info must be a torch.int64 tensor of shape [5] "
            f"(tile_k, tile_n, in_features, out_features, codec_id), got {_describe(info)}"
        )
    tile_k, tile_n, k, n, codec_id = info.tolist()
    if tile_k != TILE or tile_n != TILE:
        raise SparsezipError(f"info has tile size {tile_k}x{tile_n}; only {TILE}x{TILE} is supported")
    if not (1 <= k <= _MAX_DIM and 1 <= n <= _MAX_DIM):
        raise SparsezipError(f"info has invalid matrix shape: out_features={n}, in_features={k}")
    return n, k, codec_id


def _read_stream(weight: torch.Tensor, codec_id: int, *, check_crc: bool) -> np.ndarray:
    """Validate the stream header (and optionally the CRC); return the payload, uint8 [P]."""
    stream = _as_bytes(weight, "weight stream")
    if len(stream) < HEADER_SIZE:
        raise SparsezipError(
            f"wrong weight stream length: {len(stream)} bytes is shorter than the {HEADER_SIZE}-byte header"
        )
    magic, hdr_codec, version, crc, reserved, payload_len = _HEADER.unpack(stream[:HEADER_SIZE].tobytes())
    if magic != MAGIC:
        raise SparsezipError(f"weight stream has bad magic {magic!r} (expected {MAGIC!r}); not a sparsezip weight")
    if version != STREAM_VERSION:
        raise SparsezipError(f"weight stream format version {version} is not supported (expected {STREAM_VERSION})")
    if hdr_codec != codec_id:
        raise SparsezipError(
            f"weight stream header says codec id {hdr_codec} but info says {codec_id}; "
            f"known codecs: {_known_codecs()}"
        )
    if reserved != 0:
        raise SparsezipError(f"weight stream header reserved field is {reserved:#x}, expected 0; data is corrupted")
    payload = stream[HEADER_SIZE:]
    if len(payload) != payload_len:
        raise SparsezipError(
            f"wrong weight stream length: payload is {len(payload)} bytes but the header says {payload_len}"
        )
    if check_crc:
        actual = zlib.crc32(payload)
        if actual != crc:
            raise SparsezipError(
                f"weight stream CRC mismatch (stored {crc:#010x}, computed {actual:#010x}); data is corrupted"
            )
    return payload


def _read_index(index: torch.Tensor, count: int, payload_len: int) -> np.ndarray:
    """Validate the index length and offset range; return tile offsets, int64 [count]."""
    raw = _as_bytes(index, "index")
    if len(raw) != 8 * count:
        raise SparsezipError(f"index has {len(raw)} bytes, expected 8 * n_tiles = {8 * count}")
    offsets = raw.view("<i8").astype(np.int64)
    outside = (offsets < 0) | (offsets > payload_len)
    if outside.any():
        t = int(np.argmax(outside))
        raise SparsezipError(f"index offset of tile {t} ({offsets[t]}) lies outside the {payload_len}-byte payload")
    return offsets


# ---------------------------------------------------------------------------- bitmap-v1


def _scatter_tiles(present: np.ndarray, values: np.ndarray, n: int, k: int) -> torch.Tensor:
    """fp16 [n, k] from the presence masks bool [n_tr, n_tc, 128, 128] and the present values uint16 [nnz]
    in tile-major, row-major order. Scatters straight into the final [Np, Kp] layout through a tile-ordered
    view: no per-tile temporaries, no index array (flat indices would cost 8 bytes per value)."""
    n_tr, n_tc = present.shape[:2]
    full = torch.zeros((n_tr * TILE, n_tc * TILE), dtype=torch.int16)  # [Np, Kp]
    full.view(n_tr, TILE, n_tc, TILE).permute(0, 2, 1, 3).masked_scatter_(
        torch.from_numpy(present), torch.from_numpy(values.view(np.int16))
    )
    if full.shape != (n, k):
        full = full[:n, :k].contiguous()
    return full.view(torch.float16)


def _tile_number(tile: object, grid: _Grid) -> int:
    """A validated tile number for decode_tile."""
    try:
        t = operator.index(tile)
    except TypeError:
        raise SparsezipError(f"tile must be an int, got {type(tile).__name__}") from None
    if not 0 <= t < grid.count:
        raise SparsezipError(f"tile {t} is out of range; this weight has {grid.count} tiles")
    return t


@register_codec
class BitmapCodec(Codec):
    """Per tile: presence bitmap (each tile row ceil(cols_t/8) bytes, LSB first), then the
    present fp16 values (little-endian, row-major within the tile).

    "Present" means bit pattern != 0x0000, so -0.0, subnormals, inf and NaN payloads are
    kept exactly. A full tile costs 2048 + 2 * nnz bytes.
    """

    name = "bitmap-v1"
    version = "1.0"
    codec_id = 1

    def encode(self, weight: torch.Tensor) -> EncodedWeight:
        bits = _weight_bits(weight)  # uint16 [n, k]
        n, k = bits.shape
        grid = _Grid.of(n, k)
        tiles = _to_tiles(bits, grid)  # uint16 [n_tr, n_tc, 128, 128]
        present = np.not_equal(tiles, 0, order="C")  # bool [n_tr, n_tc, 128, 128]
        bitmap = np.packbits(present, axis=-1, bitorder="little")  # uint8 [n_tr, n_tc, 128, 16]

        bm_len = grid.bitmap_bytes()  # [T]
        nnz = np.bitwise_count(bitmap).reshape(grid.count, -1).sum(axis=1, dtype=np.int64)  # [T]
        sizes = bm_len + 2 * nnz  # [T] bytes per tile
        offsets = np.cumsum(sizes) - sizes  # [T] exclusive prefix sum

        stream = np.empty(HEADER_SIZE + int(sizes.sum()), dtype=np.uint8)
        payload = stream[HEADER_SIZE:]  # [P]
        in_bitmap = _segment_mask(bm_len, sizes)  # bool [P]
        payload[in_bitmap] = bitmap[grid.bitmap_keep()]
        # Boolean indexing walks the (strided) tile view in tile-major, row-major order. It is
        # ~3x slower than np.compress but needs no 8-byte-per-value index array.
        values = tiles[present]  # uint16 [nnz]
        del tiles, present
        np.logical_not(in_bitmap, out=in_bitmap)  # now marks value bytes
        payload[in_bitmap] = values.astype("<u2", copy=False).view(np.uint8)

        header = _HEADER.pack(MAGIC, self.codec_id, STREAM_VERSION, zlib.crc32(payload), 0, len(payload))
        stream[:HEADER_SIZE] = np.frombuffer(header, dtype=np.uint8)
        return EncodedWeight(
            weight=torch.from_numpy(stream.view(np.int8)),
            index=torch.from_numpy(offsets.astype("<i8").view(np.int8)),
            info=torch.tensor([TILE, TILE, k, n, self.codec_id], dtype=torch.int64),
        )

    def decode(self, enc: EncodedWeight) -> torch.Tensor:
        n, k, codec_id = _parse_info(enc.info)
        self._check_id(codec_id)
        payload = _read_stream(enc.weight, self.codec_id, check_crc=True)  # uint8 [P]
        grid = _Grid.of(n, k)
        n_tr, n_tc = grid.shape
        offsets = _read_index(enc.index, grid.count, len(payload))  # [T]

        # Tile sizes implied by the index: must start at 0 and leave room for each bitmap.
        bm_len = grid.bitmap_bytes()  # [T]
        sizes = np.append(offsets[1:], len(payload)) - offsets  # [T]
        value_bytes = sizes - bm_len
        if offsets[0] != 0:
            raise SparsezipError(f"index offsets do not match the stream: tile 0 starts at {offsets[0]}, not 0")
        bad = (value_bytes < 0) | (value_bytes % 2 != 0) | (value_bytes > 2 * TILE * TILE)
        if bad.any():
            t = int(np.argmax(bad))
            raise SparsezipError(
                f"index offsets do not match the stream: tile {t} spans {sizes[t]} bytes, "
                f"which cannot be its {bm_len[t]}-byte bitmap plus 2-byte values"
            )

        in_bitmap = _segment_mask(bm_len, sizes)  # bool [P]
        bitmap = np.zeros((n_tr, n_tc, TILE, _ROW_BYTES), dtype=np.uint8)  # edge tiles zero-padded
        bitmap[grid.bitmap_keep()] = payload[in_bitmap]  # mask is long runs: boolean indexing is fast
        # Each tile's size must equal what its bitmap implies. Starting from offset 0 this
        # pins every offset, so any altered index entry is caught here.
        nnz = np.bitwise_count(bitmap).reshape(grid.count, -1).sum(axis=1, dtype=np.int64)  # [T]
        mismatch = sizes != bm_len + 2 * nnz
        if mismatch.any():
            t = int(np.argmax(mismatch))
            raise SparsezipError(
                f"index offsets do not match the bitmaps: tile {t} spans {sizes[t]} bytes "
                f"but its bitmap implies {bm_len[t]} + 2 * {nnz[t]}"
            )
        self._check_padding_bits(bitmap[:, -1], int(grid.cols[-1]))

        present = np.unpackbits(bitmap, axis=-1, bitorder="little").view(bool)  # [n_tr, n_tc, 128, 128]
        np.logical_not(in_bitmap, out=in_bitmap)  # now marks value bytes
        values = payload[in_bitmap].view("<u2").astype(np.uint16, copy=False)  # [nnz]
        del in_bitmap
        return _scatter_tiles(present, values, n, k)

    def decode_tile(self, enc: EncodedWeight, tile: int) -> torch.Tensor:
        payload, grid, t, offsets = self._open_tile(enc, tile)
        tr, tc = divmod(t, grid.shape[1])
        rows, cols = int(grid.rows[tr]), int(grid.cols[tc])
        row_bytes = (cols + 7) // 8
        bm_len = rows * row_bytes
        start = int(offsets[t])
        end = int(offsets[t + 1]) if t + 1 < grid.count else len(payload)
        if start + bm_len > end:
            raise SparsezipError(
                f"index offsets do not match the stream: tile {t} spans {end - start} bytes, "
                f"less than its {bm_len}-byte bitmap"
            )
        bitmap = payload[start : start + bm_len].reshape(rows, row_bytes)
        nnz = int(np.bitwise_count(bitmap).sum())
        if end - start != bm_len + 2 * nnz:
            raise SparsezipError(
                f"index offsets do not match the bitmaps: tile {t} spans {end - start} bytes "
                f"but its bitmap implies {bm_len} + 2 * {nnz}"
            )
        self._check_padding_bits(bitmap, cols)
        present = np.unpackbits(bitmap, axis=-1, count=cols, bitorder="little").view(bool)  # [rows, cols]
        out = np.zeros((rows, cols), dtype=np.uint16)
        out[present] = np.frombuffer(payload[start + bm_len : end].tobytes(), dtype="<u2")
        return torch.from_numpy(out.view(np.int16)).view(torch.float16)

    @staticmethod
    def _check_padding_bits(bitmap: np.ndarray, cols: int) -> None:
        """Bits past the last column of an edge tile must be 0, else values would vanish silently.

        bitmap: uint8 [..., rows, row_bytes] of tiles with `cols` columns.
        """
        if cols % 8 and (bitmap[..., cols // 8] >> (cols % 8)).any():
            raise SparsezipError(
                "bitmap marks entries outside the matrix; the weight stream is corrupted "
                "or info has the wrong shape"
            )


# ---------------------------------------------------------------------------- huff-v2

V2_TABLE_SIZE = 128  # one code length per 7-bit symbol
V2_MAX_CODE = 12  # longest Huffman code, in bits
V2_GROUP_ROWS = 8  # rows per Huffman substream
_V2_GROUPS = TILE // V2_GROUP_ROWS  # substreams of a full tile (16)
_V2_MAX_HEADER = 4 + 2 * _V2_GROUPS  # tile header bytes of a full tile (36)
_V2_MAX_SUB = (V2_GROUP_ROWS * TILE * V2_MAX_CODE + 7) // 8  # longest possible substream (1536 bytes)
_V2_MODE_FULL, _V2_MODE_E5M2 = 0, 1


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code lengths (uint8 [128], 0 = unused) of a Huffman code for `counts`, limited to 12 bits.

    Deterministic (ties broken by node creation order), so the numpy and native encoders,
    which both call this, write identical tables. When the plain Huffman code is too deep,
    counts are halved (keeping every used symbol >= 1) until it fits: rare, since 12 bits
    only overflow for symbols ~1/2000 as likely as the typical one, and cheap in bits.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (V2_TABLE_SIZE,) or (counts < 0).any():
        raise SparsezipError(f"symbol counts must be {V2_TABLE_SIZE} non-negative ints")
    while True:
        lengths = _plain_huffman_lengths(counts)
        if lengths.max(initial=0) <= V2_MAX_CODE:
            return lengths
        counts = np.where(counts > 0, (counts + 1) // 2, 0)


def _plain_huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Unlimited Huffman code lengths; a lone symbol gets length 1 (a code needs at least one bit)."""
    import heapq

    used = [int(s) for s in np.flatnonzero(counts)]
    lengths = np.zeros(V2_TABLE_SIZE, dtype=np.uint8)
    if len(used) == 1:
        lengths[used[0]] = 1
    if len(used) <= 1:
        return lengths
    # Nodes 0..127 are symbols; merged nodes get ids from 128 up. Heap entries (count, id).
    heap = [(int(counts[s]), s) for s in used]
    heapq.heapify(heap)
    parent: dict[int, int] = {}
    next_id = V2_TABLE_SIZE
    while len(heap) > 1:
        c1, a = heapq.heappop(heap)
        c2, b = heapq.heappop(heap)
        parent[a] = parent[b] = next_id
        heapq.heappush(heap, (c1 + c2, next_id))
        next_id += 1
    depth = {heap[0][1]: 0}
    for node in range(next_id - 1, V2_TABLE_SIZE - 1, -1):  # parents always have larger ids
        if node in parent:
            depth[node] = depth[parent[node]] + 1
    for s in used:
        lengths[s] = depth[parent[s]] + 1
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes (uint16 [128]) for code lengths: sorted by (length, symbol), codes increase."""
    codes = np.zeros(V2_TABLE_SIZE, dtype=np.uint16)
    code, prev_len = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev_len
        codes[s], prev_len = code, int(lengths[s])
        code += 1
    return codes


def v2_decode_table(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a code-length table; return 12-bit lookup tables (symbol uint8 [4096], length uint8 [4096]).

    Length 0 in the length table marks a bit pattern that starts no valid code.
    """
    lengths = np.asarray(lengths, dtype=np.uint8)
    if (lengths > V2_MAX_CODE).any():
        s = int(np.argmax(lengths > V2_MAX_CODE))
        raise SparsezipError(
            f"huff-v2 code table is corrupted: symbol {s} has code length {lengths[s]} (max {V2_MAX_CODE})"
        )
    used = lengths > 0
    kraft = int((1 << (V2_MAX_CODE - lengths[used].astype(np.int64))).sum())
    if kraft > 1 << V2_MAX_CODE:
        raise SparsezipError("huff-v2 code table is corrupted: the code lengths over-subscribe the code space")
    codes = canonical_codes(lengths)
    sym_of = np.zeros(1 << V2_MAX_CODE, dtype=np.uint8)
    len_of = np.zeros(1 << V2_MAX_CODE, dtype=np.uint8)
    for s in np.flatnonzero(used):  # <= 128 symbols
        shift = V2_MAX_CODE - int(lengths[s])
        lo = int(codes[s]) << shift
        sym_of[lo : lo + (1 << shift)] = s
        len_of[lo : lo + (1 << shift)] = lengths[s]
    return sym_of, len_of


@dataclass(frozen=True)
class _V2Geometry:
    """Per-tile sizes that follow from the matrix shape alone, all int64 [T]."""

    rows: np.ndarray
    cols: np.ndarray
    groups: np.ndarray  # substreams per tile: ceil(rows / 8)
    header: np.ndarray  # 4 + 2 * groups
    bitmap: np.ndarray  # rows * ceil(cols / 8)

    @classmethod
    def of(cls, grid: _Grid) -> _V2Geometry:
        n_tr, n_tc = grid.shape
        rows = np.repeat(grid.rows, n_tc)
        cols = np.tile(grid.cols, n_tr)
        groups = (rows + V2_GROUP_ROWS - 1) // V2_GROUP_ROWS
        return cls(rows, cols, groups, 4 + 2 * groups, rows * ((cols + 7) // 8))

    def group_mask(self) -> np.ndarray:
        """bool [T, 16]: which of a padded tile's 16 row groups exist (are stored)."""
        return np.arange(_V2_GROUPS)[None, :] < self.groups[:, None]


def _excl_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x) + 1, dtype=np.int64)
    np.cumsum(x, out=out[1:])
    return out


def _join(parts: list[np.ndarray], lengths: np.ndarray) -> np.ndarray:
    """Interleave per-tile segments: tile t = parts[0][its share], parts[1][its share], ...

    parts[j] holds the segments of kind j of all tiles back to back; lengths int64 [T, m]
    gives segment sizes. One label per output byte says which part it comes from.
    """
    m = lengths.shape[1]
    label = np.repeat(np.tile(np.arange(m, dtype=np.uint8), len(lengths)), lengths.reshape(-1))
    out = np.empty(len(label), dtype=np.uint8)
    for j, part in enumerate(parts):  # loop over segment kinds, not tiles
        out[label == j] = part
    return out


def _split(data: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Inverse of _join: data must be exactly lengths.sum() bytes."""
    m = lengths.shape[1]
    label = np.repeat(np.tile(np.arange(m, dtype=np.uint8), len(lengths)), lengths.reshape(-1))
    return [data[label == j] for j in range(m)]


def _pack_segments(flags: np.ndarray, counts: np.ndarray, bitorder: str) -> np.ndarray:
    """Pack bool flags into bytes, each segment of counts[i] flags starting on a fresh byte."""
    nbytes = (counts + 7) // 8
    shift = np.repeat(8 * _excl_cumsum(nbytes)[:-1] - _excl_cumsum(counts)[:-1], counts)
    bits = np.zeros(8 * int(nbytes.sum()), dtype=bool)
    bits[np.arange(len(flags)) + shift] = flags
    return np.packbits(bits, bitorder=bitorder)


def _unpack_segments(data: np.ndarray, counts: np.ndarray, what: str) -> np.ndarray:
    """Inverse of _pack_segments (LSB-first); the padding bits of each segment must be 0."""
    nbytes = (counts + 7) // 8
    bits = np.unpackbits(data, bitorder="little").view(bool)
    start = np.repeat(8 * _excl_cumsum(nbytes)[:-1], 8 * nbytes)
    keep = np.arange(len(bits)) - start < np.repeat(counts, 8 * nbytes)
    if bits[~keep].any():
        raise SparsezipError(f"huff-v2 stream is corrupted: nonzero padding bits in the {what}")
    return bits[keep]


@register_codec
class HuffCodec(Codec):
    """huff-v2: bitmap + canonical Huffman code of the 7-bit (exponent, top-2-mantissa) symbol,
    raw sign bits, and the low byte stored raw or as an E5M2 exception list. See the module
    docstring for the byte format; this class holds the numpy reference (source of truth) and
    dispatches to the native extension (sparsezip.kernels.cpu) when it is built.
    """

    name = "huff-v2"
    version = "2.0"
    codec_id = 2

    # ------------------------------------------------------------ public API

    def encode(self, weight: torch.Tensor, backend: str = "auto") -> EncodedWeight:
        bits = _weight_bits(weight)
        if self._use_native(backend):
            from .kernels import cpu

            payload, offsets = cpu.encode_v2_payload(bits, HEADER_SIZE)
            return self._finish(payload, offsets, bits.shape)
        payload, offsets = self.encode_payload(bits)
        stream = np.empty(HEADER_SIZE + len(payload), dtype=np.uint8)
        stream[HEADER_SIZE:] = payload
        return self._finish(stream, offsets, bits.shape)

    def decode(self, enc: EncodedWeight, backend: str = "auto") -> torch.Tensor:
        n, k, codec_id = _parse_info(enc.info)
        self._check_id(codec_id)
        if self._use_native(backend):
            from .kernels import cpu

            out = torch.empty((n, k), dtype=torch.float16)
            cpu.decode_into(enc.weight, enc.index, enc.info, out)
            return out
        payload = _read_stream(enc.weight, self.codec_id, check_crc=True)
        grid = _Grid.of(n, k)
        offsets = _read_index(enc.index, grid.count, len(payload))
        present, values = self._decode_tiles(payload, offsets, grid, np.arange(grid.count))
        return _scatter_tiles(present.reshape(*grid.shape, TILE, TILE), values, n, k)

    def decode_tile(self, enc: EncodedWeight, tile: int) -> torch.Tensor:
        payload, grid, t, offsets = self._open_tile(enc, tile)
        present, values = self._decode_tiles(payload, offsets, grid, np.array([t]))
        tr, tc = divmod(t, grid.shape[1])
        rows, cols = int(grid.rows[tr]), int(grid.cols[tc])
        out = np.zeros((TILE, TILE), dtype=np.uint16)
        out[present[0]] = values
        return torch.from_numpy(out[:rows, :cols].copy().view(np.int16)).view(torch.float16)

    # ------------------------------------------------------------ encode (numpy reference)

    def encode_payload(self, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reference encoder: uint16 [n, k] -> (payload uint8 [P], tile offsets int64 [T])."""
        n, k = bits.shape
        grid = _Grid.of(n, k)
        geo = _V2Geometry.of(grid)
        tiles = _to_tiles(bits, grid)  # uint16 [n_tr, n_tc, 128, 128]
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

        signs = _pack_segments(values >= 0x8000, nnz, "little")
        low_parts, low_lens, mode, n_exc = self._low_bytes((values & 0xFF).astype(np.uint8), nnz)

        head = np.zeros((grid.count, _V2_MAX_HEADER // 2), dtype="<u2")  # [T, 18]
        head[:, 0] = mode  # u8 mode, u8 reserved = 0
        head[:, 1] = n_exc
        head[:, 2:] = sub_bytes
        head_bytes = head.view(np.uint8)[np.arange(_V2_MAX_HEADER)[None, :] < geo.header[:, None]]

        parts = [head_bytes, bitmap[grid.bitmap_keep()], signs, substreams, *low_parts]
        seg = np.stack([geo.header, geo.bitmap, (nnz + 7) // 8, sub_bytes.sum(1), *low_lens], axis=1)
        body = _join(parts, seg)
        payload = np.concatenate([lengths, body])
        offsets = V2_TABLE_SIZE + _excl_cumsum(seg.sum(1))[:-1]
        return payload, offsets

    @staticmethod
    def _huffman_pack(sym: np.ndarray, counts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Huffman-code sym [N] into byte-aligned substreams of counts [S] symbols each (MSB-first).

        Returns (all substreams back to back, byte length of each [S]).
        """
        codes = canonical_codes(lengths)
        vlen = lengths[sym].astype(np.int64)  # [N]
        vcode = codes[sym].astype(np.int64)
        cum = _excl_cumsum(vlen)  # bit offset of each value in an unpadded stream
        bounds = _excl_cumsum(counts)  # first value of each substream
        sub_bits = cum[bounds[1:]] - cum[bounds[:-1]]
        sub_bytes = (sub_bits + 7) // 8
        # Bit position of each value's first code bit once substreams start on byte boundaries.
        start = cum[:-1] + np.repeat(8 * _excl_cumsum(sub_bytes)[:-1] - cum[bounds[:-1]], counts)
        stream = np.zeros(8 * int(sub_bytes.sum()), dtype=bool)
        for j in range(V2_MAX_CODE):  # loop over code bit positions, not values
            has = vlen > j
            stream[start[has] + j] = (vcode[has] >> (vlen[has] - 1 - j)) & 1
        return np.packbits(stream, bitorder="big"), sub_bytes

    @staticmethod
    def _low_bytes(low: np.ndarray, nnz: np.ndarray):
        """Per tile: the raw low bytes (mode 0) or an exception list (mode 1), whichever is smaller.

        Returns ([raw lows, exception positions as bytes, exception lows], their lengths [T] x 3,
        mode [T], exceptions per tile [T] (0 for mode 0 tiles)).
        """
        bounds = _excl_cumsum(nnz)
        is_exc = low != 0
        exc = _excl_cumsum(is_exc)[bounds[1:]] - _excl_cumsum(is_exc)[bounds[:-1]]  # [T]
        mode = np.where(3 * exc < nnz, _V2_MODE_E5M2, _V2_MODE_FULL)
        e5m2_value = np.repeat(mode == _V2_MODE_E5M2, nnz)  # [N]
        raw = low[~e5m2_value]
        listed = e5m2_value & is_exc
        pos = (np.arange(len(low)) - np.repeat(bounds[:-1], nnz))[listed].astype("<u2")
        n_exc = np.where(mode == _V2_MODE_E5M2, exc, 0)
        lens = [np.where(mode == _V2_MODE_FULL, nnz, 0), 2 * n_exc, n_exc]
        return [raw, pos.view(np.uint8), low[listed]], lens, mode, n_exc

    # ------------------------------------------------------------ decode (numpy reference)

    def _decode_tiles(self, payload: np.ndarray, offsets: np.ndarray, grid: _Grid, which: np.ndarray):
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
            own = payload[np.repeat(starts - _excl_cumsum(sizes)[:-1], sizes) + np.arange(int(sizes.sum()))]
        head_bytes, bm_bytes, rest = _split(own, np.stack([geo.header, geo.bitmap, sizes - fixed], 1))

        head = np.zeros((len(which), _V2_MAX_HEADER), dtype=np.uint8)
        head[np.arange(_V2_MAX_HEADER)[None, :] < geo.header[:, None]] = head_bytes
        mode, reserved = head[:, 0].astype(np.int64), head[:, 1]
        head16 = head.view("<u2").astype(np.int64)
        n_exc, sub_len = head16[:, 1], head16[:, 2:]  # [T], [T, 16] (0 past the tile's groups)

        bitmap = np.zeros((len(which), TILE, _ROW_BYTES), dtype=np.uint8)
        row_ok = np.arange(TILE)[None, :, None] < geo.rows[:, None, None]
        byte_ok = np.arange(_ROW_BYTES)[None, None, :] < ((geo.cols + 7) // 8)[:, None, None]
        bitmap[row_ok & byte_ok] = bm_bytes
        self._check_bitmap_padding(bitmap, geo.cols)
        group_cnt = np.bitwise_count(bitmap).reshape(len(which), _V2_GROUPS, -1).sum(-1, dtype=np.int64)
        nnz = group_cnt.sum(1)

        self._check_tile_fields(which, mode, reserved, n_exc, nnz, sub_len, group_cnt)
        lows_len = np.where(mode == _V2_MODE_FULL, nnz, 3 * n_exc)
        seg = np.stack([(nnz + 7) // 8, sub_len.sum(1), lows_len], 1)
        mismatch = seg.sum(1) != sizes - fixed
        if mismatch.any():
            i = int(np.argmax(mismatch))
            raise SparsezipError(
                f"index offsets do not match the stream: tile {which[i]} spans {sizes[i]} bytes but its "
                f"fields imply {fixed[i] + seg[i].sum()}"
            )
        sign_bytes, subs, lows = _split(rest, seg)

        signs = _unpack_segments(sign_bytes, nnz, "sign bits")
        stored = np.arange(_V2_GROUPS)[None, :] < geo.groups[:, None]
        sym = self._huffman_unpack(subs, group_cnt[stored], sub_len[stored], sym_of, len_of)
        low = self._unpack_lows(lows, mode, n_exc, nnz, which)
        values = (signs.astype(np.uint16) << 15) | (sym.astype(np.uint16) << 8) | low
        present = np.unpackbits(bitmap, axis=-1, bitorder="little").view(bool)  # [T, 128, 128]
        return present, values

    @staticmethod
    def _check_bitmap_padding(bitmap: np.ndarray, cols: np.ndarray) -> None:
        """Bits past a tile's last column must be 0. bitmap uint8 [T, 128, 16], cols [T]."""
        col = np.arange(TILE)
        pad = (col[None, :] >= cols[:, None]).reshape(len(cols), _ROW_BYTES, 8)  # [T, 16, 8]
        pad_mask = np.packbits(pad, axis=-1, bitorder="little")[:, :, 0]  # [T, 16]
        if (bitmap & pad_mask[:, None, :]).any():
            raise SparsezipError(
                "bitmap marks entries outside the matrix; the weight stream is corrupted "
                "or info has the wrong shape"
            )

    @staticmethod
    def _check_tile_fields(which, mode, reserved, n_exc, nnz, sub_len, group_cnt) -> None:
        """Header fields that can be checked before touching the tile's payload."""
        checks = [
            (mode > _V2_MODE_E5M2, "has unknown low-byte mode {}", mode),
            (reserved != 0, "has nonzero reserved byte {}", reserved),
            ((mode == _V2_MODE_FULL) & (n_exc != 0), "is in raw mode but lists {} exceptions", n_exc),
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
        first_bit = 8 * _excl_cumsum(sub_len)[:-1][order]
        pos = first_bit.copy()
        dest = _excl_cumsum(counts)[:-1][order]
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

    @staticmethod
    def _unpack_lows(lows, mode, n_exc, nnz, which) -> np.ndarray:
        """Low bytes of all values (uint16 [N]) from raw bytes or exception lists."""
        is_list = mode == _V2_MODE_E5M2
        listed = np.where(is_list, n_exc, 0)
        raw, pos_bytes, exc_low = _split(lows, np.stack([np.where(is_list, 0, nnz), 2 * listed, listed], 1))
        low = np.zeros(int(nnz.sum()), dtype=np.uint16)
        low[np.repeat(~is_list, nnz)] = raw
        if len(exc_low):
            pos = pos_bytes.view("<u2").astype(np.int64)
            tile = np.repeat(np.arange(len(nnz)), listed)
            bad = pos >= nnz[tile]
            same_tile = tile[1:] == tile[:-1]
            bad[1:] |= same_tile & (pos[1:] <= pos[:-1])
            bad |= exc_low == 0
            if bad.any():
                i = int(np.argmax(bad))
                raise SparsezipError(
                    f"huff-v2 stream is corrupted: tile {which[tile[i]]} has an invalid exception list "
                    "(positions must increase and be below the tile's value count, bytes nonzero)"
                )
            low[_excl_cumsum(nnz)[:-1][tile] + pos] = exc_low
        return low

    # ------------------------------------------------------------ shared

    def _finish(self, stream: np.ndarray, offsets: np.ndarray, shape: tuple[int, int]) -> EncodedWeight:
        """Fill the 24-byte header of stream (payload already after it) and wrap the three tensors."""
        payload = stream[HEADER_SIZE:]
        header = _HEADER.pack(MAGIC, self.codec_id, STREAM_VERSION, zlib.crc32(payload), 0, len(payload))
        stream[:HEADER_SIZE] = np.frombuffer(header, dtype=np.uint8)
        n, k = shape
        return EncodedWeight(
            weight=torch.from_numpy(stream.view(np.int8)),
            index=torch.from_numpy(np.ascontiguousarray(offsets, dtype="<i8").view(np.int8)),
            info=torch.tensor([TILE, TILE, k, n, self.codec_id], dtype=torch.int64),
        )

    @staticmethod
    def _use_native(backend: str) -> bool:
        if backend == "numpy":
            return False
        from .kernels import cpu

        if backend == "native":
            cpu.require_native()
            return True
        if backend != "auto":
            raise SparsezipError(f"backend must be 'auto', 'numpy' or 'native', got {backend!r}")
        return cpu.available()
