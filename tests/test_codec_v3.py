"""Tests for codec nibble-v3 (sparsezip.codec.nibble_v3) and its native CPU path.

Expected values come from the input (round trips), from byte strings written by hand from the format in the
module's docstring, or from the numpy reference (for the native path); never from the code under test alone.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.extra import numpy as hnp

from sparsezip import codec
from sparsezip.codec import EncodedWeight, decode, decode_tile, get_codec, linear
from sparsezip.errors import SparsezipError
from sparsezip.kernels import cpu
from sparsezip.kernels.cpu.gemv import mixed_linear

V3 = get_codec("nibble-v3")
HEADER = 24
BOOK = 16
BACKENDS = ["numpy", pytest.param("native", marks=pytest.mark.skipif(not cpu.available(), reason="no C extension"))]
native_only = pytest.mark.skipif(not cpu.available(), reason="the C extension is not built")


def as_half(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint16).view(np.int16).copy()).view(torch.float16)


def bits_of(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def gaussian_pruned(seed: int, shape: tuple[int, int], sparsity: float = 0.5, l2: bool = False) -> np.ndarray:
    """A realistic weight: Gaussian fp16 with the smallest half zeroed; with `l2`, E5M2 but every 40th value."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).half()
    w[w.abs() <= w.abs().float().quantile(sparsity).half()] = 0
    bits = bits_of(w).copy()
    if l2:
        keep = np.arange(bits.size).reshape(shape) % 40 == 0
        bits = np.where(keep | (bits == 0), bits, bits & 0xFF00)
        bits[(bits & 0x7FFF) == 0] = 0
    return bits


def roundtrip(bits: np.ndarray, backend: str) -> EncodedWeight:
    enc = V3.encode(as_half(bits), backend=backend)
    np.testing.assert_array_equal(bits_of(V3.decode(enc, backend=backend)), bits)
    np.testing.assert_array_equal(bits_of(decode(enc.weight, enc.index, enc.info)), bits)  # chosen by info[4]
    return enc


def payload_of(enc: EncodedWeight) -> bytes:
    return enc.weight.numpy().tobytes()[HEADER:]


def with_payload(enc: EncodedWeight, payload: bytes) -> EncodedWeight:
    """Replace the payload, with a fresh header (length and CRC), so only structural checks can catch it."""
    header = struct.pack("<4sHHIIQ", b"SPZW", 3, 1, zlib.crc32(payload), 0, len(payload))
    return EncodedWeight(torch.from_numpy(np.frombuffer(header + payload, dtype=np.int8).copy()), enc.index, enc.info)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_fp16_bit_pattern_roundtrips(backend):
    bits = np.random.default_rng(0).permutation(np.arange(1 << 16, dtype=np.uint16)).reshape(256, 256)
    roundtrip(bits, backend)  # 128 symbols: most values escape
    roundtrip(bits.reshape(512, 128)[:, :127].copy(), backend)  # edge tiles too


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (127, 129), (300, 260), (8, 1000), (129, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.97, 1.0])
def test_odd_shapes_roundtrip(backend, shape, sparsity):
    rng = np.random.default_rng(sum(shape))
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits[rng.random(shape) < sparsity] = 0
    roundtrip(bits, backend)
    roundtrip(gaussian_pruned(1, shape, min(sparsity, 0.9), l2=True), backend)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40)))
def test_any_bit_patterns_roundtrip(bits):
    for backend in ["numpy"] + (["native"] if cpu.available() else []):
        roundtrip(bits, backend)


def test_codebook_holds_the_15_commonest_symbols_commonest_first():
    # symbol s = 0x10 + i appears 100 - i times (i < 20); its values are s << 8 with random low byte 0
    counts = {0x10 + i: 100 - i for i in range(20)}
    bits = np.concatenate([np.full(c, s << 8, np.uint16) for s, c in counts.items()])
    bits = np.random.default_rng(3).permutation(bits)[None, :].copy()
    enc = roundtrip(bits, "numpy")
    book = list(payload_of(enc)[:BOOK])
    assert book == [0x10 + i for i in range(15)] + [0xFF]


