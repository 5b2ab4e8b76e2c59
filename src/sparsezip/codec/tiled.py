"""What the entropy coders (huff-v2, nibble-v3) share: encode and decode through the native kernels when they are
built, else through the coder's numpy reference (the source of truth, which the tests hold the native code to);
one tile decoded from its own bytes alone."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch

from . import native
from .registry import Codec
from .stream import HEADER_SIZE, TILE, EncodedWeight, Grid, pack, scatter_tiles, weight_bits


class TiledCodec(Codec):
    """A coder with a native encoder and decoder and a numpy reference of both; subclasses supply the three hooks."""

    @abstractmethod
    def native_stream(self, bits: np.ndarray) -> tuple[bytearray, bytes]:
        """The native encoder: uint16 [n, k] -> (HEADER_SIZE zero bytes + payload, tile offsets)."""

    @abstractmethod
    def reference_payload(self, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The numpy encoder: uint16 [n, k] -> (payload uint8 [P], tile offsets int64 [T])."""

    @abstractmethod
    def reference_tiles(self, payload: np.ndarray, offsets: np.ndarray, grid: Grid,
                        tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The numpy decoder of tiles `tiles`: (presence bool [len(tiles), 128, 128], values uint16 in order)."""

    def encode(self, weight: torch.Tensor, backend: str = "auto") -> EncodedWeight:
        bits = weight_bits(weight)
        if native.chosen(backend, self.codec_id):
            stream, offsets = self.native_stream(bits)
        else:
            payload, offsets = self.reference_payload(bits)
            stream = np.empty(HEADER_SIZE + len(payload), dtype=np.uint8)
            stream[HEADER_SIZE:] = payload
        return pack(stream, offsets, bits.shape, self.codec_id)

    def decode(self, enc: EncodedWeight, backend: str = "auto") -> torch.Tensor:
        opened = self.open(enc, check_crc=True)
        if native.chosen(backend, self.codec_id):
            return native.decode_into(opened, torch.empty((opened.n, opened.k), dtype=torch.float16))
        grid = opened.grid
        present, values = self.reference_tiles(opened.payload, opened.offsets, grid, np.arange(grid.count))
        return scatter_tiles(present.reshape(*grid.shape, TILE, TILE), values, opened.n, opened.k)

    def decode_tile(self, enc: EncodedWeight, tile: int) -> torch.Tensor:
        opened = self.open(enc, check_crc=False)  # the CRC would read the whole stream
        grid = opened.grid
        t = grid.tile_number(tile)
        present, values = self.reference_tiles(opened.payload, opened.offsets, grid, np.array([t]))
        tr, tc = divmod(t, grid.shape[1])
        out = np.zeros((TILE, TILE), dtype=np.uint16)
        out[present[0]] = values
        rows, cols = int(grid.rows[tr]), int(grid.cols[tc])
        return torch.from_numpy(out[:rows, :cols].copy().view(np.int16)).view(torch.float16)
