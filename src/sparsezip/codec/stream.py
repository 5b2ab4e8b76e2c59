"""The stream layer shared by every tile codec: the 24-byte header, the CRC, `.info`, `.index` and the tiling.

Stored tensors per compressed weight W [n, k] (out_features x in_features):
  .weight  int8 [HEADER_SIZE + payload]  header, then the coder's payload
  .index   int8 [8 * n_tiles]            little-endian int64 offset of each tile in the payload
  .info    int64 [5]                     [tile_k, tile_n, k, n, codec_id]

Stream header (HEADER_SIZE = 24 bytes, little-endian):
  0  4s  magic b"SPZW"
  4  u16 codec id (must equal info[4]; it selects the coder through the registry)
  6  u16 stream format version (1)
  8  u32 zlib.crc32 of the payload
  12 u32 reserved, must be 0
  16 u64 payload length in bytes (a payload may exceed 4 GiB, hence 64 bits)

W is cut into 128 x 128 tiles in row-major tile order (t = tile_row * n_tile_cols + tile_col; edge tiles are
smaller). Each tile is self-describing and the index stores its byte offset, so CPU threads and GPU blocks
decode tiles independently. "Present" means bit pattern != 0x0000 in every coder, so -0.0, subnormals, inf and
NaN payloads are stored exactly. Bitmaps: one bit per entry, each tile row ceil(cols_t / 8) bytes, LSB first
(bit j of byte b = column 8b + j).
"""

from __future__ import annotations

import operator
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SparsezipError

TILE = 128
MAGIC = b"SPZW"
STREAM_VERSION = 1
HEADER = struct.Struct("<4sHHIIQ")  # magic, codec_id, version, crc32, reserved, payload_len
HEADER_SIZE = HEADER.size  # 24
MAX_DIM = 2**31 - 1  # keeps every size/offset computation far from int64 overflow
ROW_BYTES = TILE // 8  # bitmap bytes of one full tile row


@dataclass(frozen=True)
class EncodedWeight:
    """The three tensors stored for one compressed linear weight."""

    weight: torch.Tensor  # int8 [HEADER_SIZE + payload bytes]
    index: torch.Tensor  # int8 [8 * n_tiles]
    info: torch.Tensor  # int64 [5]: tile_k, tile_n, k, n, codec_id

    @property
    def shape(self) -> tuple[int, int]:
        """[out_features, in_features] as info states it (validated by parse_info)."""
        n, k, _ = parse_info(self.info)
        return n, k

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.index, self.info))