def test_hand_written_stream_decodes_and_is_what_the_encoder_writes():
    """One tile [1, 10]: values 0x3C00, 0, -0x3C00 (0xBC00), 0x3D01, 0, 0x3C00, 0, 0, 0x4000, 0 -- symbols 0x3C (x3),
    0x3D and 0x40; 0x3C is commonest, then 0x3D, then 0x40 (ties: smaller symbol)."""
    values = np.array([[0x3C00, 0, 0xBC00, 0x3D01, 0, 0x3C00, 0, 0, 0x4000, 0]], np.uint16)
    book = bytes([0x3C, 0x3D, 0x40] + [0xFF] * 13)
    # 5 values, 1 nonzero low byte: 3 * 1 < 5, so mode 1 (E5M2) lists it at position 2
    header = struct.pack("<BBHH", 1, 0, 1, 0)
    bitmap = bytes([0b00101101, 0b00000001])  # columns 0, 2, 3, 5 and 8
    signs = bytes([0b00000010])  # value 1 (0xBC00) is negative
    codes = bytes([0x0 | 0x0 << 4, 0x1 | 0x0 << 4, 0x2])  # codes 0 0 1 0 2, high nibble of the last byte 0
    lows = struct.pack("<H", 2) + bytes([0x01])
    payload = book + header + bitmap + signs + codes + lows
    enc = V3.encode(as_half(values), backend="numpy")
    assert payload_of(enc) == payload
    np.testing.assert_array_equal(bits_of(V3.decode(with_payload(enc, payload), backend="numpy")), values)
    if cpu.available():
        assert payload_of(V3.encode(as_half(values), backend="native")) == payload
        np.testing.assert_array_equal(bits_of(V3.decode(with_payload(enc, payload), backend="native")), values)


def test_smaller_than_bitmap_v1_and_close_to_huff_v2_on_pruned_l2_weights():
    bits = gaussian_pruned(7, (512, 1024), 0.5, l2=True)
    sizes = {name: codec.encode(as_half(bits), name).nbytes for name in ("bitmap-v1", "huff-v2", "nibble-v3")}
    assert sizes["nibble-v3"] < 0.65 * sizes["bitmap-v1"]
    assert sizes["nibble-v3"] < 1.15 * sizes["huff-v2"]


@native_only
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=300)))
def test_native_encode_matches_reference_byte_for_byte(bits):
    ref, nat = V3.encode(as_half(bits), backend="numpy"), V3.encode(as_half(bits), backend="native")
    assert torch.equal(ref.weight, nat.weight) and torch.equal(ref.index, nat.index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_tile_equals_slice_of_decode(backend):
    bits = gaussian_pruned(16, (300, 260), l2=True)
    enc = V3.encode(as_half(bits), backend=backend)
    for t in range(9):
        tr, tc = divmod(t, 3)
        np.testing.assert_array_equal(bits_of(decode_tile(enc.weight, enc.index, enc.info, t)),
                                      bits[128 * tr:128 * tr + 128, 128 * tc:128 * tc + 128])


@native_only
@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (130, 13), (256, 128), (300, 577)])
def test_product_from_the_tiles_is_bit_identical_to_the_dense_gemv(shape, l2, kernel_level):
    """What lets --weights compressed give the same tokens as --weights dense, at every kernel level."""
    w = as_half(gaussian_pruned(sum(shape), shape, 0.5, l2))
    x, bias = torch.randn(1, shape[1]), torch.randn(shape[0])
    assert torch.equal(linear(x, codec.encode(w, "nibble-v3"), bias), mixed_linear(x, w, bias))


# ---------------------------------------------------------------------------- corruption


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, EncodedWeight]:
    """A 2 x 2-tile E5M2 matrix with escapes: every 50th value takes one of 32 rare symbols (0x60..0x7F)."""
    bits = gaussian_pruned(21, (256, 256), 0.5, l2=True)
    rare = (np.arange(bits.size).reshape(bits.shape) % 50 == 0) & (bits != 0)
    symbols = np.random.default_rng(2).integers(0x60, 0x80, size=int(rare.sum())).astype(np.uint16)
    bits[rare] = (bits[rare] & 0x80FF) | (symbols << 8)
    return bits, V3.encode(as_half(bits), backend="numpy")


