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
        # Scatter straight into the final [Np, Kp] layout through a tile-ordered view: no
        # per-tile temporaries, no index array (flat indices would cost 8 bytes per value).
        full = torch.zeros((n_tr * TILE, n_tc * TILE), dtype=torch.int16)  # [Np, Kp]
        full.view(n_tr, TILE, n_tc, TILE).permute(0, 2, 1, 3).masked_scatter_(
            torch.from_numpy(present), torch.from_numpy(values.view(np.int16))
        )
        if full.shape != (n, k):
            full = full[:n, :k].contiguous()
        return full.view(torch.float16)

    def decode_tile(self, enc: EncodedWeight, tile: int) -> torch.Tensor:
        n, k, codec_id = _parse_info(enc.info)
        self._check_id(codec_id)
        payload = _read_stream(enc.weight, self.codec_id, check_crc=False)
        grid = _Grid.of(n, k)
        try:
            t = operator.index(tile)
        except TypeError:
            raise SparsezipError(f"tile must be an int, got {type(tile).__name__}") from None
        if not 0 <= t < grid.count:
            raise SparsezipError(f"tile {t} is out of range; this weight has {grid.count} tiles")
        offsets = _read_index(enc.index, grid.count, len(payload))
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

    def _check_id(self, codec_id: int) -> None:
        if codec_id != self.codec_id:
            raise SparsezipError(f"info codec id {codec_id} does not belong to codec {self.name!r}")

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