def n_tiles(n: int, k: int) -> int:
    """Number of 128 x 128 tiles (edge tiles included) covering an [n, k] matrix."""
    if not (isinstance(n, int) and isinstance(k, int) and n >= 1 and k >= 1):
        raise SparsezipError(f"matrix shape must be two positive ints, got ({n!r}, {k!r})")
    return -(-n // TILE) * -(-k // TILE)


def edge_sizes(size: int) -> np.ndarray:
    """Extent of each tile along one axis: 128, ..., 128, remainder. int64 [tiles along axis]."""
    sizes = np.full(-(-size // TILE), TILE, dtype=np.int64)
    sizes[-1] = size - TILE * (len(sizes) - 1)
    return sizes


@dataclass(frozen=True)
class Grid:
    """Tile geometry of an [n, k] matrix."""

    rows: np.ndarray  # int64 [n_tr] rows in each tile row
    cols: np.ndarray  # int64 [n_tc] columns in each tile column

    @classmethod
    def of(cls, n: int, k: int) -> Grid:
        return cls(edge_sizes(n), edge_sizes(k))

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
        byte_ok = np.arange(ROW_BYTES)[None, None, None, :] < ((self.cols + 7) // 8)[None, :, None, None]
        return row_ok & byte_ok

    def tile_number(self, tile: object) -> int:
        """A validated tile number (for decode_tile)."""
        try:
            t = operator.index(tile)
        except TypeError:
            raise SparsezipError(f"tile must be an int, got {type(tile).__name__}") from None
        if not 0 <= t < self.count:
            raise SparsezipError(f"tile {t} is out of range; this weight has {self.count} tiles")
        return t


def describe(t: object) -> str:
    return f"{t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def weight_bits(weight: torch.Tensor) -> np.ndarray:
    """uint16 bit patterns [n, k] of a validated 2-D float16 weight (no copy if already CPU-contiguous)."""
    if not isinstance(weight, torch.Tensor):
        raise SparsezipError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype != torch.float16:
        raise SparsezipError(f"weight must be torch.float16, got {weight.dtype}; convert with .half() first")
    if weight.dim() != 2:
        raise SparsezipError(f"weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
    n, k = weight.shape
    if n == 0 or k == 0 or n > MAX_DIM or k > MAX_DIM:
        raise SparsezipError(f"weight shape {list(weight.shape)} is not supported (each dim must be 1..{MAX_DIM})")
    return weight.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def as_bytes(t: torch.Tensor, what: str) -> np.ndarray:
    """uint8 view [len] of a 1-D int8 tensor."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or t.dim() != 1:
        raise SparsezipError(f"{what} must be a 1-D torch.int8 tensor, got {describe(t)}")
    return t.detach().cpu().contiguous().numpy().view(np.uint8)


def parse_info(info: torch.Tensor) -> tuple[int, int, int]:
    """Validate info and return (n, k, codec_id)."""
    if not isinstance(info, torch.Tensor) or info.dtype != torch.int64 or tuple(info.shape) != (5,):
        raise SparsezipError(
            "info must be a torch.int64 tensor of shape [5] "
            f"(tile_k, tile_n, in_features, out_features, codec_id), got {describe(info)}"
        )
    tile_k, tile_n, k, n, codec_id = info.tolist()
    if tile_k != TILE or tile_n != TILE:
        raise SparsezipError(f"info has tile size {tile_k}x{tile_n}; only {TILE}x{TILE} is supported")
    if not (1 <= k <= MAX_DIM and 1 <= n <= MAX_DIM):
        raise SparsezipError(f"info has invalid matrix shape: out_features={n}, in_features={k}")
    return n, k, codec_id


def read_stream(weight: torch.Tensor, codec_id: int, *, check_crc: bool) -> np.ndarray:
    """Validate the stream header (and optionally the CRC); return the payload, uint8 [P]."""
    stream = as_bytes(weight, "weight stream")
    if len(stream) < HEADER_SIZE:
        raise SparsezipError(
            f"wrong weight stream length: {len(stream)} bytes is shorter than the {HEADER_SIZE}-byte header"
        )
    magic, hdr_codec, version, crc, reserved, payload_len = HEADER.unpack(stream[:HEADER_SIZE].tobytes())
    if magic != MAGIC:
        raise SparsezipError(f"weight stream has bad magic {magic!r} (expected {MAGIC!r}); not a sparsezip weight")
    if version != STREAM_VERSION:
        raise SparsezipError(f"weight stream format version {version} is not supported (expected {STREAM_VERSION})")
    if hdr_codec != codec_id:
        raise SparsezipError(f"weight stream header says codec id {hdr_codec} but info says {codec_id}")
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


def read_index(index: torch.Tensor, count: int, payload_len: int) -> np.ndarray:
    """Validate the index length and offset range; return tile offsets, int64 [count]."""
    raw = as_bytes(index, "index")
    if len(raw) != 8 * count:
        raise SparsezipError(f"index has {len(raw)} bytes, expected 8 * n_tiles = {8 * count}")
    offsets = raw.view("<i8").astype(np.int64)
    outside = (offsets < 0) | (offsets > payload_len)
    if outside.any():
        t = int(np.argmax(outside))
        raise SparsezipError(f"index offset of tile {t} ({offsets[t]}) lies outside the {payload_len}-byte payload")
    return offsets


@dataclass(frozen=True)
class OpenStream:
    """A stored weight whose info, header and index were validated: what every decoder starts from."""

    n: int
    k: int
    codec_id: int
    payload: np.ndarray  # uint8 [P]
    offsets: np.ndarray  # int64 [T]

    @property
    def grid(self) -> Grid:
        return Grid.of(self.n, self.k)


def open_stream(enc: EncodedWeight, *, check_crc: bool = True) -> OpenStream:
    """Validate info, header (CRC unless told otherwise) and index of a stored weight."""
    n, k, codec_id = parse_info(enc.info)
    payload = read_stream(enc.weight, codec_id, check_crc=check_crc)
    offsets = read_index(enc.index, n_tiles(n, k), len(payload))
    return OpenStream(n, k, codec_id, payload, offsets)


def pack(stream: np.ndarray, offsets: np.ndarray, shape: tuple[int, int], codec_id: int) -> EncodedWeight:
    """Fill the 24-byte header of `stream` (its payload already after it) and wrap the three tensors."""
    payload = stream[HEADER_SIZE:]
    header = HEADER.pack(MAGIC, codec_id, STREAM_VERSION, zlib.crc32(payload), 0, len(payload))
    stream[:HEADER_SIZE] = np.frombuffer(header, dtype=np.uint8)
    n, k = shape
    return EncodedWeight(
        weight=torch.from_numpy(stream.view(np.int8)),
        index=torch.from_numpy(np.ascontiguousarray(offsets, dtype="<i8").view(np.int8)),
        info=torch.tensor([TILE, TILE, k, n, codec_id], dtype=torch.int64),
    )


# ---------------------------------------------------------------------------- array helpers of the coders


def to_tiles(bits: np.ndarray, grid: Grid) -> np.ndarray:
    """uint16 [n, k] -> zero-padded [n_tr, n_tc, 128, 128]; a strided view unless padding is needed."""
    n_tr, n_tc = grid.shape
    n, k = bits.shape
    if n % TILE or k % TILE:
        padded = np.zeros((n_tr * TILE, n_tc * TILE), dtype=bits.dtype)
        padded[:n, :k] = bits
        bits = padded
    return bits.reshape(n_tr, TILE, n_tc, TILE).transpose(0, 2, 1, 3)


def scatter_tiles(present: np.ndarray, values: np.ndarray, n: int, k: int) -> torch.Tensor:
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


def excl_cumsum(x: np.ndarray) -> np.ndarray:
    """[0, x0, x0 + x1, ...]: int64 [len(x) + 1]."""
    out = np.zeros(len(x) + 1, dtype=np.int64)
    np.cumsum(x, out=out[1:])
    return out


def segment_mask(first: np.ndarray, total: np.ndarray) -> np.ndarray:
    """bool [sum(total)]: per segment, `first` Trues then `total - first` Falses.

    Marks the bitmap bytes (vs value bytes) of every tile in a payload in one pass.
    """
    lengths = np.stack([first, total - first], axis=1).reshape(-1)
    return np.repeat(np.tile(np.array([True, False]), len(first)), lengths)


def join(parts: list[np.ndarray], lengths: np.ndarray) -> np.ndarray:
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


def split(data: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Inverse of join: data must be exactly lengths.sum() bytes."""
    m = lengths.shape[1]
    label = np.repeat(np.tile(np.arange(m, dtype=np.uint8), len(lengths)), lengths.reshape(-1))
    return [data[label == j] for j in range(m)]
