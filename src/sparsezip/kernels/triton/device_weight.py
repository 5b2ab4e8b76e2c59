"""The host side of the Triton kernels: a stored weight validated and laid out for the GPU (DeviceWeight).

Device form of one stored weight (built once by prepare(), which validates it on the host):
  payload    uint8 [P + 4]   the stored stream without its 24-byte header (index offsets are relative
                             to it), plus 4 zero bytes so the Huffman peek may run past the last byte
  tile_off   int64 [T]       byte offset of each tile in the payload (the .index tensor)
  row_start  int16 [T, 128]  number, among its tile's present values, of each tile row's first value:
                             a host-side prefix sum of bitmap popcounts, so that any block of rows
                             decodes without reading the rows above it
  tile_nnz   int32 [T]       present values per tile (locates huff-v2's fields after the signs)
  lut        int16 [4096]    huff-v2: code length << 8 | symbol for every 12-bit peek (from the
                             matrix's 128 code lengths); a 1-element placeholder for bitmap-v1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ... import codec
from ...codec.bitmap_v1 import check_padding_bits
from ...codec.huff_table import V2_TABLE_SIZE, v2_decode_table
from ...codec.huff_v2 import check_tile_fields
from ...codec.stream import Grid, parse_info
from ...errors import SparsezipError

TILE = codec.TILE  # 128: kernels hard-code tl.arange(0, 128) for the tile width
BITMAP, HUFF = 1, 2  # codec ids with a kernel: bitmap-v1, huff-v2
KERNEL_CODECS = (BITMAP, HUFF)
PAD = 4  # zero bytes after the device payload, for reads just past a huff-v2 substream


@dataclass(frozen=True)
class DeviceWeight:
    """One compressed weight [n, k] on its device, validated and ready for the kernels."""

    codec_id: int
    n: int  # out_features
    k: int  # in_features
    payload: torch.Tensor  # uint8 [P + PAD]: the stream without its header, then PAD zero bytes
    tile_off: torch.Tensor  # int64 [T]: payload offset of each tile
    row_start: torch.Tensor  # int16 [T, 128]: value number of each tile row's first value
    tile_nnz: torch.Tensor  # int32 [T]: present values per tile
    lut: torch.Tensor  # int16 [4096]: huff-v2 12-bit peek -> code length << 8 | symbol ([1] unused for v1)

    @property
    def device(self) -> torch.device:
        return self.payload.device

    @property
    def tile_grid(self) -> tuple[int, int]:
        """(tile rows, tile columns)."""
        return -(-self.n // TILE), -(-self.k // TILE)

    @property
    def nbytes(self) -> int:
        """Bytes of the device form: what one pass of the kernels reads (payload plus tables)."""
        return sum(t.numel() * t.element_size() for t in self.tables())

    def tables(self) -> tuple[torch.Tensor, ...]:
        """The kernels' leading arguments, in their order."""
        return self.payload, self.tile_off, self.row_start, self.tile_nnz, self.lut


