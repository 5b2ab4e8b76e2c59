"""Tests for the Triton kernels (sparsezip.kernels.triton_codec) against the reference codec.

Without a CUDA GPU the kernels run under the Triton interpreter (numpy on the CPU). TRITON_INTERPRET
is read when a kernel is decorated, so the fixture loads a private copy of the module with the variable
set only while it is imported: the shared sparsezip.kernels.triton_codec, and every other test module
in this pytest process, never see it. With a GPU (and TRITON_INTERPRET unset) the real kernels run.

Expected values come from sparsezip.codec.decode and torch, never from the code under test.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
import zlib
from types import ModuleType
from unittest import mock

import pytest
import torch

from sparsezip import codec
from sparsezip.errors import SparsezipError

pytest.importorskip("triton")

HEADER = 24
SHAPES = [(1, 1), (130, 200), (256, 384)]
SPECIAL = [0x8000, 0x0001, 0x83FF, 0x7C00, 0xFC00, 0x7E01, 0xFFFF, 0x0400]  # -0, subnormals, inf, NaNs


def _interpreted_copy() -> ModuleType:
    """triton_codec with kernels built for the interpreter, under a private module name."""
    import sparsezip.kernels

    name = "sparsezip.kernels._triton_codec_interpreted"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(os.path.dirname(sparsezip.kernels.__file__), "triton_codec.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kit() -> tuple[ModuleType, str]:
    """(kernel module, device the tensors go to)."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        from sparsezip.kernels import triton_codec

        return triton_codec, "cuda"
    return _interpreted_copy(), "cpu"


def pruned(n: int, k: int, seed: int, density: float = 0.5, special: bool = False) -> torch.Tensor:
    """A random fp16 [n, k] weight with about (1 - density) exact zeros, optionally odd bit patterns."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).half()
    w[torch.rand(n, k, generator=g) >= density] = 0
    if special:
        where = torch.randint(0, n * k, (min(n * k, 2 * len(SPECIAL)),), generator=g)
        bits = torch.tensor(SPECIAL * 2, dtype=torch.int32)[: len(where)]
        w.view(-1).view(torch.int16)[where] = bits.to(torch.int16)
    return w


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.cpu().view(torch.int16), b.cpu().view(torch.int16))


def assert_linear_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y (fp16) against x.float() @ w.float().T: one fp16 rounding plus fp32 summation-order error."""
    x32, w32 = x.float().reshape(-1, w.shape[1]), w.float()
    ref = x32 @ w32.T  # [M, n]
    bound = ref.abs() * 2**-11 + (x32.abs() @ w32.abs().T) * (w.shape[1] * 2**-23) + 2**-24
    err = (y.cpu().float().reshape(ref.shape) - ref).abs()
    assert y.dtype == torch.float16 and y.shape == (*x.shape[:-1], w.shape[0])
    assert (err <= bound).all(), f"max error {err.max().item()} (bound there {bound.view(-1)[err.argmax()].item()})"


def prepared(kit: tuple[ModuleType, str], w: torch.Tensor, name: str = "bitmap-v1"):  # noqa: ANN201
    tk, device = kit
    enc = codec.encode(w, name)
    return tk.prepare(enc.weight, enc.index, enc.info, device), enc


# ---------------------------------------------------------------------------- decode


@pytest.mark.parametrize("shape", SHAPES)
def test_decode_is_bit_exact(kit, shape):
    tk, _ = kit
    w = pruned(*shape, seed=1, special=True)
    dw, enc = prepared(kit, w)
    out = tk.decode(dw)
    assert out.dtype == torch.float16 and out.device == dw.device
    assert bit_equal(out, codec.decode(enc.weight, enc.index, enc.info))
    assert bit_equal(out, w)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_decode_empty_and_dense_tiles(kit, density):
    tk, _ = kit
    w = pruned(200, 130, seed=2, density=density)
    dw, _ = prepared(kit, w)
    assert bit_equal(tk.decode(dw, block_rows=32), w)


# ---------------------------------------------------------------------------- linear


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_linear_matches_torch(kit, shape, batch):
    tk, device = kit
    w = pruned(*shape, seed=3)
    dw, _ = prepared(kit, w)
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(batch)).half()
    assert_linear_close(tk.linear(x.to(device), dw), x, w)


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_linear_split_k_and_block_rows(kit, split_k):
    tk, device = kit
    w = pruned(256, 384, seed=4)
    dw, _ = prepared(kit, w)
    x = torch.randn(2, 384, generator=torch.Generator().manual_seed(5)).half()
    assert_linear_close(tk.linear(x.to(device), dw, split_k=split_k, block_rows=32), x, w)