def tile0(payload: bytes) -> tuple[int, int, int, int]:
    return struct.unpack_from("<BBHH", payload, BOOK)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_is_intact_and_escapes(sample, backend):
    bits, enc = sample
    np.testing.assert_array_equal(bits_of(V3.decode(enc, backend=backend)), bits)
    mode, _, _, n_esc = tile0(payload_of(enc))
    assert mode == 1 and n_esc > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where, value, match", [
    (0, 200, "codebook"),  # a symbol above 127
    (15, 3, "escape code"),  # the escape code's byte must stay 255
    (BOOK, 2, "mode|invalid header"),  # tile 0's mode
    (BOOK + 1, 1, "reserved|invalid header"),
    (BOOK + 4, 0, "escape|spans|imply"),  # n_escapes says 0
])
def test_corrupt_fields(sample, backend, where, value, match):
    _, enc = sample
    payload = bytearray(payload_of(enc))
    payload[where] = value
    with pytest.raises(SparsezipError, match=match):
        V3.decode(with_payload(enc, bytes(payload)), backend=backend)


@native_only
@pytest.mark.parametrize("rows", [1, 3])
def test_product_from_corrupt_tiles_names_the_first(sample, rows):
    """The product runs bands of tiles on several threads; the error still names the lowest bad tile, and no
    result comes back."""
    _, enc = sample
    offsets = np.frombuffer(enc.index.numpy().tobytes(), "<i8")
    payload = bytearray(payload_of(enc))
    for t in (1, 3):
        payload[offsets[t]] = 2  # mode 2: an invalid tile header
    bad = with_payload(enc, bytes(payload))
    for _ in range(5):  # the thread that meets a bad tile first varies from call to call
        with pytest.raises(SparsezipError, match="tile 1 has an invalid header"):
            linear(torch.randn(rows, 256), bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_code_missing_from_the_codebook(backend):
    bits = np.array([[0x3C00, 0x3D00, 0x3C00]], np.uint16)  # codebook 0x3C, 0x3D: codes 2..14 unused
    enc = V3.encode(as_half(bits), backend="numpy")
    payload = bytearray(payload_of(enc))
    codes_at = BOOK + 6 + 1 + 1  # header, 1 bitmap byte, 1 sign byte
    assert payload[codes_at] == 0x10  # codes 0, 1
    payload[codes_at] = 0x17  # code 7: no symbol
    with pytest.raises(SparsezipError, match="codebook|code"):
        V3.decode(with_payload(enc, bytes(payload)), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_escape_byte_that_is_no_symbol(backend):
    # 15 symbols three times each take the codebook; 0x70, once, escapes
    bits = np.array([[(0x10 + i) << 8 for i in range(15)] * 3 + [0x7000]], np.uint16)
    enc = V3.encode(as_half(bits), backend="numpy")
    payload = bytearray(payload_of(enc))
    assert payload[-1] == 0x70  # mode 1 without exceptions: the escape byte ends the tile
    payload[-1] = 0x90
    with pytest.raises(SparsezipError, match="escape|symbol"):
        V3.decode(with_payload(enc, bytes(payload)), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonzero_padding_nibble(backend):
    enc = V3.encode(as_half(np.array([[0x3C00, 0, 0x3D00, 0x3C00]], np.uint16)), backend="numpy")
    payload = bytearray(payload_of(enc))
    codes_at = BOOK + 6 + 1 + 1  # header, 1 bitmap byte, 1 sign byte
    assert payload[codes_at + 1] >> 4 == 0  # 3 values: the second code byte's high nibble pads
    payload[codes_at + 1] |= 0x10
    with pytest.raises(SparsezipError, match="padding"):
        V3.decode(with_payload(enc, bytes(payload)), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions, lows", [
    ((9, 3), (0x01, 0x02)),  # out of order
    ((3, 3), (0x01, 0x02)),  # a position twice
    ((3, 16), (0x01, 0x02)),  # past the tile's 16 values
    ((3, 9), (0x01, 0x00)),  # a zero low byte
])
def test_a_damaged_exception_list(backend, positions, lows):
    bits = np.array([[(0x30 + i % 4) << 8 for i in range(16)]], np.uint16)
    bits[0, 3] |= 0x01
    bits[0, 9] |= 0x02
    enc = V3.encode(as_half(bits), backend="numpy")
    payload = bytearray(payload_of(enc))
    assert payload[BOOK] == 1 and bytes(payload[-6:]) == struct.pack("<HHBB", 3, 9, 0x01, 0x02)  # mode 1, 2 exceptions
    payload[-6:] = struct.pack("<HHBB", *positions, *lows)
    damaged = with_payload(enc, bytes(payload))
    with pytest.raises(SparsezipError, match="invalid exception list"):
        V3.decode(damaged, backend=backend)
    if backend == "native":  # the product straight from the tiles reads the list too
        with pytest.raises(SparsezipError, match="invalid exception list"):
            linear(torch.randn(2, 16), damaged)


LONG_LIST = 40  # exceptions: the native check takes 16 positions and 32 bytes at a time, then a scalar tail


def long_exception_list() -> tuple[np.ndarray, EncodedWeight]:
    """One full-width tile row whose values 0, 3, .., 117 keep a low byte: a mode-1 tile with a 40-entry list."""
    bits = np.array([[(0x30 + i % 4) << 8 for i in range(128)]], np.uint16)
    bits[0, 0 : 3 * LONG_LIST : 3] |= np.arange(1, LONG_LIST + 1, dtype=np.uint16)
    return bits, V3.encode(as_half(bits), backend="numpy")


def test_a_long_exception_list_decodes_at_every_kernel_level(kernel_level):
    bits, enc = long_exception_list()
    payload = payload_of(enc)
    assert payload[BOOK] == 1 and payload[BOOK + 2] == LONG_LIST  # mode 1, the whole list
    np.testing.assert_array_equal(bits_of(V3.decode(enc, backend="native")), bits)
    x = torch.randn(3, 128)
    expected = x @ as_half(bits).float().T
    torch.testing.assert_close(linear(x, enc), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("damage", [
    {5: 19},  # out of order inside the first block of 16 (entry 6 is 18)
    {20: 18},  # a position twice, inside the second block (18 is entry 6's)
    {LONG_LIST - 1: 128},  # the last, in the scalar tail, past the 128 values
    {0: 0x8000},  # the first, past the values and negative as a signed 16-bit number
    {10: 0x8001, 11: 0x8002},  # two rising positions with the sign bit, inside a block
])
def test_a_damaged_long_exception_list(kernel_level, damage):
    _, enc = long_exception_list()
    payload = bytearray(payload_of(enc))
    positions = len(payload) - 3 * LONG_LIST
    for entry, position in damage.items():
        payload[positions + 2 * entry : positions + 2 * entry + 2] = struct.pack("<H", position)
    damaged = with_payload(enc, bytes(payload))
    for backend in ("numpy", "native"):
        with pytest.raises(SparsezipError, match="invalid exception list"):
            V3.decode(damaged, backend=backend)
    with pytest.raises(SparsezipError, match="invalid exception list"):
        linear(torch.randn(2, 128), damaged)


ESCAPED = (3, 4, 5, 31, 40)  # values of one tile row that escape: three side by side and the last of a 32-value step
# more, for rows of 128 and 101 values: the last of a 64-value step and the first after it, and the last value (in
# the partial step of the 101-value row)
ESCAPED_WIDE = ESCAPED + (63, 64, 99, 100)


def escapes_inside_vector_steps(cols: int = 128, escaped: tuple[int, ...] = ESCAPED) -> tuple[np.ndarray, EncodedWeight]:
    """One tile row of `cols` values: 15 symbols take the codebook, and the values `escaped` hold rare symbols
    (0x70, 0x71, ..) and alternate signs: several escapes inside the native decoder's vector steps."""
    bits = np.array([[(0x30 + i % 15) << 8 for i in range(cols)]], np.uint16)
    for j, at in enumerate(escaped):
        bits[0, at] = (0x70 + j) << 8 | (j % 2) << 15
    return bits, V3.encode(as_half(bits), backend="numpy")


@pytest.mark.parametrize("cols, escaped", [(128, ESCAPED), (128, ESCAPED_WIDE), (101, ESCAPED_WIDE)])
def test_escapes_inside_a_vector_step_decode_in_order_at_every_kernel_level(kernel_level, cols, escaped):
    bits, enc = escapes_inside_vector_steps(cols, escaped)
    payload = payload_of(enc)
    # mode 1 without exceptions: the escape bytes end the tile
    assert payload[-len(escaped):] == bytes(range(0x70, 0x70 + len(escaped)))
    np.testing.assert_array_equal(bits_of(V3.decode(enc, backend="native")), bits)
    # the escaped symbols are large (0x70 << 8 is 8192): against the dense kernel bit for bit, not a tolerance
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(cols + len(escaped)))
    assert torch.equal(linear(x, enc), mixed_linear(x, as_half(bits)))


def test_a_bad_escape_byte_inside_a_vector_step(kernel_level):
    _, enc = escapes_inside_vector_steps()
    payload = bytearray(payload_of(enc))
    payload[-len(ESCAPED) + 1] = 0x90  # value 4's escape byte: no symbol
    with pytest.raises(SparsezipError, match="escape|symbol"):
        V3.decode(with_payload(enc, bytes(payload)), backend="native")
    with pytest.raises(SparsezipError, match="escape|symbol"):
        linear(torch.randn(1, 128), with_payload(enc, bytes(payload)))


def test_a_code_missing_from_the_codebook_inside_a_vector_step(kernel_level):
    bits = np.array([[(0x30 + i % 10) << 8 for i in range(128)]], np.uint16)  # codes 10..14 unused
    payload = bytearray(payload_of(V3.encode(as_half(bits), backend="numpy")))
    codes_at = BOOK + 6 + 16 + 16  # header, 16 bitmap bytes, 16 sign bytes
    payload[codes_at + 10] = (payload[codes_at + 10] & 0xF0) | 12  # value 20: code 12
    damaged = with_payload(V3.encode(as_half(bits), backend="numpy"), bytes(payload))
    with pytest.raises(SparsezipError, match="codebook|code"):
        V3.decode(damaged, backend="native")


# a byte checked 32 at a time; the one byte past those steps but before the positions' scalar tail (at 40 entries
# the 16-wide position steps end at entry 33); one in that tail
@pytest.mark.parametrize("entry", [10, 32, LONG_LIST - 2])
def test_a_zero_byte_in_a_long_exception_list(kernel_level, entry):
    _, enc = long_exception_list()
    payload = bytearray(payload_of(enc))
    payload[len(payload) - LONG_LIST + entry] = 0
    with pytest.raises(SparsezipError, match="invalid exception list"):
        V3.decode(with_payload(enc, bytes(payload)), backend="native")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", [0, 10, 100, -1])
def test_truncated_payload(sample, backend, keep):
    _, enc = sample
    payload = payload_of(enc)
    with pytest.raises(SparsezipError):
        V3.decode(with_payload(enc, payload[:keep]), backend=backend)


@native_only
def test_native_and_reference_agree_on_random_corruption(sample):
    _, enc = sample
    payload = payload_of(enc)
    rng = np.random.default_rng(5)
    for _ in range(60):
        broken = bytearray(payload)
        i = int(rng.integers(0, len(broken)))
        broken[i] ^= 1 << int(rng.integers(0, 8))
        outcomes = []
        for backend in ("numpy", "native"):
            try:
                outcomes.append(bits_of(V3.decode(with_payload(enc, bytes(broken)), backend=backend)).copy())
            except SparsezipError:
                outcomes.append(None)
        if outcomes[0] is None or outcomes[1] is None:
            assert outcomes[0] is None and outcomes[1] is None, f"byte {i}: only one backend refused"
        else:
            np.testing.assert_array_equal(outcomes[0], outcomes[1])
