"""The coders' native path: the codec kernels of the CPU extension (kernels/cpu/native/codec.c), over streams the
stream layer has validated. Without the extension the coders use their numpy reference and nothing here runs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SparsezipError
from ..kernels import cpu
from .huff_table import huffman_lengths
from .stream import OpenStream

NATIVE_CODEC_IDS = (1, 2, 3)  # bitmap-v1 and nibble-v3 decode, huff-v2 encode and decode
_OUT_KIND = {torch.float16: 0, torch.float32: 1}
_LINEAR = 2  # the extension's output kind for the product straight from the tiles


def supports(codec_id: int) -> bool:
    """True when the extension is built and decodes this coder's streams."""
    return cpu.available() and codec_id in NATIVE_CODEC_IDS


def chosen(backend: str, codec_id: int) -> bool:
    """Whether a coder call takes the native path: backend "auto" (when built), "native" (required) or "numpy"."""
    if backend == "numpy":
        return False
    if backend == "native":
        cpu.require()
        return True
    if backend != "auto":
        raise SparsezipError(f"backend must be 'auto', 'numpy' or 'native', got {backend!r}")
    return supports(codec_id)


def encode_v2(bits: np.ndarray, prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """huff-v2 encode of uint16 [n, k] bit patterns (C-contiguous).

    Returns (stream uint8 [prefix + P]: `prefix` zero bytes then the payload; tile offsets int64 [T]).
    The code table comes from the same function as the numpy encoder's, so both agree byte for byte.
    """
    cpu.require()
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    n, k = bits.shape
    lengths = huffman_lengths(symbol_counts(bits))
    stream, index = cpu.native.v2_encode(bits, n, k, lengths.tobytes(), prefix, cpu.threads())
    return np.frombuffer(stream, dtype=np.uint8), np.frombuffer(index, dtype="<i8").copy()


def symbol_counts(bits: np.ndarray) -> np.ndarray:
    """How often each 7-bit symbol (bits >> 8 & 0x7F) occurs among the present values of uint16 [n, k], int64 [128]."""
    cpu.require()
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    return np.frombuffer(cpu.native.v2_histogram(bits, *bits.shape, cpu.threads()), dtype=np.int64)


def encode_v3(bits: np.ndarray, codebook: np.ndarray, prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """nibble-v3 encode of uint16 [n, k] bit patterns with the given 16-byte codebook, as encode_v2."""
    cpu.require()
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    n, k = bits.shape
    stream, index = cpu.native.v3_encode(bits, n, k, codebook.tobytes(), prefix, cpu.threads())
    return np.frombuffer(stream, dtype=np.uint8), np.frombuffer(index, dtype="<i8").copy()


def decode_into(opened: OpenStream, out: torch.Tensor) -> torch.Tensor:
    """Decode a validated stream into `out` ([n, k] contiguous CPU fp16 or fp32); returns `out`."""
    check_out(out, opened.n, opened.k)
    _call(opened, out.numpy(), _OUT_KIND[out.dtype])
    return out


def linear(opened: OpenStream, x: torch.Tensor) -> torch.Tensor:
    """y [m, n] = x [m, k] W^T straight from the tiles (W never materialised: each tile is decoded once per call,
    whatever m), fp32."""
    y = torch.empty((x.shape[0], opened.n), dtype=torch.float32)
    _call(opened, y.numpy(), _LINEAR, x.contiguous().numpy())
    return y


def _call(opened: OpenStream, out: np.ndarray, kind: int, *x: np.ndarray) -> None:
    try:
        cpu.native.decode(opened.codec_id, opened.payload, opened.offsets, opened.n, opened.k, out, kind,
                          cpu.threads(), *x)
    except ValueError as exc:
        raise SparsezipError(str(exc)) from None


def check_out(out: torch.Tensor, n: int, k: int) -> None:
    if not isinstance(out, torch.Tensor):
        raise SparsezipError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype not in _OUT_KIND or out.device.type != "cpu" or not out.is_contiguous():
        raise SparsezipError(f"out must be a contiguous CPU float16/float32 tensor, got {out.dtype} on {out.device}")
    if tuple(out.shape) != (n, k):
        raise SparsezipError(f"out has shape {list(out.shape)} but the weight is [{n}, {k}]")