def prepare(enc: codec.EncodedWeight, device: torch.device | str, verify: bool = True) -> DeviceWeight:
    """Validate one stored weight (.weight, .index, .info) on the host and move it to `device`.

    Always checked: header, CRC, index, and every tile's fields and bitmap against its size, so the
    kernels never read outside a tile. huff-v2 codes, sign padding and exception lists can only be
    checked by decoding: verify=True (the default) runs the reference decoder once for that; with
    verify=False a corrupt stream (with a valid CRC) decodes to wrong values instead of an error.
    Raises SparsezipError for anything corrupt or for a codec without a kernel.
    """
    coder = codec.codec_for_id(parse_info(enc.info)[2])  # unknown ids fail here with the list of known codecs
    if coder.codec_id not in KERNEL_CODECS:
        raise SparsezipError(f"codec {coder.name!r} (id {coder.codec_id}) has no Triton kernel; "
                             "use the torch reference decode")
    full_check = verify and coder.codec_id == HUFF
    if full_check:
        coder.decode(enc)  # raises on any inconsistency; the result is not needed
    opened = coder.open(enc, check_crc=not full_check)
    n, k, codec_id, payload, offsets, grid = opened.n, opened.k, opened.codec_id, opened.payload, \
        opened.offsets, opened.grid
    if codec_id == BITMAP:
        counts = _bitmap_counts(payload, offsets, grid)
        lut = np.zeros(1, dtype=np.int16)
    else:
        counts, lut = _huff_counts(payload, offsets, grid)
    row_start = (np.cumsum(counts, axis=1) - counts).astype(np.int16)  # [T, 128], < 128 * 128 fits
    nnz = counts.sum(axis=1, dtype=np.int32)  # [T]

    def move(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    # PAD zero bytes after the payload let the Huffman peek run unmasked (see _huff_symbols).
    padded = torch.zeros(len(payload) + PAD, dtype=torch.uint8, device=device)
    padded[: len(payload)] = torch.from_numpy(payload)
    return DeviceWeight(codec_id, n, k, padded, move(offsets), move(row_start), move(nnz), move(lut))


def _tile_sizes(payload: np.ndarray, offsets: np.ndarray, first: int) -> np.ndarray:
    """Bytes of each tile, int64 [T], from the index; tile 0 must start at `first`."""
    if offsets[0] != first:
        raise SparsezipError(f"index offsets do not match the stream: tile 0 starts at {offsets[0]}, not {first}")
    return np.append(offsets[1:], len(payload)) - offsets


def _bitmap_counts(payload: np.ndarray, offsets: np.ndarray, grid: Grid) -> np.ndarray:
    """bitmap-v1: check every tile's span against its bitmap; return values per tile row, int32 [T, 128]."""
    bm_len = grid.bitmap_bytes()  # [T]
    sizes = _tile_sizes(payload, offsets, 0)
    _first_bad(sizes < bm_len, lambda t: f"tile {t} spans {sizes[t]} bytes, less than its {bm_len[t]}-byte bitmap")
    bitmap = _gather_bitmaps(payload, offsets, grid)
    counts = _row_counts(bitmap, grid)  # [T, 128]
    nnz = counts.sum(axis=1, dtype=np.int64)  # [T]
    _first_bad(
        sizes != bm_len + 2 * nnz,
        lambda t: f"tile {t} spans {sizes[t]} bytes but its bitmap implies {bm_len[t]} + 2 * {nnz[t]}",
    )
    _check_padding(bitmap, grid)
    return counts


def _huff_counts(payload: np.ndarray, offsets: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """huff-v2: check the code table and every tile's fields against its span.

    Returns (values per tile row int32 [T, 128], peek table int16 [4096] = code length << 8 | symbol).
    """
    table = V2_TABLE_SIZE
    if len(payload) < table:
        raise SparsezipError(
            f"wrong weight stream length: payload of {len(payload)} bytes is shorter than the {table}-byte code table"
        )
    sym_of, len_of = v2_decode_table(payload[:table])  # validates the code lengths
    lut = (len_of.astype(np.int16) << 8) | sym_of
    sizes = _tile_sizes(payload, offsets, table)

    rows = np.repeat(grid.rows, grid.shape[1])  # [T]
    groups = -(-rows // 8)  # substreams per tile
    header = 4 + 2 * groups  # mode, reserved, n_exceptions, sub_len[groups]
    fixed = header + grid.bitmap_bytes()
    _first_bad(sizes < fixed, lambda t: f"tile {t} spans {sizes[t]} bytes, less than its {fixed[t]}-byte header "
                                        "and bitmap")
    full = 4 + 2 * (TILE // 8)
    in_header = np.arange(full)[None, :] < header[:, None]  # [T, 36]
    head = np.zeros((grid.count, full), dtype=np.uint8)
    head[in_header] = payload[(offsets[:, None] + np.arange(full)[None, :])[in_header]]
    head16 = head.view("<u2").astype(np.int64)  # [T, 18]
    mode, n_exc, sub_len = head[:, 0].astype(np.int64), head16[:, 1], head16[:, 2:]

    bitmap = _gather_bitmaps(payload, offsets + header, grid)
    _check_padding(bitmap, grid)
    counts = _row_counts(bitmap, grid)  # [T, 128]
    group_cnt = counts.reshape(grid.count, TILE // 8, 8).sum(axis=2, dtype=np.int64)  # [T, 16]
    nnz = group_cnt.sum(axis=1)
    check_tile_fields(np.arange(grid.count), mode, head[:, 1], n_exc, nnz, sub_len, group_cnt)
    implied = fixed + (nnz + 7) // 8 + sub_len.sum(axis=1) + np.where(mode == 0, nnz, 3 * n_exc)
    _first_bad(implied != sizes, lambda t: f"tile {t} spans {sizes[t]} bytes but its fields imply {implied[t]}")
    return counts, lut


def _row_counts(bitmap: np.ndarray, grid: Grid) -> np.ndarray:
    """Values per tile row, int32 [T, 128], of bitmaps uint8 [n_tr, n_tc, 128, 16]."""
    return np.bitwise_count(bitmap).sum(axis=-1, dtype=np.int32).reshape(grid.count, TILE)


def _check_padding(bitmap: np.ndarray, grid: Grid) -> None:
    """Set bits past the matrix's last column would make values vanish: reject them."""
    check_padding_bits(bitmap[:, -1], int(grid.cols[-1]))


def _gather_bitmaps(payload: np.ndarray, bm_starts: np.ndarray, grid: Grid) -> np.ndarray:
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
