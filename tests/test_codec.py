"""Tests for sparsezip.codec: lossless round trips, the stored format contract, seekable
tiles, and that every kind of corruption is reported as SparsezipError.

Expected values are derived from the input (or from the independent reference encoder
below), never from the code under test.
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

from sparsezip.codec import (
    TILE,
    Codec,
    EncodedWeight,
    codec_for_id,
    decode,
    decode_tile,
    encode,
    get_codec,
    n_tiles,
    register_codec,
)
from sparsezip.errors import SparsezipError

HEADER = 24  # documented stream header size
HEADER_FMT = "<4sHHIIQ"  # magic, codec id, version, crc32(payload), reserved, payload length

# fp16 bit patterns that lossy or float-comparing code tends to get wrong.
SPECIAL = [
    0x0000,  # +0 (absent)
    0x8000,  # -0 (present!)
    0x0001,  # smallest subnormal
    0x8001,
    0x03FF,  # largest subnormal
    0x0400,  # smallest normal
    0x7BFF,  # largest finite
    0x3C00,  # 1.0
    0x7C00,  # +inf
    0xFC00,  # -inf
    0x7E00,  # quiet NaN
    0x7C01,  # signalling NaN with payload
    0x7FFF,  # NaN, all payload bits
    0xFD55,  # negative NaN with payload
    0xFFFF,
]

def slow(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------------------- helpers


def as_half(bits: np.ndarray) -> torch.Tensor:
    """uint16 bit patterns -> float16 tensor with exactly those bits."""
    return torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint16).view(np.int16).copy()).view(torch.float16)


def bits_of(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def random_bits(seed: int, shape: tuple[int, int], sparsity: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits[rng.random(shape) < sparsity] = 0
    return bits


def roundtrip(bits: np.ndarray) -> EncodedWeight:
    """Encode, decode, and assert the result is bit-identical (NaN-safe: compares bits)."""
    original = bits.copy()
    enc = encode(as_half(bits))
    out = decode(enc.weight, enc.index, enc.info)
    assert out.dtype == torch.float16
    assert out.device.type == "cpu"
    assert tuple(out.shape) == bits.shape
    np.testing.assert_array_equal(bits_of(out), original)
    return enc


def stream_bytes(enc: EncodedWeight) -> bytes:
    return enc.weight.numpy().tobytes()


def int8_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.int8).copy())


def with_stream(enc: EncodedWeight, data: bytes) -> EncodedWeight:
    return EncodedWeight(int8_tensor(data), enc.index, enc.info)


def with_index(enc: EncodedWeight, data: bytes) -> EncodedWeight:
    return EncodedWeight(enc.weight, int8_tensor(data), enc.info)


def with_info(enc: EncodedWeight, info: torch.Tensor) -> EncodedWeight:
    return EncodedWeight(enc.weight, enc.index, info)


def run_decode(enc: EncodedWeight) -> torch.Tensor:
    return decode(enc.weight, enc.index, enc.info)


def reference_payload(bits: np.ndarray) -> tuple[bytes, list[int]]:
    """Independent, loop-based encoder written from the format contract (small inputs only)."""
    n, k = bits.shape
    payload = bytearray()
    offsets = []
    for r0 in range(0, n, TILE):
        for c0 in range(0, k, TILE):
            tile = bits[r0 : r0 + TILE, c0 : c0 + TILE]
            rows, cols = tile.shape
            offsets.append(len(payload))
            values = bytearray()
            for r in range(rows):
                row = bytearray((cols + 7) // 8)
                for c in range(cols):
                    v = int(tile[r, c])
                    if v != 0:
                        row[c // 8] |= 1 << (c % 8)
                        values += struct.pack("<H", v)
                payload += row
            payload += values
    return bytes(payload), offsets


# ---------------------------------------------------------------------------- round trips

SHAPES = st.one_of(
    st.sampled_from([(1, 1), (1, 300), (300, 1), (128, 128), (129, 257), (255, 129), (576, 1536)]),
    st.tuples(st.integers(1, 300), st.integers(1, 300)),
)
SPARSITY = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0))


@slow(60)
@given(
    shape=SHAPES,
    sparsity=SPARSITY,
    seed=st.integers(0, 2**32 - 1),
    specials=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.sampled_from(SPECIAL)), max_size=40),
)
def test_roundtrip_random_bit_patterns(shape, sparsity, seed, specials):
    bits = random_bits(seed, shape, sparsity)
    flat = bits.reshape(-1)
    for where, value in specials:  # sprinkle ±0, subnormals, ±inf, NaN payloads
        flat[int(where * flat.size)] = value
    roundtrip(bits)


@slow(100)
@given(
    hnp.arrays(
        np.uint16,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
        elements=st.one_of(st.sampled_from(SPECIAL), st.integers(0, 0xFFFF)),
    )
)
def test_roundtrip_small_arrays_shrinkable(bits):
    roundtrip(bits)


@pytest.mark.parametrize("shape", [(1, 1), (129, 257), (576, 1536)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_roundtrip_fixed_shapes(shape, sparsity):
    bits = random_bits(1234, shape, sparsity)
    if sparsity == 1.0:
        assert not bits.any()
    roundtrip(bits)


def test_roundtrip_every_special_value_in_every_position_of_an_edge_tile():
    bits = np.array(SPECIAL * 20, dtype=np.uint16)[: 17 * 13].reshape(17, 13)
    roundtrip(bits)
    roundtrip(np.full((130, 9), 0x8000, dtype=np.uint16))  # all -0.0


def test_non_contiguous_input_and_input_is_not_modified():
    bits = random_bits(7, (200, 300), 0.5)
    w = as_half(bits).t()  # [300, 200], non-contiguous
    before = bits_of(w).copy()
    enc = encode(w)
    np.testing.assert_array_equal(bits_of(w), before)
    np.testing.assert_array_equal(bits_of(run_decode(enc)), before)


# ---------------------------------------------------------------------------- format contract


@pytest.mark.parametrize("shape", [(1, 1), (129, 257), (576, 1536)])
def test_stored_tensors_match_contract(shape):
    n, k = shape
    enc = encode(as_half(random_bits(3, shape, 0.5)))
    tiles = -(-n // 128) * -(-k // 128)
    assert enc.info.dtype == torch.int64
    assert enc.info.tolist() == [128, 128, k, n, 1]
    assert enc.index.dtype == torch.int8 and enc.index.dim() == 1
    assert enc.index.numel() == 8 * tiles == 8 * n_tiles(n, k)
    assert enc.weight.dtype == torch.int8 and enc.weight.dim() == 1


def test_full_tile_size_is_header_plus_bitmap_plus_values():
    bits = random_bits(11, (128, 128), 0.5)
    nnz = int(np.count_nonzero(bits))
    assert 0 < nnz < 128 * 128
    enc = encode(as_half(bits))
    assert enc.weight.numel() == HEADER + 2048 + 2 * nnz


def test_negative_zero_is_stored_as_a_value():
    enc = encode(as_half(np.full((3, 5), 0x8000, dtype=np.uint16)))
    assert enc.weight.numel() == HEADER + 3 * 1 + 2 * 15


def test_header_fields():
    bits = random_bits(5, (129, 257), 0.5)
    enc = encode(as_half(bits))
    data = stream_bytes(enc)
    magic, codec_id, version, crc, reserved, length = struct.unpack(HEADER_FMT, data[:HEADER])
    payload = data[HEADER:]
    assert (magic, codec_id, version, reserved) == (b"SPZW", 1, 1, 0)
    assert length == len(payload)
    assert crc == zlib.crc32(payload)


@pytest.mark.parametrize("shape", [(1, 1), (3, 13), (129, 257), (130, 9)])
def test_layout_matches_independent_reference_encoder(shape):
    bits = random_bits(9, shape, 0.5)
    bits.reshape(-1)[:: 7] = 0x8000  # some -0.0 entries, which must be stored
    expected_payload, expected_offsets = reference_payload(bits)
    enc = encode(as_half(bits))
    assert stream_bytes(enc)[HEADER:] == expected_payload
    assert list(struct.unpack(f"<{len(expected_offsets)}q", enc.index.numpy().tobytes())) == expected_offsets


def test_edge_tiles_are_not_padded():
    n, k = 129, 257  # tile rows of 128 and 1, tile columns of 128, 128 and 1
    bits = random_bits(13, (n, k), 0.5)
    nnz = int(np.count_nonzero(bits))
    bitmap = sum(r * ((c + 7) // 8) for r in (128, 1) for c in (128, 128, 1))
    assert encode(as_half(bits)).weight.numel() == HEADER + bitmap + 2 * nnz


# ---------------------------------------------------------------------------- seekable tiles


def test_every_tile_decodes_alone_and_matches_the_full_decode():
    n, k = 300, 260  # 3 x 3 tiles with edge tiles in both directions
    bits = random_bits(17, (n, k), 0.5)
    enc = encode(as_half(bits))
    full = bits_of(run_decode(enc))
    tile_cols = -(-k // TILE)
    for t in range(n_tiles(n, k)):
        tr, tc = divmod(t, tile_cols)
        expected = full[tr * TILE : (tr + 1) * TILE, tc * TILE : (tc + 1) * TILE]
        got = decode_tile(enc.weight, enc.index, enc.info, t)
        assert got.dtype == torch.float16
        assert tuple(got.shape) == expected.shape
        np.testing.assert_array_equal(bits_of(got), expected)
        np.testing.assert_array_equal(bits_of(got), bits[tr * TILE : (tr + 1) * TILE, tc * TILE : (tc + 1) * TILE])


def test_decode_tile_only_reads_its_own_bytes():
    bits = random_bits(19, (256, 256), 0.5)
    enc = encode(as_half(bits))
    offsets = struct.unpack("<4q", enc.index.numpy().tobytes())
    data = bytearray(stream_bytes(enc))
    data[HEADER + offsets[3] - 1] ^= 0xFF  # last value byte of tile 2
    bad = with_stream(enc, bytes(data))
    np.testing.assert_array_equal(bits_of(decode_tile(bad.weight, bad.index, bad.info, 0)), bits[:128, :128])
    np.testing.assert_array_equal(bits_of(decode_tile(bad.weight, bad.index, bad.info, 3)), bits[128:, 128:])
    with pytest.raises(SparsezipError, match="CRC"):
        run_decode(bad)


@pytest.mark.parametrize("tile", [-1, 9, 100])
def test_decode_tile_out_of_range(tile):
    enc = encode(as_half(random_bits(1, (300, 260), 0.5)))
    with pytest.raises(SparsezipError, match="out of range"):
        decode_tile(enc.weight, enc.index, enc.info, tile)


def test_decode_tile_rejects_inconsistent_offset():
    enc = encode(as_half(random_bits(1, (300, 260), 0.5)))
    offsets = list(struct.unpack("<9q", enc.index.numpy().tobytes()))
    offsets[4] += 2
    bad = with_index(enc, struct.pack("<9q", *offsets))
    with pytest.raises(SparsezipError, match="index offsets"):
        decode_tile(bad.weight, bad.index, bad.info, 3)
    with pytest.raises(SparsezipError, match="index offsets"):
        decode_tile(bad.weight, bad.index, bad.info, 4)


# ---------------------------------------------------------------------------- corruption


@pytest.fixture(scope="module")
def sample() -> EncodedWeight:
    return encode(as_half(random_bits(23, (300, 260), 0.5)))


def test_intact_sample_decodes(sample):
    run_decode(sample)  # guards the corruption tests below against a broken fixture


def test_flipped_payload_byte(sample):
    data = bytearray(stream_bytes(sample))
    data[HEADER + len(data) // 2] ^= 0x10
    with pytest.raises(SparsezipError, match="CRC"):
        run_decode(with_stream(sample, bytes(data)))


@pytest.mark.parametrize("keep", [-1, -2, HEADER, HEADER - 1, 0])
def test_truncated_stream(sample, keep):
    data = stream_bytes(sample)[:keep]
    with pytest.raises(SparsezipError, match="stream length"):
        run_decode(with_stream(sample, data))


def test_appended_bytes(sample):
    with pytest.raises(SparsezipError, match="stream length"):
        run_decode(with_stream(sample, stream_bytes(sample) + b"\0\0"))


def test_bad_magic(sample):
    data = b"GGUF" + stream_bytes(sample)[4:]
    with pytest.raises(SparsezipError, match="magic"):
        run_decode(with_stream(sample, data))


def test_header_codec_id_disagrees_with_info(sample):
    data = bytearray(stream_bytes(sample))
    data[4:6] = struct.pack("<H", 2)
    with pytest.raises(SparsezipError, match="codec id 2"):
        run_decode(with_stream(sample, bytes(data)))


@pytest.mark.parametrize("field, value, match", [(6, 2, "version 2"), (12, 1, "reserved")])
def test_bad_header_version_or_reserved_field(sample, field, value, match):
    data = bytearray(stream_bytes(sample))
    data[field] = value
    with pytest.raises(SparsezipError, match=match):
        run_decode(with_stream(sample, bytes(data)))


@pytest.mark.parametrize("tile, delta", [(1, 2), (1, -2), (4, 1), (8, 2), (0, 2)])
def test_changed_index_entry(sample, tile, delta):
    offsets = list(struct.unpack("<9q", sample.index.numpy().tobytes()))
    offsets[tile] += delta
    with pytest.raises(SparsezipError, match="index offset"):
        run_decode(with_index(sample, struct.pack("<9q", *offsets)))


@pytest.mark.parametrize("value", [-1, -(2**63), 2**62, 10**9])
def test_index_entry_outside_payload(sample, value):
    offsets = list(struct.unpack("<9q", sample.index.numpy().tobytes()))
    offsets[5] = value
    bad = with_index(sample, struct.pack("<9q", *offsets))
    with pytest.raises(SparsezipError, match="outside"):
        run_decode(bad)
    with pytest.raises(SparsezipError, match="outside"):
        decode_tile(bad.weight, bad.index, bad.info, 2)


@pytest.mark.parametrize("size_change", [-8, 8, -1])
def test_wrong_index_length(sample, size_change):
    data = sample.index.numpy().tobytes()
    data = data[:size_change] if size_change < 0 else data + bytes(size_change)
    with pytest.raises(SparsezipError, match="index has"):
        run_decode(with_index(sample, data))


def test_unknown_codec_id_in_info(sample):
    info = sample.info.clone()
    info[4] = 99
    with pytest.raises(SparsezipError, match=r"unknown codec id 99.*bitmap-v1"):
        run_decode(with_info(sample, info))
    with pytest.raises(SparsezipError, match=r"unknown codec id 99.*bitmap-v1"):
        decode_tile(sample.weight, sample.index, info, 0)


@pytest.mark.parametrize(
    "info",
    [
        torch.tensor([128, 128, 260, 300], dtype=torch.int64),
        torch.tensor([[128, 128, 260, 300, 1]], dtype=torch.int64),
        torch.tensor([128, 128, 260, 300, 1, 0], dtype=torch.int64),
        torch.tensor([128, 128, 260, 300, 1], dtype=torch.int32),
        [128, 128, 260, 300, 1],
    ],
)
def test_info_with_wrong_shape_or_type(sample, info):
    with pytest.raises(SparsezipError, match="info must be"):
        run_decode(with_info(sample, info))


@pytest.mark.parametrize(
    "values, match",
    [
        ([64, 128, 260, 300, 1], "tile size"),
        ([128, 256, 260, 300, 1], "tile size"),
        ([128, 128, 0, 300, 1], "invalid matrix shape"),
        ([128, 128, 260, -5, 1], "invalid matrix shape"),
        ([128, 128, 260, 299, 1], "index offsets"),  # same tile count, different bitmap sizes
        ([128, 128, 259, 300, 1], "outside the matrix"),  # same bitmap bytes, but column 259 is now padding
        ([128, 128, 270, 300, 1], "index offsets"),  # one bitmap byte more per row of the last tile column
        ([128, 128, 260, 600, 1], "index has"),  # different tile count
    ],
)
def test_info_with_wrong_values(sample, values, match):
    with pytest.raises(SparsezipError, match=match):
        run_decode(with_info(sample, torch.tensor(values, dtype=torch.int64)))


@pytest.mark.parametrize(
    "weight",
    [
        torch.zeros(100, dtype=torch.uint8),
        torch.zeros(4, 25, dtype=torch.int8),
        np.zeros(100, dtype=np.int8),
    ],
)
def test_stream_of_wrong_type(sample, weight):
    with pytest.raises(SparsezipError, match="weight stream must be"):
        run_decode(EncodedWeight(weight, sample.index, sample.info))


def test_bitmap_bits_outside_the_matrix_are_rejected_even_with_a_valid_crc():
    bits = random_bits(29, (2, 13), 0.0)  # one tile; 2 bitmap bytes per row, bits 5..7 of the 2nd are padding
    assert bits.all()
    enc = encode(as_half(bits))
    data = bytearray(stream_bytes(enc))
    assert data[HEADER + 1] == 0b0001_1111  # row 0, columns 8..12
    data[HEADER + 1] = 0b1000_1111  # move column 12's bit into the padding: popcount and sizes unchanged
    data[8:12] = struct.pack("<I", zlib.crc32(bytes(data[HEADER:])))  # re-seal: only the bitmap check can notice
    bad = with_stream(enc, bytes(data))
    with pytest.raises(SparsezipError, match="outside the matrix"):
        run_decode(bad)
    with pytest.raises(SparsezipError, match="outside the matrix"):
        decode_tile(bad.weight, bad.index, bad.info, 0)


@slow(200)
@given(
    part=st.sampled_from(["header", "payload", "index"]),
    where=st.floats(0.0, 1.0, exclude_max=True),
    xor=st.integers(1, 255),
)
def test_any_single_byte_change_is_detected(part, where, xor):
    enc = _FUZZ_SAMPLE
    data = bytearray(enc.index.numpy().tobytes() if part == "index" else stream_bytes(enc))
    lo, hi = {"header": (0, HEADER), "payload": (HEADER, len(data)), "index": (0, len(data))}[part]
    data[lo + int(where * (hi - lo))] ^= xor
    bad = with_index(enc, bytes(data)) if part == "index" else with_stream(enc, bytes(data))
    with pytest.raises(SparsezipError):
        run_decode(bad)


_FUZZ_SAMPLE = encode(as_half(random_bits(31, (200, 300), 0.6)))


# ---------------------------------------------------------------------------- encode input checks


@pytest.mark.parametrize(
    "weight, match",
    [
        (torch.zeros(4, 4, dtype=torch.float32), "float16"),
        (torch.zeros(4, 4, dtype=torch.bfloat16), "float16"),
        (torch.zeros(4, 4, dtype=torch.int16), "float16"),
        (torch.zeros(16, dtype=torch.float16), "2-D"),
        (torch.zeros(2, 4, 4, dtype=torch.float16), "2-D"),
        (torch.tensor(1.0, dtype=torch.float16), "2-D"),
        (torch.zeros(0, 5, dtype=torch.float16), "not supported"),
        (np.zeros((4, 4), dtype=np.float16), "torch.Tensor"),
    ],
)
def test_encode_rejects_bad_input(weight, match):
    with pytest.raises(SparsezipError, match=match):
        encode(weight)


# ---------------------------------------------------------------------------- registry


def test_builtin_codec_is_registered_by_name_and_id():
    codec = get_codec("bitmap-v1")
    assert (codec.name, codec.version, codec.codec_id) == ("bitmap-v1", "1.0", 1)
    assert codec_for_id(1) is codec
    assert isinstance(codec, Codec)


def test_unknown_codec_name_lists_known_codecs():
    with pytest.raises(SparsezipError, match=r"unknown codec 'zstd'.*bitmap-v1"):
        get_codec("zstd")
    with pytest.raises(SparsezipError, match=r"unknown codec 'zstd'.*bitmap-v1"):
        encode(as_half(np.ones((2, 2), dtype=np.uint16)), codec="zstd")
    with pytest.raises(SparsezipError, match=r"unknown codec id 0.*bitmap-v1"):
        codec_for_id(0)


@pytest.mark.parametrize("name, codec_id", [("bitmap-v1", 77), ("test-dup-id", 1)])
def test_register_rejects_clashes_and_leaves_registry_intact(name, codec_id):
    class Clash(Codec):
        def encode(self, weight):
            raise AssertionError

        def decode(self, enc):
            raise AssertionError

        def decode_tile(self, enc, tile):
            raise AssertionError

    Clash.name, Clash.version, Clash.codec_id = name, "0", codec_id
    with pytest.raises(SparsezipError, match="clashes"):
        register_codec(Clash)
    assert get_codec("bitmap-v1").codec_id == 1
    assert codec_for_id(1).name == "bitmap-v1"
    with pytest.raises(SparsezipError):
        get_codec("test-dup-id")
    with pytest.raises(SparsezipError):
        codec_for_id(77)


def test_n_tiles():
    assert n_tiles(1, 1) == 1
    assert n_tiles(128, 128) == 1
    assert n_tiles(129, 257) == 2 * 3
    assert n_tiles(576, 1536) == 5 * 12
    with pytest.raises(SparsezipError):
        n_tiles(0, 5)


def test_inspect_counts_only_positive_zeros_across_chunks():
    """inspect's sparsity counts +0.0 only (-0.0 is a stored value), the same in any chunking of the tensor."""
    from sparsezip.report import count_zeros

    t = torch.tensor([0.0, -0.0, 1.0, 0.0, -2.0] * 7, dtype=torch.float16).view(5, 7)
    assert count_zeros(t) == 14
    assert count_zeros(t, chunk=3) == 14
    assert count_zeros(t.to(torch.float32), chunk=4) == 14