def test_linear_leading_dims_and_large_batch_fallback(kit):
    tk, device = kit
    w = pruned(130, 200, seed=6)
    dw, _ = prepared(kit, w)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 200, generator=g).half()
    assert_linear_close(tk.linear(x.to(device), dw), x, w)
    big = torch.randn(tk.MAX_FUSED_M + 1, 200, generator=g).half()  # decode + torch path
    ref = torch.nn.functional.linear(big.to(device), w.to(device))
    assert bit_equal(tk.linear(big.to(device), dw), ref)


def test_linear_rejects_bad_input(kit):
    tk, device = kit
    dw, _ = prepared(kit, pruned(130, 200, seed=8))
    with pytest.raises(SparsezipError, match="float16"):
        tk.linear(torch.zeros(1, 200, device=device), dw)
    with pytest.raises(SparsezipError, match=r"\[\.\.\., 200\]"):
        tk.linear(torch.zeros(1, 199, dtype=torch.float16, device=device), dw)
    with pytest.raises(SparsezipError, match="split_k"):
        tk.linear(torch.zeros(1, 200, dtype=torch.float16, device=device), dw, split_k=3)


# ---------------------------------------------------------------------------- prepare


def _with_crc(stream: torch.Tensor) -> torch.Tensor:
    """A copy of a weight stream whose header CRC matches its (possibly altered) payload."""
    raw = bytearray(stream.numpy().tobytes())
    raw[8:12] = struct.pack("<I", zlib.crc32(bytes(raw[HEADER:])))
    return torch.frombuffer(raw, dtype=torch.int8).clone()


def offsets_of(index: torch.Tensor) -> torch.Tensor:
    return index.view(torch.int64)


def _corruptions(enc: codec.EncodedWeight) -> dict[str, tuple[tuple[torch.Tensor, ...], str]]:
    """name -> ((weight, index, info), expected message) for a 130 x 203 bitmap-v1 weight."""
    w, idx, info = enc.weight, enc.index, enc.info
    flipped = w.clone()
    flipped[-1] ^= 1
    offsets = offsets_of(idx).clone()
    offsets[1] += 2  # tile 0 two bytes longer, tile 1 two bytes shorter
    # Tile 1 has 75 columns: 10 bitmap bytes a row, the last holding columns 72..74. Move one present bit
    # of row 2 to column 79 so that every size still agrees and only the padding check can object.
    padding = w.clone()
    row = padding[HEADER + int(offsets_of(idx)[1]) + 2 * 10 :][:10].view(torch.uint8)
    j = int(torch.nonzero(row[:9])[0])
    row[j] &= row[j] - 1  # clear the lowest set bit
    row[9] |= 0x80
    wrong_id, bad_shape = info.clone(), info.clone()
    wrong_id[4] = 999
    bad_shape[2] = 400  # in_features: 4 tile columns, the index has 2
    return {
        "truncated": ((w[:-1], idx, info), "wrong weight stream length"),
        "crc": ((flipped, idx, info), "CRC mismatch"),
        "index": ((w, offsets.view(torch.int8), info), "index offsets do not match"),
        "padding bits": ((_with_crc(padding), idx, info), "outside the matrix"),
        "unknown codec": ((w, idx, wrong_id), "unknown codec id 999"),
        "shape": ((w, idx, bad_shape), "index has"),
        "dtype": ((w.view(torch.uint8), idx, info), "int8"),
    }


@pytest.mark.parametrize("case", ["truncated", "crc", "index", "padding bits", "unknown codec", "shape", "dtype"])
def test_prepare_rejects_corrupt_input(kit, case):
    tk, device = kit
    enc = codec.encode(pruned(130, 203, seed=9))
    (weight, index, info), message = _corruptions(enc)[case]
    with pytest.raises(SparsezipError, match=message):
        tk.prepare(weight, index, info, device)


def test_prepare_accepts_what_the_reference_accepts(kit):
    """The padding-bit corruption above must really be a set bit past the last column."""
    enc = codec.encode(pruned(130, 203, seed=9))
    assert codec.decode_tile(enc.weight, enc.index, enc.info, 1).shape == (128, 75)
    with pytest.raises(SparsezipError, match="outside the matrix"):
        codec.decode(*_corruptions(enc)["padding bits"][0])


def test_availability_is_per_module(kit):
    tk, device = kit
    assert tk.available(device)
    from sparsezip.kernels import triton_codec

    # The shared module was never switched to the interpreter by these tests.
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        assert not triton_codec.interpreted()
        assert triton_codec.available("cpu") is False
