"""Per-tile fields that the value coders (huff-v2, nibble-v3) share: sign bits, low bytes stored raw or as an E5M2
exception list, and the bitmap padding rule. Vectorised over all tiles at once (segments of per-tile lengths).

Low bytes, per tile of nnz present values (taken in row-major order):
  mode 0: nnz bytes, (bits & 0xFF) of each present value
  mode 1 (E5M2): n_exceptions u16 positions (index among the tile's present values, strictly increasing, < nnz),
          then n_exceptions u8 low bytes (each != 0); all other low bytes are 0.
The encoder picks mode 1 when 3 * n_exceptions < nnz, else mode 0.
"""

from __future__ import annotations

import numpy as np

from ..errors import SparsezipError
from .stream import ROW_BYTES, TILE, excl_cumsum, split

MODE_FULL, MODE_E5M2 = 0, 1


def pack_segments(flags: np.ndarray, counts: np.ndarray, bitorder: str) -> np.ndarray:
    """Pack bool flags into bytes, each segment of counts[i] flags starting on a fresh byte."""
    nbytes = (counts + 7) // 8
    shift = np.repeat(8 * excl_cumsum(nbytes)[:-1] - excl_cumsum(counts)[:-1], counts)
    bits = np.zeros(8 * int(nbytes.sum()), dtype=bool)
    bits[np.arange(len(flags)) + shift] = flags
    return np.packbits(bits, bitorder=bitorder)


def unpack_segments(data: np.ndarray, counts: np.ndarray, what: str, coder: str) -> np.ndarray:
    """Inverse of pack_segments (LSB-first); the padding bits of each segment must be 0."""
    nbytes = (counts + 7) // 8
    bits = np.unpackbits(data, bitorder="little").view(bool)
    start = np.repeat(8 * excl_cumsum(nbytes)[:-1], 8 * nbytes)
    keep = np.arange(len(bits)) - start < np.repeat(counts, 8 * nbytes)
    if bits[~keep].any():
        raise SparsezipError(f"{coder} stream is corrupted: nonzero padding bits in the {what}")
    return bits[keep]


def low_bytes(low: np.ndarray, nnz: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Per tile: the raw low bytes (mode 0) or an exception list (mode 1), whichever is smaller.

    Returns ([raw lows, exception positions as bytes, exception lows], their lengths [T] x 3, mode [T],
    exceptions per tile [T] (0 for mode 0 tiles)).
    """
    bounds = excl_cumsum(nnz)
    is_exc = low != 0
    exc = excl_cumsum(is_exc)[bounds[1:]] - excl_cumsum(is_exc)[bounds[:-1]]  # [T]
    mode = np.where(3 * exc < nnz, MODE_E5M2, MODE_FULL)
    e5m2_value = np.repeat(mode == MODE_E5M2, nnz)  # [N]
    raw = low[~e5m2_value]
    listed = e5m2_value & is_exc
    pos = (np.arange(len(low)) - np.repeat(bounds[:-1], nnz))[listed].astype("<u2")
    n_exc = np.where(mode == MODE_E5M2, exc, 0)
    lens = [np.where(mode == MODE_FULL, nnz, 0), 2 * n_exc, n_exc]
    return [raw, pos.view(np.uint8), low[listed]], lens, mode, n_exc


def low_bytes_length(mode: np.ndarray, n_exc: np.ndarray, nnz: np.ndarray) -> np.ndarray:
    """Bytes of each tile's low-byte field."""
    return np.where(mode == MODE_FULL, nnz, 3 * n_exc)


def unpack_lows(lows: np.ndarray, mode: np.ndarray, n_exc: np.ndarray, nnz: np.ndarray, which: np.ndarray,
                coder: str) -> np.ndarray:
    """Low bytes of all values (uint16 [N]) from raw bytes or exception lists."""
    is_list = mode == MODE_E5M2
    listed = np.where(is_list, n_exc, 0)
    raw, pos_bytes, exc_low = split(lows, np.stack([np.where(is_list, 0, nnz), 2 * listed, listed], 1))
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
                f"{coder} stream is corrupted: tile {which[tile[i]]} has an invalid exception list "
                "(positions must increase and be below the tile's value count, bytes nonzero)"
            )
        low[excl_cumsum(nnz)[:-1][tile] + pos] = exc_low
    return low


def check_bitmap_padding(bitmap: np.ndarray, cols: np.ndarray) -> None:
    """Bits past a tile's last column must be 0. bitmap uint8 [T, 128, 16], cols [T]."""
    col = np.arange(TILE)
    pad = (col[None, :] >= cols[:, None]).reshape(len(cols), ROW_BYTES, 8)  # [T, 16, 8]
    pad_mask = np.packbits(pad, axis=-1, bitorder="little")[:, :, 0]  # [T, 16]
    if (bitmap & pad_mask[:, None, :]).any():
        raise SparsezipError(
            "bitmap marks entries outside the matrix; the weight stream is corrupted or info has the wrong shape"
        )
