"""Tests for codec huff-v2 (sparsezip.codec.huff_v2) and its native CPU path (sparsezip.codec.native).

Expected values come from the input (round trips), from byte strings written by hand from the format in
codec.py's docstring, or from the numpy reference (for the native path); never from the code under test alone.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparsezip.codec import (EncodedWeight, decode, decode_into, decode_tile, encode, get_codec, linear,
                             open_weight)
from sparsezip.codec.huff_table import canonical_codes, huffman_lengths
from sparsezip.errors import SparsezipError
from sparsezip.kernels import cpu

V2 = get_codec("huff-v2")
HEADER = 24
TABLE = 128
BACKENDS = ["numpy", pytest.param("native", marks=pytest.mark.skipif(not cpu.available(), reason="no C extension"))]
native_only = pytest.mark.skipif(not cpu.available(), reason="the C extension is not built")

SPECIAL = [0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x7FFF, 0xFD55, 0xFFFF]


# ---------------------------------------------------------------------------- helpers


def as_half(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint16).view(np.int16).copy()).view(torch.float16)


def bits_of(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def random_bits(seed: int, shape: tuple[int, int], sparsity: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits[rng.random(shape) < sparsity] = 0
    return bits


def gaussian_pruned(seed: int, shape: tuple[int, int], sparsity: float = 0.5) -> np.ndarray:
    """A realistic weight: Gaussian fp16, the smallest-magnitude half set to zero."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).half()
    w[w.abs() <= w.abs().float().quantile(sparsity).half()] = 0
    return bits_of(w).copy()


def e5m2(bits: np.ndarray) -> np.ndarray:
    """Drop the low byte (what L2 rounding does to most weights), keeping absent entries absent."""
    out = bits & 0xFF00
    out[(bits != 0) & (out == 0)] = 0x8000
    return out


def roundtrip(bits: np.ndarray, backend: str) -> EncodedWeight:
    original = bits.copy()
    enc = V2.encode(as_half(bits), backend=backend)
    out = V2.decode(enc, backend=backend)
    assert out.dtype == torch.float16 and tuple(out.shape) == bits.shape
    np.testing.assert_array_equal(bits_of(out), original)
    np.testing.assert_array_equal(bits_of(decode(enc.weight, enc.index, enc.info)), original)  # via info[4]
    return enc


def payload_of(enc: EncodedWeight) -> bytes:
    return enc.weight.numpy().tobytes()[HEADER:]


def offsets_of(enc: EncodedWeight) -> list[int]:
    return list(struct.unpack(f"<{enc.index.numel() // 8}q", enc.index.numpy().tobytes()))


def with_payload(enc: EncodedWeight, payload: bytes) -> EncodedWeight:
    """Replace the payload, with a fresh header (length and CRC), so only structural checks can catch it."""
    header = struct.pack("<4sHHIIQ", b"SPZW", 2, 1, zlib.crc32(payload), 0, len(payload))
    data = np.frombuffer(header + payload, dtype=np.int8).copy()
    return EncodedWeight(torch.from_numpy(data), enc.index, enc.info)


def with_offsets(enc: EncodedWeight, offsets: list[int]) -> EncodedWeight:
    index = np.array(offsets, dtype="<i8").view(np.int8).copy()
    return EncodedWeight(enc.weight, torch.from_numpy(index), enc.info)


def tile_fields(payload: bytes, offset: int) -> tuple[int, int, int, list[int]]:
    """(mode, reserved, n_exceptions, sub_len...) of a full-height tile (16 substreams)."""
    mode, reserved, n_exc, *subs = struct.unpack_from("<BBH16H", payload, offset)
    return mode, reserved, n_exc, subs


