"""Tests for the Triton kernels (sparsezip.kernels.triton.codec) against the reference codec.

Without a CUDA GPU the kernels run under the Triton interpreter (numpy on the CPU). TRITON_INTERPRET
is read when a kernel is decorated, so a fixture (conftest.py) loads a private copy of the module with the
variable set only while it is imported: the shared sparsezip.kernels.triton.codec, and every other test module
in this pytest process, never see it. With a GPU (and TRITON_INTERPRET unset) the real kernels run.

Expected values come from sparsezip.codec.decode and torch, never from the code under test.
"""

from __future__ import annotations

import os
import struct
import zlib
from types import ModuleType

import pytest
import torch

from sparsezip import codec
from sparsezip.errors import SparsezipError

pytest.importorskip("triton")

HEADER = 24
SHAPES = [(1, 1), (130, 200), (256, 384)]
SPECIAL = [0x8000, 0x0001, 0x83FF, 0x7C00, 0xFC00, 0x7E01, 0xFFFF, 0x0400]  # -0, subnormals, inf, NaNs


@pytest.fixture(scope="module")
def kit(interpreted_triton) -> tuple[ModuleType, str]:
    """(kernel module, device the tensors go to)."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        from sparsezip.kernels.triton import codec as triton_codec

        return triton_codec, "cuda"
    return interpreted_triton, "cpu"


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
    return tk.prepare(enc, device), enc


def e5m2(w: torch.Tensor, keep_every: int = 40) -> torch.Tensor:
    """w with the low byte cleared except in every keep_every-th value: huff-v2 exception-list tiles."""
    bits = w.clone().view(torch.int16)
    flat = bits.view(-1)
    cleared = flat & -256
    flat[:] = torch.where(torch.arange(flat.numel()) % keep_every == 0, flat, cleared)
    return bits.view(torch.float16)


# The interpreter steps through huff-v2's Huffman loop once per symbol of the fullest 8-row group,
# so huff-v2 cases use sparse weights (a few % of 8 x 128) to keep this file fast; the 50% and 100%
# density cases use narrow matrices.
CODECS = {"bitmap-v1": 0.5, "huff-v2": 0.04}


# ---------------------------------------------------------------------------- decode


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_is_bit_exact(kit, name, shape):
    tk, _ = kit
    w = pruned(*shape, seed=1, density=CODECS[name], special=True)
    dw, enc = prepared(kit, w, name)
    out = tk.decode(dw)
    assert out.dtype == torch.float16 and out.device == dw.device
    assert bit_equal(out, codec.decode(enc.weight, enc.index, enc.info))
    assert bit_equal(out, w)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_decode_empty_half_and_dense_tiles(kit, name, density):
    tk, _ = kit
    w = pruned(140, 24, seed=2, density=density)  # 2 x 1 tiles, the second with 12 rows
    dw, _ = prepared(kit, w, name)
    assert bit_equal(tk.decode(dw, block_rows=32 if name == "bitmap-v1" else 128), w)


def test_decode_huff_exception_lists_and_one_symbol(kit):
    tk, _ = kit
    w = e5m2(pruned(130, 200, seed=3, density=0.06, special=True))
    dw, enc = prepared(kit, w, "huff-v2")
    assert bit_equal(tk.decode(dw), w)
    same = torch.zeros(20, 150, dtype=torch.float16)
    same[::3, ::2] = 1.5  # one distinct symbol: a 1-bit code
    assert bit_equal(tk.decode(prepared(kit, same, "huff-v2")[0]), same)


@pytest.mark.parametrize("block_rows, tile_cols", [(16, 4), (32, 1), (64, 2), (128, 8)])
def test_decode_strip_sizes(kit, block_rows, tile_cols):
    """Strips of several tiles, ragged at the matrix edge (3 tile columns), and every block height."""
    tk, _ = kit
    w = e5m2(pruned(150, 300, seed=4, density=0.02), keep_every=7)
    for name in CODECS:
        dw, _ = prepared(kit, w, name)
        assert bit_equal(tk.decode(dw, block_rows=block_rows, tile_cols=tile_cols), w), name


# ---------------------------------------------------------------------------- linear


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_linear_matches_torch(kit, name, shape, batch):
    tk, device = kit
    w = pruned(*shape, seed=5, density=CODECS[name])
    dw, _ = prepared(kit, w, name)
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(batch)).half()
    assert_linear_close(tk.linear(x.to(device), dw), x, w)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("split_k, block_rows, tile_cols", [(1, 128, 2), (2, 32, 2), (3, 64, 4)])
def test_linear_split_k_and_strips(kit, name, split_k, block_rows, tile_cols):
    tk, device = kit
    w = e5m2(pruned(256, 384, seed=6, density=CODECS[name]))
    dw, _ = prepared(kit, w, name)
    x = torch.randn(2, 384, generator=torch.Generator().manual_seed(7)).half()
    y = tk.linear(x.to(device), dw, split_k=split_k, block_rows=block_rows, tile_cols=tile_cols)
    assert_linear_close(y, x, w)


def test_linear_leading_dims_and_large_batch_fallback(kit):
    tk, device = kit
    w = pruned(130, 200, seed=8)
    dw, _ = prepared(kit, w)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 200, generator=g).half()
    assert_linear_close(tk.linear(x.to(device), dw), x, w)
    big = torch.randn(tk.MAX_FUSED_M + 1, 200, generator=g).half()  # decode + torch path
    ref = torch.nn.functional.linear(big.to(device), w.to(device))
    assert bit_equal(tk.linear(big.to(device), dw), ref)
    assert_linear_close(tk.linear(big.to(device), dw, max_fused_m=32), big, w)  # fused, 32-row x tile


def test_linear_rejects_bad_input(kit):
    tk, device = kit
    dw, _ = prepared(kit, pruned(130, 200, seed=10))
    x = torch.zeros(1, 200, dtype=torch.float16, device=device)
    with pytest.raises(SparsezipError, match="float16"):
        tk.linear(x.float(), dw)
    with pytest.raises(SparsezipError, match=r"\[\.\.\., 200\]"):
        tk.linear(x[:, :199], dw)
    with pytest.raises(SparsezipError, match="split_k"):
        tk.linear(x, dw, split_k=3)
    with pytest.raises(SparsezipError, match="block_rows"):
        tk.linear(x, dw, block_rows=8)
    with pytest.raises(SparsezipError, match="tile_cols"):
        tk.decode(dw, tile_cols=3)
    with pytest.raises(SparsezipError, match="max_fused_m"):
        tk.linear(x, dw, max_fused_m=65)


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
        tk.prepare(codec.EncodedWeight(weight, index, info), device)


def _huff_corruptions() -> tuple[codec.EncodedWeight, dict[str, tuple[torch.Tensor, str]]]:
    """A one-tile 64 x 64 huff-v2 weight and name -> (altered weight stream with a valid CRC, message)."""
    w = pruned(64, 64, seed=11)
    nnz = int((w != 0).sum())
    if nnz % 8 == 0:  # the sign bits must end inside a byte, leaving padding bits to set
        w[0, 0] = 0 if w[0, 0] != 0 else 1
        nnz = int((w != 0).sum())
    enc = codec.encode(w, "huff-v2")
    tile = HEADER + 128  # payload: 128-byte code table, then tile 0
    header, bitmap = 4 + 2 * 8, 64 * 8  # 8 row groups; 8 bitmap bytes a row

    def altered(at: int, value: int) -> torch.Tensor:
        stream = enc.weight.clone()
        stream[at] = torch.tensor(value, dtype=torch.uint8).view(torch.int8)
        return _with_crc(stream)

    raw = enc.weight.view(torch.uint8)
    sign_end = tile + header + bitmap + (nnz + 7) // 8 - 1
    return enc, {
        "table": (altered(HEADER + 5, 13), "code table is corrupted"),
        "mode": (altered(tile, 2), r"mode 2\b"),
        "sub_len": (altered(tile + 4, int(raw[tile + 4]) + 1), "fields imply"),
        "sign padding": (altered(sign_end, int(raw[sign_end]) | 0x80), "padding bits in the sign bits"),
    }


@pytest.mark.parametrize("case", ["table", "mode", "sub_len", "sign padding"])
def test_prepare_rejects_corrupt_huff_streams(kit, case):
    tk, device = kit
    enc, cases = _huff_corruptions()
    weight, message = cases[case]
    with pytest.raises(SparsezipError, match=message):
        tk.prepare(codec.EncodedWeight(weight, enc.index, enc.info), device)
    if case == "sign padding":  # only the reference decoder sees this; without it the values are still right
        dw = tk.prepare(codec.EncodedWeight(weight, enc.index, enc.info), device, verify=False)
        assert bit_equal(tk.decode(dw), codec.decode(enc.weight, enc.index, enc.info))
    else:  # structure: checked even without verify
        with pytest.raises(SparsezipError, match=message):
            tk.prepare(codec.EncodedWeight(weight, enc.index, enc.info), device, verify=False)


def test_prepare_accepts_what_the_reference_accepts(kit):
    """The padding-bit corruption above must really be a set bit past the last column."""
    enc = codec.encode(pruned(130, 203, seed=9))
    assert codec.decode_tile(enc.weight, enc.index, enc.info, 1).shape == (128, 75)
    with pytest.raises(SparsezipError, match="outside the matrix"):
        codec.decode(*_corruptions(enc)["padding bits"][0])


# Kernel argument types for an ahead-of-time compile: pointers by name, everything else i32.
POINTERS = {"payload": "*u8", "tile_off": "*i64", "row_start": "*i16", "tile_nnz": "*i32", "lut": "*i16",
            "scratch": "*i16", "out": "*i16", "x": "*fp16", "part": "*fp32"}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="kernels built interpreted")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("codec_id", [1, 2])
def test_kernels_compile_for_h100(codec_id):
    """The interpreter runs kernels as Python and cannot see what only the compiler rejects (types,
    layouts, loop-carried values): compile both kernels to an sm_90 cubin, which needs no GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from sparsezip.kernels.triton import codec as triton_codec

    for kernel, consts in [
        (triton_codec._decode_kernel, {"BN": 16, "TC": 1, "CODEC": codec_id}),
        (triton_codec._linear_kernel, {"BM": 16, "BN": 16, "TC": 2, "CODEC": codec_id}),
    ]:
        sig = {a: "constexpr" if a in consts else POINTERS.get(a, "i32") for a in kernel.arg_names}
        built = compile(ASTSource(kernel, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": 4})
        assert len(built.asm["cubin"]) > 0


def test_availability_is_per_module(kit):
    tk, device = kit
    assert tk.available(device)
    from sparsezip.kernels.triton import codec as triton_codec

    # The shared module was never switched to the interpreter by these tests.
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        assert not triton_codec.interpreted()
        assert triton_codec.available("cpu") is False
