"""Codec bitmap-v1 (id 1): per tile, the presence bitmap, then the present values as little-endian u16 in
row-major order. The index holds payload offsets (tile 0 at 0). A full tile costs 2048 + 2 * nnz bytes."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SparsezipError
from .registry import Codec, register_codec
from .stream import (HEADER_SIZE, ROW_BYTES, TILE, EncodedWeight, Grid, pack, scatter_tiles, segment_mask, to_tiles,
                     weight_bits)


@register_codec
class BitmapCodec(Codec):
    name = "bitmap-v1"
    version = "1.0"
    codec_id = 1

    def encode(self, weight: torch.Tensor) -> EncodedWeight:
        bits = weight_bits(weight)  # uint16 [n, k]
        n, k = bits.shape
        grid = Grid.of(n, k)
        tiles = to_tiles(bits, grid)  # uint16 [n_tr, n_tc, 128, 128]
        present = np.not_equal(tiles, 0, order="C")  # bool [n_tr, n_tc, 128, 128]
        bitmap = np.packbits(present, axis=-1, bitorder="little")  # uint8 [n_tr, n_tc, 128, 16]

        bm_len = grid.bitmap_bytes()  # [T]
        nnz = np.bitwise_count(bitmap).reshape(grid.count, -1).sum(axis=1, dtype=np.int64)  # [T]
        sizes = bm_len + 2 * nnz  # [T] bytes per tile
        offsets = np.cumsum(sizes) - sizes  # [T] exclusive prefix sum

        stream = np.empty(HEADER_SIZE + int(sizes.sum()), dtype=np.uint8)
        payload = stream[HEADER_SIZE:]  # [P]
        in_bitmap = segment_mask(bm_len, sizes)  # bool [P]
        payload[in_bitmap] = bitmap[grid.bitmap_keep()]
        # Boolean indexing walks the (strided) tile view in tile-major, row-major order. It is
        # slower than np.compress but needs no 8-byte-per-value index array.
        values = tiles[present]  # uint16 [nnz]
        del tiles, present
        np.logical_not(in_bitmap, out=in_bitmap)  # now marks value bytes
        payload[in_bitmap] = values.astype("<u2", copy=False).view(np.uint8)
        return pack(stream, offsets, (n, k), self.codec_id)

    def decode(self, enc: EncodedWeight) -> torch.Tensor:
        opened = self.open(enc, check_crc=True)
        n, k, payload, offsets, grid = opened.n, opened.k, opened.payload, opened.offsets, opened.grid
        n_tr, n_tc = grid.shape

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

        in_bitmap = segment_mask(bm_len, sizes)  # bool [P]
        bitmap = np.zeros((n_tr, n_tc, TILE, ROW_BYTES), dtype=np.uint8)  # edge tiles zero-padded
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
        check_padding_bits(bitmap[:, -1], int(grid.cols[-1]))

        present = np.unpackbits(bitmap, axis=-1, bitorder="little").view(bool)  # [n_tr, n_tc, 128, 128]
        np.logical_not(in_bitmap, out=in_bitmap)  # now marks value bytes
        values = payload[in_bitmap].view("<u2").astype(np.uint16, copy=False)  # [nnz]
        del in_bitmap
        return scatter_tiles(present, values, n, k)

    def decode_tile(self, enc: EncodedWeight, tile: int) -> torch.Tensor:
        opened = self.open(enc, check_crc=False)  # the CRC would read the whole stream
        payload, offsets, grid = opened.payload, opened.offsets, opened.grid
        t = grid.tile_number(tile)
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
        check_padding_bits(bitmap, cols)
        present = np.unpackbits(bitmap, axis=-1, count=cols, bitorder="little").view(bool)  # [rows, cols]
        out = np.zeros((rows, cols), dtype=np.uint16)
        out[present] = np.frombuffer(payload[start + bm_len : end].tobytes(), dtype="<u2")
        return torch.from_numpy(out.view(np.int16)).view(torch.float16)


def check_padding_bits(bitmap: np.ndarray, cols: int) -> None:
    """Bits past the last column of an edge tile must be 0, else values would vanish silently.

    bitmap: uint8 [..., rows, row_bytes] of tiles with `cols` columns.
    """
    if cols % 8 and (bitmap[..., cols // 8] >> (cols % 8)).any():
        raise SparsezipError(
            "bitmap marks entries outside the matrix; the weight stream is corrupted or info has the wrong shape"
        )