def decode_with(enc: EncodedWeight, backend: str) -> torch.Tensor:
    return V2.decode(enc, backend=backend)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_fp16_bit_pattern_roundtrips(backend):
    bits = np.random.default_rng(0).permutation(np.arange(1 << 16, dtype=np.uint16)).reshape(256, 256)
    roundtrip(bits, backend)
    roundtrip(bits.reshape(512, 128)[:, :127].copy(), backend)  # edge tiles too


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (127, 129), (300, 260), (8, 1000), (129, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.97])
def test_odd_shapes_roundtrip(backend, shape, sparsity):
    bits = random_bits(hash((shape, sparsity)) % 1000, shape, sparsity)
    flat = bits.reshape(-1)
    count = min(len(SPECIAL), flat.size)
    flat[np.linspace(0, flat.size - 1, count).astype(int)] = SPECIAL[:count]
    roundtrip(bits, backend)
    roundtrip(e5m2(bits), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_values_everywhere(backend):
    bits = np.array(SPECIAL * 300, dtype=np.uint16)[: 130 * 29].reshape(130, 29)
    roundtrip(bits, backend)
    roundtrip(np.full((130, 9), 0x8000, dtype=np.uint16), backend)  # all -0.0: present, symbol 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_matrix(backend):
    enc = roundtrip(np.zeros((200, 300), dtype=np.uint16), backend)
    payload = payload_of(enc)
    assert payload[:TABLE] == bytes(TABLE)  # no symbol used
    # 2 x 3 tiles (rows 128, 72; columns 128, 128, 44): each a header (4 + 2 * groups) and a bitmap only
    tiles = [(rows, cols) for rows in (128, 72) for cols in (128, 128, 44)]
    assert len(payload) == TABLE + sum(4 + 2 * -(-r // 8) + r * -(-c // 8) for r, c in tiles)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_symbol_matrix(backend):
    bits = np.full((130, 140), 0x3C00, dtype=np.uint16)
    bits[::3] = 0xBC00  # same symbol, other sign
    enc = roundtrip(bits, backend)
    table = np.frombuffer(payload_of(enc)[:TABLE], dtype=np.uint8)
    assert table[0x3C] == 1 and table.sum() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_e5m2_tiles_with_and_without_exceptions(backend):
    bits = e5m2(gaussian_pruned(1, (128, 256)))
    bits[5, 7] = bits[5, 7] | 0x0001 if bits[5, 7] else 0x3C01  # one exception, in tile 0
    enc = roundtrip(bits, backend)
    payload, (t0, t1) = payload_of(enc), offsets_of(enc)
    mode, reserved, n_exc, subs = tile_fields(payload, t0)
    assert (mode, reserved, n_exc) == (1, 0, 1)
    assert payload[t1 - 1] == 0x01  # the exception list ends the tile: position (u16) then the low byte
    assert struct.unpack_from("<H", payload, t1 - 3)[0] == np.count_nonzero(bits[:5, :128]) + np.count_nonzero(bits[5, :7])
    mode, _, n_exc, subs = tile_fields(payload, t1)
    assert (mode, n_exc) == (1, 0)
    expected = 36 + 2048 + (np.count_nonzero(bits[:, 128:]) + 7) // 8 + sum(subs)
    assert len(payload) - t1 == expected  # no low bytes at all


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_is_whichever_is_smaller(backend):
    bits = gaussian_pruned(2, (128, 128))  # low bytes ~uniform: raw mode
    enc = roundtrip(bits, backend)
    assert tile_fields(payload_of(enc), TABLE)[:3] == (0, 0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    bits = random_bits(7, (200, 300))
    w = as_half(bits).t()
    enc = V2.encode(w, backend=backend)
    np.testing.assert_array_equal(bits_of(V2.decode(enc, backend=backend)), bits.T)


# ---------------------------------------------------------------------------- format, written by hand


def test_hand_written_stream_raw_mode():
    # [[1.0, 0, -1.0009765625]]: one symbol (0x3C) -> length 1, code '0'; 2 values, 1 nonzero low byte
    # -> raw mode (3 * 1 >= 2). Tile: mode 0, reserved 0, n_exc 0, sub_len 1 | bitmap 0b101 | signs 0b10
    # | substream '00' padded | low bytes 00 01.
    enc = encode(as_half(np.array([[0x3C00, 0x0000, 0xBC01]], dtype=np.uint16)), codec="huff-v2")
    table = bytearray(TABLE)
    table[0x3C] = 1
    assert payload_of(enc) == bytes(table) + bytes([0, 0, 0, 0, 1, 0, 0b101, 0b10, 0x00, 0x00, 0x01])
    assert offsets_of(enc) == [TABLE]
    assert enc.info.tolist() == [128, 128, 3, 1, 2]


def test_hand_written_stream_e5m2_mode():
    # [[1.0, 2.0], [1.0, 0]]: symbols 0x3C (x2) and 0x40 (x1) -> lengths 1 and 1, canonical codes 0 and 1;
    # low bytes all 0 -> e5m2 mode with 0 exceptions. Substream: 0,1,0 -> 0b010_00000.
    enc = encode(as_half(np.array([[0x3C00, 0x4000], [0x3C00, 0x0000]], dtype=np.uint16)), codec="huff-v2")
    table = bytearray(TABLE)
    table[0x3C] = table[0x40] = 1
    assert payload_of(enc) == bytes(table) + bytes([1, 0, 0, 0, 1, 0, 0b11, 0b01, 0, 0b01000000])


def test_hand_written_stream_decodes():
    table = bytearray(TABLE)
    table[0x3C] = table[0x40] = 1
    payload = bytes(table) + bytes([1, 0, 1, 0, 1, 0, 0b11, 0b01, 0b100, 0b01000000, 2, 0, 0x55])
    enc = with_payload(encode(as_half(np.ones((2, 2), dtype=np.uint16)), codec="huff-v2"), payload)
    for backend in ["numpy"] + (["native"] if cpu.available() else []):
        out = bits_of(V2.decode(enc, backend=backend))
        np.testing.assert_array_equal(out, [[0x3C00, 0x4000], [0xBC55, 0x0000]])


def test_huffman_lengths_are_limited_canonical_and_complete():
    fib = [1, 1]
    while len(fib) < 25:
        fib.append(fib[-1] + fib[-2])  # plain Huffman depth 24
    counts = np.zeros(128, dtype=np.int64)
    counts[:25] = fib
    lengths = huffman_lengths(counts)
    assert lengths.max() <= 12 and (lengths[:25] > 0).all() and not lengths[25:].any()
    assert sum(2.0 ** -int(l) for l in lengths[:25]) == 1.0  # complete prefix code
    codes = canonical_codes(lengths)
    words = sorted(format(int(codes[s]), f"0{lengths[s]}b") for s in range(25))
    assert all(not b.startswith(a) for a, b in zip(words, words[1:]))  # prefix-free


@pytest.mark.parametrize("backend", BACKENDS)
def test_deep_huffman_tree_roundtrips(backend):
    fib = [1, 1]
    while sum(fib) < 60_000:
        fib.append(fib[-1] + fib[-2])
    symbols = np.repeat(np.arange(len(fib)), fib)  # symbol s, Fibonacci-distributed
    bits = ((symbols + 0x20) << 8 | 0x8000 * (symbols % 2)).astype(np.uint16)
    bits = np.random.default_rng(3).permutation(bits)[: 250 * 240].reshape(250, 240)
    roundtrip(bits, backend)


def test_v2_smaller_than_v1_on_a_realistic_matrix():
    bits = gaussian_pruned(4, (768, 512))
    v1 = encode(as_half(bits), codec="bitmap-v1").weight.numel()
    v2 = encode(as_half(bits), codec="huff-v2").weight.numel()
    assert v2 < 0.85 * v1
    assert 8 * v2 / bits.size < 7.6
    assert encode(as_half(e5m2(bits)), codec="huff-v2").weight.numel() < 0.5 * v1


# ---------------------------------------------------------------------------- native == reference


@native_only
@pytest.mark.parametrize(
    "bits",
    [
        random_bits(10, (300, 260)),
        gaussian_pruned(11, (257, 384)),
        e5m2(gaussian_pruned(12, (256, 200), 0.4)),
        np.zeros((3, 3), dtype=np.uint16),
        np.arange(1 << 16, dtype=np.uint16).reshape(128, 512),
    ],
    ids=["random", "gaussian", "e5m2", "zeros", "all-patterns"],
)
def test_native_encode_matches_reference_byte_for_byte(bits):
    ref = V2.encode(as_half(bits), backend="numpy")
    nat = V2.encode(as_half(bits), backend="native")
    assert torch.equal(nat.weight, ref.weight)
    assert torch.equal(nat.index, ref.index)
    assert torch.equal(nat.info, ref.info)
    np.testing.assert_array_equal(bits_of(V2.decode(ref, backend="native")), bits)


@native_only
@pytest.mark.parametrize("shape", [(1, 1), (300, 260), (130, 7)])
def test_native_decodes_bitmap_v1(shape):
    bits = random_bits(13, shape)
    enc = encode(as_half(bits), codec="bitmap-v1")
    np.testing.assert_array_equal(bits_of(decode_into(enc, torch.empty(shape, dtype=torch.float16))), bits)


@pytest.mark.parametrize("codec", ["bitmap-v1", "huff-v2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_into_preallocated(codec, dtype):
    bits = np.random.default_rng(14).permutation(np.arange(1 << 16, dtype=np.uint16))[:300 * 200].reshape(300, 200)
    enc = encode(as_half(bits), codec=codec)
    out = torch.full((300, 200), 7.0, dtype=dtype)
    ptr = out.data_ptr()
    assert decode_into(enc, out) is out
    assert out.data_ptr() == ptr
    expected = as_half(bits).to(dtype)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan)
    if dtype == torch.float16:
        np.testing.assert_array_equal(bits_of(out), bits)  # NaN payloads included
    else:
        assert torch.equal(out[~nan].view(torch.int32), expected[~nan].view(torch.int32))  # -0.0, subnormals


@pytest.mark.parametrize(
    "out, match",
    [
        (torch.empty(3, 4, dtype=torch.float16), "shape"),
        (torch.empty(4, 3, dtype=torch.bfloat16), "float16/float32"),
        (torch.empty(3, 4, dtype=torch.float16).t(), "contiguous"),
        ("not a tensor", "torch.Tensor"),
    ],
)
def test_decode_into_rejects_bad_out(out, match):
    enc = encode(as_half(random_bits(15, (4, 3))), codec="huff-v2")
    with pytest.raises(SparsezipError, match=match):
        decode_into(enc, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_tile_equals_slice_of_decode(backend):
    bits = gaussian_pruned(16, (300, 260))
    enc = V2.encode(as_half(bits), backend=backend)
    full = bits_of(V2.decode(enc, backend=backend))
    for t in range(9):
        r, c = divmod(t, 3)
        np.testing.assert_array_equal(bits_of(decode_tile(enc.weight, enc.index, enc.info, t)),
                                      full[128 * r : 128 * (r + 1), 128 * c : 128 * (c + 1)])
    with pytest.raises(SparsezipError, match="out of range"):
        decode_tile(enc.weight, enc.index, enc.info, 9)


def test_decode_tile_reads_only_its_bytes():
    bits = e5m2(gaussian_pruned(17, (256, 256)))
    bits[3, 3] |= 0x00AB  # an exception in tile 0
    enc = V2.encode(as_half(bits))
    payload, offsets = bytearray(payload_of(enc)), offsets_of(enc)
    for i in range(offsets[1], len(payload)):  # wreck every other tile
        payload[i] ^= 0x5A
    wrecked = with_payload(enc, bytes(payload))
    np.testing.assert_array_equal(bits_of(decode_tile(wrecked.weight, wrecked.index, wrecked.info, 0)),
                                  bits[:128, :128])
    with pytest.raises(SparsezipError):
        decode(wrecked.weight, wrecked.index, wrecked.info)


# ---------------------------------------------------------------------------- corruption


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, EncodedWeight]:
    bits = e5m2(gaussian_pruned(18, (256, 200)))
    bits[10, 10] = 0x3C07  # exceptions in tile 0
    bits[20, 20] = 0x3C09
    return bits, V2.encode(as_half(bits), backend="numpy")


def corrupt(enc: EncodedWeight, where: int, value: int) -> EncodedWeight:
    payload = bytearray(payload_of(enc))
    payload[where] = value
    return with_payload(enc, bytes(payload))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_is_intact(sample, backend):
    bits, enc = sample
    np.testing.assert_array_equal(bits_of(decode_with(enc, backend)), bits)
    assert tile_fields(payload_of(enc), TABLE)[:3] == (1, 0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crc_mismatch(sample, backend):
    _, enc = sample
    data = bytearray(enc.weight.numpy().tobytes())
    data[HEADER + 500] ^= 1
    bad = EncodedWeight(torch.from_numpy(np.frombuffer(bytes(data), dtype=np.int8).copy()), enc.index, enc.info)
    with pytest.raises(SparsezipError, match="CRC"):
        decode_with(bad, backend)
    if backend == BACKENDS[0]:
        with pytest.raises(SparsezipError, match="CRC"):
            open_weight(bad)  # validated once for a decode loop, the CRC included


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value, match", [(13, "code table"), (1, "code table|Huffman"), (0, "Huffman|length")])
def test_corrupt_code_table(sample, backend, value, match):
    _, enc = sample
    used = [s for s in range(TABLE) if payload_of(enc)[s]]
    # 13: too long; 1 on a second symbol: over-subscribed, or a changed code; 0: a used symbol disappears
    where = used[len(used) // 2] if value != 1 else used[-1]
    with pytest.raises(SparsezipError, match=match):
        decode_with(corrupt(enc, where, value), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("field, delta", [(4, 1), (4, -1), (6, 3), (0, 2), (1, 1), (2, 1)])
def test_corrupt_tile_header(sample, backend, field, delta):
    """sub_len of substreams 0 and 1 (+-), mode, reserved byte, exception count."""
    _, enc = sample
    payload = payload_of(enc)
    with pytest.raises(SparsezipError):
        decode_with(corrupt(enc, TABLE + field, (payload[TABLE + field] + delta) % 256), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["repeat", "too-large", "swap", "zero-byte"])
def test_corrupt_exception_list(sample, backend, change):
    _, enc = sample
    payload, offsets = bytearray(payload_of(enc)), offsets_of(enc)
    end = offsets[1]  # tile 0 ends with: pos0 pos1 (u16 each), byte0 byte1
    p0, p1 = struct.unpack_from("<HH", payload, end - 6)
    if change == "swap":
        struct.pack_into("<HH", payload, end - 6, p1, p0)
    elif change == "zero-byte":
        payload[end - 1] = 0
    else:
        struct.pack_into("<H", payload, end - 4, p0 if change == "repeat" else 1 << 15)
    with pytest.raises(SparsezipError, match="exception"):
        decode_with(with_payload(enc, bytes(payload)), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_substream_bits(sample, backend):
    """Flipping bits inside the Huffman substreams of tile 0 is caught (invalid code, wrong length or padding)."""
    bits, enc = sample
    payload = payload_of(enc)
    _, _, _, subs = tile_fields(payload, TABLE)
    start = TABLE + 36 + 128 * 16 + (np.count_nonzero(bits[:128, :128]) + 7) // 8
    caught = 0
    for i in range(start, start + sum(subs), 97):
        for flip in (0x01, 0x80, 0xFF):
            bad = corrupt(enc, i, payload[i] ^ flip)
            try:
                out = bits_of(decode_with(bad, backend))
            except SparsezipError:
                caught += 1
                continue
            assert not np.array_equal(out, bits)  # a valid-looking stream must at least decode differently
    assert caught > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", [0, 100, 128, 140, -1])
def test_truncated_payload(sample, backend, keep):
    _, enc = sample
    payload = payload_of(enc)
    with pytest.raises(SparsezipError):
        decode_with(with_payload(enc, payload[:keep]), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tile, delta", [(0, 1), (1, -1), (1, 1), (3, 2)])
def test_wrong_index(sample, backend, tile, delta):
    _, enc = sample
    offsets = offsets_of(enc)
    offsets[tile] += delta
    with pytest.raises(SparsezipError, match="index|offset|corrupted"):
        decode_with(with_offsets(enc, offsets), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitmap_bit_outside_matrix(backend):
    bits = random_bits(19, (10, 131))
    enc = V2.encode(as_half(bits), backend="numpy")
    offsets = offsets_of(enc)
    first_row_last_byte = offsets[1] + 4 + 2 * 2  # tile 1: 3 columns, 1 bitmap byte per row, 2 groups
    with pytest.raises(SparsezipError, match="outside the matrix"):
        decode_with(corrupt(enc, first_row_last_byte, payload_of(enc)[first_row_last_byte] | 0x80), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_info_shape(sample, backend):
    _, enc = sample
    info = enc.info.clone()
    info[2] += 1  # more columns: other tile sizes
    with pytest.raises(SparsezipError):
        decode_with(EncodedWeight(enc.weight, enc.index, info), backend)
    info = enc.info.clone()
    info[4] = 1
    with pytest.raises(SparsezipError, match="codec"):
        decode_with(EncodedWeight(enc.weight, enc.index, info), backend)


def test_unknown_backend():
    with pytest.raises(SparsezipError, match="backend"):
        V2.encode(as_half(np.ones((2, 2), dtype=np.uint16)), backend="gpu")


# ---------------------------------------------------------------------------- properties


@native_only
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    hnp.arrays(
        np.uint16,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=140),
        elements=st.one_of(st.just(0), st.sampled_from(SPECIAL), st.integers(0, 0xFFFF),
                           st.integers(0, 0x7F).map(lambda s: s << 8)),
    )
)
def test_native_equals_reference_on_random_matrices(bits):
    ref = V2.encode(as_half(bits), backend="numpy")
    nat = V2.encode(as_half(bits), backend="native")
    assert torch.equal(nat.weight, ref.weight) and torch.equal(nat.index, ref.index)
    np.testing.assert_array_equal(bits_of(V2.decode(ref, backend="native")), bits)
    np.testing.assert_array_equal(bits_of(V2.decode(ref, backend="numpy")), bits)


@native_only
def test_native_and_reference_agree_on_random_corruption(sample):
    """Random byte changes anywhere in the payload (CRC recomputed): the native decoder never crashes, rejects
    what the reference rejects, and decodes what it accepts to the same matrix."""
    bits, enc = sample
    payload = bytearray(payload_of(enc))
    rng = np.random.default_rng(21)
    for _ in range(80):
        bad = bytearray(payload)
        for where in rng.integers(0, len(bad), size=rng.integers(1, 4)):
            bad[where] = int(rng.integers(0, 256))
        corrupted = with_payload(enc, bytes(bad))
        try:
            out = bits_of(decode_with(corrupted, "native"))
        except SparsezipError:
            with pytest.raises(SparsezipError):
                decode_with(corrupted, "numpy")  # the reference rejects it too
            continue
        np.testing.assert_array_equal(out, bits_of(decode_with(corrupted, "numpy")))


@pytest.mark.parametrize("codec_name", ["bitmap-v1", "huff-v2"])
@pytest.mark.parametrize("shape", [(1, 1), (130, 7), (300, 260)])
def test_fused_linear_matches_dense(codec_name, shape):
    bits = gaussian_pruned(22, shape)
    bits.reshape(-1)[::17] = 0x8001  # -subnormals are weights too
    w = as_half(bits)
    enc = encode(w, codec=codec_name)
    x = torch.randn(shape[1], generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.linear(x.double(), w.double()).float()
    y = linear(x, enc)
    assert y.shape == (shape[0],) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    bias = torch.randn(shape[0])
    torch.testing.assert_close(linear(x[None], enc, bias=bias), (expected + bias)[None])
    torch.testing.assert_close(linear(torch.stack([x, -x]), enc), torch.stack([expected, -expected]))
    assert torch.equal(linear(x, open_weight(enc), bias=bias), linear(x, enc, bias=bias))  # validated once
    with pytest.raises(SparsezipError, match="float32"):
        linear(x.half(), enc)
    for bad in (torch.randn(2, shape[1] + 1), torch.randn(2, 2, shape[1]), torch.randn(0, shape[1])):
        with pytest.raises(SparsezipError, match="shape"):
            linear(bad, enc)
