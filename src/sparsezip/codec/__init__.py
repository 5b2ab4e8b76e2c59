"""Lossless tile codecs for pruned fp16 linear weights: the public API.

`stream` is the layer every coder shares (header, CRC, `.info`, `.index`, tiling); `registry` keys the coders
by the id each stream stores; `bitmap_v1`, `huff_v2` and `nibble_v3` are the coders (`values` holds the fields the
last two share); `native` is their path through the CPU extension. Encode and decode work on whole matrices with array ops (no Python loop over tiles, rows or
elements). Everything else in sparsezip reaches the codec kernels through the functions here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import SparsezipError
from . import bitmap_v1, huff_v2, native, nibble_v3  # noqa: F401  (importing a coder registers it)
from .registry import CODECS, Codec, register_codec
from .stream import HEADER_SIZE, TILE, EncodedWeight, OpenStream, describe, n_tiles, parse_info

DEFAULT_CODEC = "nibble-v3"  # the fastest to multiply from; huff-v2 is ~6% smaller

__all__ = ["CODECS", "DEFAULT_CODEC", "HEADER_SIZE", "TILE", "Codec", "EncodedWeight", "OpenedWeight", "codec_for_id",
           "decode", "decode_into", "decode_tile", "encode", "get_codec", "linear", "n_tiles", "native_stream",
           "open_weight", "register_codec"]


def get_codec(name: str) -> Codec:
    """A coder by its name, e.g. "bitmap-v1"."""
    return CODECS.get(name)


def codec_for_id(codec_id: int) -> Codec:
    """A coder by the numeric id stored in info[4] and in the stream header."""
    return CODECS.for_id(codec_id)


def encode(weight: torch.Tensor, codec: str = "bitmap-v1") -> EncodedWeight:
    """Compress a 2-D float16 weight [n, k] with the named coder."""
    return get_codec(codec).encode(weight)


def decode(weight: torch.Tensor, index: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """Decompress a stored weight to CPU float16 [n, k]; the coder is chosen by info[4]."""
    enc = EncodedWeight(weight, index, info)
    return _coder_of(enc).decode(enc)


def decode_tile(weight: torch.Tensor, index: torch.Tensor, info: torch.Tensor, tile: int) -> torch.Tensor:
    """Decompress tile number `tile` only (seeks through the index) to float16 [rows_t, cols_t].

    The payload CRC is not checked here (that would read the whole stream, defeating random
    access); the tile's own bitmap/offset consistency is. Use decode() for a verified read.
    """
    enc = EncodedWeight(weight, index, info)
    return _coder_of(enc).decode_tile(enc, tile)


def decode_into(enc: EncodedWeight, out: torch.Tensor, check_crc: bool = True) -> torch.Tensor:
    """Decode into the preallocated CPU tensor `out` [n, k] (float16 or float32, contiguous) without allocating
    the matrix when the native kernels serve the coder; returns `out`.

    The whole stream is validated as in decode(); check_crc=False skips only the CRC (for a hot path whose
    stream was verified once already).
    """
    coder = _coder_of(enc)
    opened = coder.open(enc, check_crc=check_crc)
    native.check_out(out, opened.n, opened.k)
    if native.supports(opened.codec_id):
        return native.decode_into(opened, out)
    return out.copy_(coder.decode(enc))


@dataclass(frozen=True)
class OpenedWeight:
    """A stored weight whose info, header and index were validated once, for the many products of a decode loop:
    linear() then skips that work (about 7 us a call, as much as a small matrix's product)."""

    stored: EncodedWeight
    stream: OpenStream


def open_weight(enc: EncodedWeight, check_crc: bool = True) -> OpenedWeight:
    """Validate `enc` once (the CRC too unless told otherwise) for repeated calls of linear()."""
    return OpenedWeight(enc, _coder_of(enc).open(enc, check_crc=check_crc))


def native_stream(weight: OpenedWeight) -> OpenStream | None:
    """The validated stream (codec id, payload, tile offsets) when the native kernels multiply from its coder's tiles,
    as linear() does; None when linear() decodes the matrix first."""
    return weight.stream if native.supports(weight.stream.codec_id) else None


def linear(x: torch.Tensor, enc: EncodedWeight | OpenedWeight, bias: torch.Tensor | None = None,
           check_crc: bool = True) -> torch.Tensor:
    """y = x W^T (+ bias) straight from the compressed tiles, W never materialised: for the few rows of a decode
    step, each tile is decoded once and multiplied with every row.

    x: float32 [k] or [m, k] on CPU; returns float32 [n] or [m, n]. Each tile row's dot product runs in fp32 in
    the kernels' shared summation order (results may differ from F.linear in the last bits). Without the
    extension, or for a coder it lacks, it decodes and calls F.linear. An OpenedWeight skips the validation that
    open_weight() did (check_crc is then ignored).
    """
    if isinstance(enc, OpenedWeight):
        opened, enc = enc.stream, enc.stored
    else:
        opened = _coder_of(enc).open(enc, check_crc=check_crc)
    n, k = opened.n, opened.k
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu" or \
            x.dim() not in (1, 2) or x.shape[-1] != k or x.numel() == 0:
        raise SparsezipError(f"x must be a CPU float32 tensor of shape [{k}] or [m, {k}], got {describe(x)}")
    if not native.supports(opened.codec_id):
        weight = decode_into(enc, torch.empty((n, k), dtype=torch.float32), check_crc=False)
        return F.linear(x, weight, bias)
    y = native.linear(opened, x.reshape(-1, k)).view(*x.shape[:-1], n)
    return y if bias is None else y.add_(bias)


def _coder_of(enc: EncodedWeight) -> Codec:
    return codec_for_id(parse_info(enc.info)[2])
