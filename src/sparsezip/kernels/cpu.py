"""Native CPU path for the tile codecs: a thin wrapper around the C extension ``_cpucodec``.

The extension is optional (built by setup.py when a C compiler is present). Without it every
function here still works through the numpy reference codec in sparsezip.codec, only slower.
Work is spread over tiles on as many threads as this process may use (its CPU affinity).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from .. import codec as _codec
from ..errors import SparsezipError

logger = logging.getLogger("sparsezip")

try:  # loaded once; the handle never changes afterwards
    from . import _cpucodec as _native
except ImportError as exc:  # not built (no compiler) or built for another Python
    _native = None
    logger.debug("native codec extension not available (%s); using the numpy codec", exc)

_OUT_KIND = {torch.float16: 0, torch.float32: 1}
_LINEAR = 2  # the extension's output kind for the fused linear
_NATIVE_CODECS = (1, 2)  # bitmap-v1 decode, huff-v2 encode and decode


def available() -> bool:
    """True when the C extension is loaded."""
    return _native is not None


def require_native() -> None:
    if _native is None:
        raise SparsezipError("the native codec extension is not built; reinstall with `pip install -e .` "
                             "on a machine with a C compiler, or use backend='numpy'")


def simd() -> str:
    """Which expand variant the extension picked for this CPU ('ssse3+f16c' or 'portable'), or 'none'."""
    return _native.simd() if _native is not None else "none"


def threads() -> int:
    """Threads to use: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def encode_v2_payload(bits: np.ndarray, prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """huff-v2 encode of uint16 [n, k] bit patterns (C-contiguous).

    Returns (stream uint8 [prefix + P]: `prefix` zero bytes then the payload; tile offsets int64 [T]).
    The code table comes from the same Python function as the numpy encoder's, so both agree byte for byte.
    """
    require_native()
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    n, k = bits.shape
    counts = np.frombuffer(_native.v2_histogram(bits, n, k, threads()), dtype=np.int64)
    lengths = _codec.huffman_lengths(counts)
    stream, index = _native.v2_encode(bits, n, k, lengths.tobytes(), prefix, threads())
    return np.frombuffer(stream, dtype=np.uint8), np.frombuffer(index, dtype="<i8").copy()


def decode_into(weight: torch.Tensor, index: torch.Tensor, info: torch.Tensor, out: torch.Tensor,
                check_crc: bool = True) -> torch.Tensor:
    """Decode a stored weight into the preallocated CPU tensor `out` [n, k] (float16 or float32,
    contiguous) without allocating the matrix; returns `out`.

    The whole stream is validated as in codec.decode(); check_crc=False skips only the CRC (for a
    hot path whose stream was verified once already).
    """
    n, k, codec_id = _codec._parse_info(info)
    chosen = _codec.codec_for_id(codec_id)
    _check_out(out, n, k)
    if _native is None or codec_id not in _NATIVE_CODECS:
        out.copy_(chosen.decode(_codec.EncodedWeight(weight, index, info)))
        return out
    payload = _codec._read_stream(weight, codec_id, check_crc=check_crc)
    offsets = _codec._read_index(index, _codec.n_tiles(n, k), len(payload))
    try:
        _native.decode(codec_id, payload, offsets, n, k, out.numpy(), _OUT_KIND[out.dtype], threads())
    except ValueError as exc:
        raise SparsezipError(str(exc)) from None
    return out


def decode(weight: torch.Tensor, index: torch.Tensor, info: torch.Tensor, dtype: torch.dtype = torch.float16,
           check_crc: bool = True) -> torch.Tensor:
    """Decode to a new CPU tensor [n, k] of `dtype` (float16 or float32)."""
    n, k, _ = _codec._parse_info(info)
    if dtype not in _OUT_KIND:
        raise SparsezipError(f"decode writes float16 or float32, not {dtype}")
    return decode_into(weight, index, info, torch.empty((n, k), dtype=dtype), check_crc=check_crc)


def linear(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, info: torch.Tensor,
           bias: torch.Tensor | None = None, check_crc: bool = True) -> torch.Tensor:
    """Batch-1 y = x W^T (+ bias) straight from the compressed tiles, W never materialised.

    x: float32 [k] or [1, k] on CPU; returns float32 [n] or [1, n]. Each tile row's dot product runs in
    fp32 in a fixed order (results may differ from F.linear in the last bits). Without the extension, or for
    another codec, it decodes and calls F.linear.
    """
    n, k, codec_id = _codec._parse_info(info)
    _codec.codec_for_id(codec_id)
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu" or \
            tuple(x.shape) not in ((k,), (1, k)):
        raise SparsezipError(f"x must be a CPU float32 tensor of shape [{k}] or [1, {k}], got {_describe(x)}")
    if _native is None or codec_id not in _NATIVE_CODECS:
        y = torch.nn.functional.linear(x, decode(weight, index, info, torch.float32, check_crc), bias)
        return y
    payload = _codec._read_stream(weight, codec_id, check_crc=check_crc)
    offsets = _codec._read_index(index, _codec.n_tiles(n, k), len(payload))
    y = torch.empty(x.shape[:-1] + (n,), dtype=torch.float32)
    try:
        _native.decode(codec_id, payload, offsets, n, k, y.numpy(), _LINEAR, threads(), x.contiguous().numpy())
    except ValueError as exc:
        raise SparsezipError(str(exc)) from None
    return y if bias is None else y.add_(bias)


def _describe(t: object) -> str:
    return f"{t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_out(out: torch.Tensor, n: int, k: int) -> None:
    if not isinstance(out, torch.Tensor):
        raise SparsezipError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype not in _OUT_KIND or out.device.type != "cpu" or not out.is_contiguous():
        raise SparsezipError(f"out must be a contiguous CPU float16/float32 tensor, got {out.dtype} on {out.device}")
    if tuple(out.shape) != (n, k):
        raise SparsezipError(f"out has shape {list(out.shape)} but the weight is [{n}, {k}]")
