"""The native fp16-weight GEMV must compute what an fp32 matmul on the same weights computes."""

import pytest
import torch

from sparsezip import codec
from sparsezip.kernels import cpu
from sparsezip.kernels.cpu import gemv
from sparsezip.kernels.cpu.gemv import GEMV_MAX_ROWS, mixed_linear

needs_native = pytest.mark.skipif(not cpu.available(), reason="native extension not built")


def reference(x, w, bias=None):
    return torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, GEMV_MAX_ROWS])
@pytest.mark.parametrize("k", [1, 8, 13, 96, 577])
def test_gemv_matches_an_fp64_matmul(rows, k, kernel_level):
    gen = torch.Generator().manual_seed(rows * 1000 + k)
    w = torch.randn(37, k, generator=gen).half()
    x = torch.randn(rows, k, generator=gen)
    got = mixed_linear(x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, 37)
    torch.testing.assert_close(got.double(), reference(x, w), rtol=1e-5, atol=1e-5 * k**0.5)


@needs_native
def test_gemv_converts_every_finite_fp16_pattern_exactly(kernel_level):
    # all finite fp16 values (subnormals, -0.0, the largest) as weights; x one-hot picks each weight exactly
    bits = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = bits[torch.isfinite(bits)]
    w = finite[: finite.numel() // 13 * 13].view(-1, 13)  # k = 13: 8 in the SIMD loop, 5 in the scalar tail
    for col in range(13):
        x = torch.zeros(1, 13)
        x[0, col] = 1.0
        got = mixed_linear(x, w)[0]
        assert torch.equal(got, w[:, col].float()), col


@needs_native
def test_gemv_with_bias_batch_dims_and_threads():
    gen = torch.Generator().manual_seed(5)
    w, bias = torch.randn(300, 64, generator=gen).half(), torch.randn(300, generator=gen)
    x = torch.randn(2, 3, 64, generator=gen)
    got = mixed_linear(x, w, bias)
    assert got.shape == (2, 3, 300)
    torch.testing.assert_close(got.double(), reference(x, w, bias), rtol=1e-5, atol=1e-4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = mixed_linear(x, w, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, got)  # rows are split over threads, never a dot product


def test_many_rows_and_same_dtypes_take_torch_path():
    w = torch.randn(20, 16).half()
    x = torch.randn(GEMV_MAX_ROWS + 1, 16)
    torch.testing.assert_close(mixed_linear(x, w), x @ w.float().T)
    wf = torch.randn(20, 16)
    assert torch.equal(mixed_linear(x, wf), torch.nn.functional.linear(x, wf))


@needs_native
@pytest.mark.parametrize("codec_name", ["bitmap-v1", "huff-v2", "nibble-v3"])
@pytest.mark.parametrize("shape", [(130, 13), (256, 128), (300, 577)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13])
def test_gemv_is_bit_identical_to_the_fused_compressed_linear(codec_name, shape, rows, kernel_level):
    """Dense mode (fp16 GEMV) and compressed mode (multiply from the tiles) must agree to the bit for the few rows
    of a decode step (one row; several, each tile row multiplied from its compact values in passes of up to 8: 13
    rows take two), at every kernel level. At the AVX-512 level several rows take 3 tile rows per step: the 128-row
    tiles end in 2 rows one by one, the 44-row ones of 300 too, the 2-row ones of 130 have no step of 3; and the
    tile's sums go into y by vectors of 8 rows and a remainder (44 = 5 x 8 + 4)."""
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=gen).half()
    w[torch.rand(*shape, generator=gen) < 0.5] = 0
    x, bias = torch.randn(rows, shape[1], generator=gen), torch.randn(shape[0], generator=gen)
    enc = codec.encode(w, codec_name)
    assert torch.equal(mixed_linear(x, w, bias), codec.linear(x, enc, bias))


@needs_native
def test_native_gemv_with_many_rows():
    """Large weights use the kernel for up to GEMV_MAX_ROWS_LARGE rows: call it directly at 40 rows."""
    gen = torch.Generator().manual_seed(8)
    w, x = torch.randn(50, 70, generator=gen).half(), torch.randn(40, 70, generator=gen)
    y = torch.empty(40, 50)
    cpu.native.gemv_f16(w.numpy(), x.numpy(), y.numpy(), 50, 70, 40, False, 2)
    torch.testing.assert_close(y.double(), reference(x, w), rtol=1e-5, atol=1e-4)


@needs_native
@pytest.mark.parametrize("rows", [4, 8, 13, 16, 17, 40])
def test_row_bands_give_the_same_floats_as_every_layout(rows, kernel_level):
    """Activations wider than L1 make the dense kernel walk bands of 9 weight rows chunk by chunk (and a sparse
    prefill expand such bands; at the AVX-512 level sparse bands of up to 16 rows are walked straight from the
    layout), at the AVX-512 level 3 weight rows per step: the sums must stay those of the shared order. 23 rows = two bands and a partial one of 5 (3 rows, then 2 one by one); on 2 threads 11 and 12 rows;
    k = 2100 = 16 tiles and 52 columns, not a multiple of 8; 1 and 2 threads."""
    n, k = 23, 2100
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(rows)).half()
    w[torch.rand(n, k, generator=torch.Generator().manual_seed(99)) < 0.5] = 0
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + 1))
    sparse = gemv.pack_sparse(w)
    results = []
    for threads in (1, 2):
        dense, from_sparse = torch.empty(rows, n), torch.empty(rows, n)
        cpu.native.gemv_f16(w.view(torch.int16).numpy(), x.numpy(), dense.numpy(), n, k, rows, False, threads)
        cpu.native.sparse_gemv(*sparse.arrays(), x.numpy(), from_sparse.numpy(), n, k, rows, threads)
        results += [dense, from_sparse]
    if rows <= 16:
        results.append(codec.linear(x, codec.encode(w, "nibble-v3")))
    for b in (0, rows - 1):  # a row alone: one weight row at a time, each tile's lanes added one row at a time
        alone = torch.empty(1, n)
        cpu.native.gemv_f16(w.view(torch.int16).numpy(), x[b:b + 1].numpy(), alone.numpy(), n, k, 1, False, 1)
        results.append(torch.cat([results[0][:b], alone, results[0][b + 1:]]))
    torch.testing.assert_close(results[0].double(), reference(x, w), rtol=1e-5, atol=1e-4)
    for other in results[1:]:
        assert torch.equal(other, results[0])


@needs_native
def test_column_blocks_hold_the_matrix():
    """Blocks of BLOCK_COLS columns one after the other, each row-major; a short last block; and back."""
    n, k = 3, 2 * cpu.native.BLOCK_COLS + 5
    w = torch.arange(n * k, dtype=torch.float32).view(n, k).half()
    flat = gemv.block_columns(w)
    width = cpu.native.BLOCK_COLS
    assert flat.shape == (n * k,)
    assert torch.equal(flat[:width], w[0, :width]) and torch.equal(flat[width:2 * width], w[1, :width])
    assert torch.equal(flat[2 * n * width:2 * n * width + 5], w[0, 2 * width:])
    assert torch.equal(gemv.unblock_columns(flat, n, k), w)
    assert not gemv.blocks_columns(gemv.WIDE_COLS) and gemv.blocks_columns(gemv.WIDE_COLS + 1)


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 13, 40])
def test_column_blocked_gemv_gives_the_row_major_floats(rows, kernel_level):
    """A wide matrix held in column blocks, its products added block after block into y, must give the same floats
    as the row-major matrix in one pass (every row's tile sums still added in column order), at every kernel level,
    row count (one row, bands of 9, a partial pass) and thread count; k = 2 blocks, 7 tiles and 13 columns."""
    n, k = 23, 2 * cpu.native.BLOCK_COLS + 7 * 128 + 13
    gen = torch.Generator().manual_seed(rows)
    w, x = torch.randn(n, k, generator=gen).half(), torch.randn(rows, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    flat = gemv.block_columns(w)
    expected = torch.empty(rows, n)
    cpu.native.gemv_f16(w.view(torch.int16).numpy(), x.numpy(), expected.numpy(), n, k, rows, False, 1)
    torch.testing.assert_close(expected.double(), reference(x, w), rtol=1e-5, atol=1e-4)
    for threads in (1, 2):
        got = torch.empty(rows, n)
        cpu.native.gemv_f16(flat.view(torch.int16).numpy(), x.numpy(), got.numpy(), n, k, rows, True, threads)
        assert torch.equal(got, expected)
    assert torch.equal(gemv.blocked_linear(x, flat, n, bias), mixed_linear(x, w, bias))


@needs_native
def test_column_blocked_linear_with_many_rows_unblocks_for_torch():
    """Past the GEMV's rows the matrix is unblocked for torch's matmul, as mixed_linear converts the plain one."""
    n, k = 9, cpu.native.BLOCK_COLS + 300
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(n, k, generator=gen).half(), torch.randn(GEMV_MAX_ROWS + 1, k, generator=gen)
    assert torch.equal(gemv.blocked_linear(x, gemv.block_columns(w), n, None), mixed_linear(x, w))


# ----------------------------------------------------------------------------- sparse layout (pack_sparse)


def pruned(shape, seed, density=0.5, e5m2=False):
    """A random fp16 matrix with `density` nonzero entries; with e5m2 most low bytes are 0 (as after L2
    rounding) and every 23rd nonzero keeps a nonzero low byte (an exception)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen).half()
    w[torch.rand(*shape, generator=gen) >= density] = 0
    if e5m2:
        bits = w.view(torch.int16)
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        keep[::23] = True
        bits[~keep.view(shape)] &= ~0xFF
        w[(bits == 0)] = 0  # dropping a low byte may leave a pattern of 0: absent, like the codec treats it
    return w


def bit_equal(a, b):
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def unpack_without_native(sparse, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(gemv, "native", None)
        return gemv.unpack_sparse(sparse)


def chunk_group_bytes(w):
    """Bytes of values of each row's chunk groups [n, chunks, 16], worked out here from the layout's definition, not
    by the packer: chunk group g of a chunk of 4 tiles holds group g (8 columns) of each of its tiles, 1 byte per
    nonzero, or 2 where any of them has a nonzero low byte."""
    bits = w.view(torch.int16).int() & 0xFFFF
    n, k = bits.shape
    chunks = -(-k // 512)
    padded = torch.zeros(n, chunks * 512, dtype=torch.int32)
    padded[:, :k] = bits
    groups = padded.view(n, chunks, 4, 16, 8).transpose(2, 3).reshape(n, chunks, 16, 32)  # [row, chunk, g, columns]
    nnz = (groups != 0).sum(3)
    wide = ((groups & 0xFF) != 0).any(3)
    return nnz * (1 + wide.int()), wide


def expected_stream_bytes(w):
    return int(chunk_group_bytes(w)[0].sum())


@pytest.mark.parametrize("e5m2", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (37, 13), (9, 128), (130, 300), (3, 4100)])
def test_sparse_layout_round_trips_and_picks_its_value_width(shape, e5m2, monkeypatch):
    w = pruned(shape, seed=shape[0] * 7 + shape[1], e5m2=e5m2)
    sparse = gemv.pack_sparse(w)
    assert int(sparse.row_start[-1]) == expected_stream_bytes(w)
    group_bytes, wide = chunk_group_bytes(w)
    for r in range(0, shape[0], 7):  # each chunk's values start where the earlier chunks' end; its wide groups
        starts = [0] + group_bytes[r].sum(1).cumsum(0)[:-1].tolist()
        wide_bits = [sum(int(bit) << (48 + g) for g, bit in enumerate(chunk)) for chunk in wide[r]]
        assert [int(v) & (2**48 - 1) for v in sparse.chunk_start[r]] == starts
        assert [int(v) & ~(2**48 - 1) for v in sparse.chunk_start[r]] == wide_bits
    nnz = int((w.view(torch.int16) != 0).sum())
    exceptions = int(((w.view(torch.int16) & 0xFF) != 0).sum())
    if not e5m2:  # fp16 values take two bytes each; E5M2 ones one, but a chunk group with an exception takes two
        assert int(sparse.row_start[-1]) == 2 * nnz
    elif exceptions == 0:
        assert int(sparse.row_start[-1]) == nnz
    assert bit_equal(unpack_without_native(sparse, monkeypatch), w)
    if cpu.available():
        assert bit_equal(gemv.unpack_sparse(sparse), w)
        as_f32 = gemv.unpack_sparse(sparse, torch.empty(shape, dtype=torch.float32))
        assert torch.equal(as_f32, w.float())
    assert not any(a.flags.writeable for a in sparse.arrays())  # the kernel trusts the arrays: nobody may edit them


def test_sparse_layout_interleaves_the_tiles_of_a_chunk():
    """codes hold group 0 of each of a chunk's tiles, then group 1 of each, ...: column 128 t + 8 g + j of chunk c
    (tiles 4c ..) is bit j of byte 64 c + g * (its tiles) + t - 4c; a partial last chunk of 2 tiles interleaves 2."""
    n, k = 2, 512 + 128 + 7
    w = torch.zeros(n, k, dtype=torch.float16)
    w[0, 3 * 128 + 8 * 5 + 2] = 1.0  # chunk 0, tile 3, group 5, column 2
    w[1, 512 + 128 + 6] = -2.0  # chunk 1 (2 tiles), tile 1, group 0, column 6
    sparse = gemv.pack_sparse(w)
    assert sparse.codes.shape == (n, 6 * 16)
    assert sparse.codes[0].nonzero()[0].tolist() == [5 * 4 + 3] and sparse.codes[0, 23] == 1 << 2
    assert sparse.codes[1].nonzero()[0].tolist() == [64 + 0 * 2 + 1] and sparse.codes[1, 65] == 1 << 6
    assert sparse.values[:2].tolist() == [0x3C, 0xC0]  # both narrow: their high bytes, row after row


def test_sparse_layout_is_one_allocation():
    """The four arrays of a matrix lie in one buffer, each on a 64-byte step from the first, so that large matrices'
    codes share the values' huge pages."""
    sparse = gemv.pack_sparse(pruned((200, 300), seed=3, e5m2=True))
    starts = [a.ctypes.data for a in sparse.arrays()]
    assert starts == sorted(starts) and all((s - starts[0]) % 64 == 0 for s in starts)
    ends = [s + a.nbytes for s, a in zip(starts, sparse.arrays())]
    assert all(end <= nxt < end + 64 for end, nxt in zip(ends, starts[1:]))  # adjacent: no gap of a separate block


def test_sparse_layout_is_lossless_for_every_fp16_pattern(monkeypatch, kernel_level):
    """All 65536 bit patterns (-0.0, subnormals, inf, NaN payloads), in both value widths."""
    every = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16)
    for w in (every.view(256, 256), every.view(256, 256) & ~0xFF | (every.view(256, 256) == 0x1234).short()):
        w = w.view(torch.float16)
        sparse = gemv.pack_sparse(w)
        assert int(sparse.row_start[-1]) == expected_stream_bytes(w)
        assert bit_equal(unpack_without_native(sparse, monkeypatch), w)
        if cpu.available():
            assert bit_equal(gemv.unpack_sparse(sparse), w)
            as_f32 = gemv.unpack_sparse(sparse, torch.empty(256, 256, dtype=torch.float32))
            nan = torch.isnan(w)
            assert torch.equal(torch.isnan(as_f32), nan) and torch.equal(as_f32[~nan], w.float()[~nan])


@needs_native
@pytest.mark.parametrize("e5m2", [False, True])
@pytest.mark.parametrize("shape", [(37, 13), (64, 136), (300, 577), (5, 4100)])
def test_sparse_linear_is_bit_identical_to_the_dense_gemv(shape, e5m2, kernel_level):
    """The promise that lets `--weights sparse` give the same tokens as `--weights dense`: every row count the
    kernel takes, columns that are not a multiple of 8 or of 128, rows longer than the kernel's 4096-column chunk."""
    w = pruned(shape, seed=sum(shape), e5m2=e5m2)
    sparse = gemv.pack_sparse(w)
    bias = torch.randn(shape[0])
    for rows in (1, 2, 8, 9, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 3):
        x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
        assert torch.equal(gemv.sparse_linear(x, sparse, bias), mixed_linear(x, w, bias)), rows


@needs_native
@pytest.mark.parametrize("k", [512, 1024, 2100, 4100])
def test_one_activation_row_from_every_kind_of_chunk(k, kernel_level):
    """A decode step's product from rows whose chunk groups are all narrow (E5M2), all wide (fp16), mixed, empty or
    full, walked two rows at a time at the AVX-512 level (an odd last row alone; a partial last chunk by the AVX2
    walk), must give the dense GEMV's floats at every kernel level and thread count."""
    n = 11
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=gen).half()
    density = torch.tensor([0.5, 0.5, 0.5, 0.0, 1.0, 0.05, 0.5, 0.5, 0.9, 0.5, 0.3]).unsqueeze(1)
    w[torch.rand(n, k, generator=gen) >= density] = 0
    bits = w.view(torch.int16)
    bits[[0, 1, 4, 5, 8]] &= ~0xFF  # narrow rows
    bits[1, ::97] |= 1  # ... one with a few wide chunk groups
    bits[6, : k // 2] &= ~0xFF  # a row narrow in its first half
    w[bits == 0] = 0
    sparse = gemv.pack_sparse(w)
    x = torch.randn(1, k, generator=gen)
    want = torch.empty(1, n)
    cpu.native.gemv_f16(w.view(torch.int16).numpy(), x.numpy(), want.numpy(), n, k, 1, False, 1)
    torch.testing.assert_close(want.double(), reference(x, w), rtol=1e-5, atol=1e-4)
    for threads in (1, 2):
        got = torch.empty(1, n)
        cpu.native.sparse_gemv(*sparse.arrays(), x.numpy(), got.numpy(), n, k, 1, threads)
        assert torch.equal(got, want), threads


@needs_native
def test_sparse_linear_matches_fp64_and_handles_batch_dims_and_scratch():
    w = pruned((200, 96), seed=3, e5m2=True)
    sparse = gemv.pack_sparse(w)
    x = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(1))
    got = gemv.sparse_linear(x, sparse)
    assert got.shape == (2, 3, 200)
    torch.testing.assert_close(got.double(), reference(x, w), rtol=1e-5, atol=1e-4)
    scratch = torch.full((200, 96), float("nan"), dtype=torch.float32)
    many = torch.randn(GEMV_MAX_ROWS + 1, 96)
    assert torch.equal(gemv.sparse_linear(many, sparse, scratch=lambda: scratch), mixed_linear(many, w))
    assert torch.equal(scratch, w.float())  # many rows: unpacked as fp32 into the scratch buffer


@needs_native
def test_sparse_kernel_refuses_inconsistent_arrays():
    sparse = gemv.pack_sparse(pruned((8, 16), seed=2))
    arrays = list(sparse.arrays())
    x, y = torch.randn(1, 16), torch.empty(1, 8)
    with pytest.raises(ValueError, match="sparse layout"):
        cpu.native.sparse_gemv(*arrays, x.numpy(), y.numpy(), 9, 16, 1, 1)  # n disagrees with the codes
    arrays[1] = arrays[1][:4]  # values cut short
    with pytest.raises(ValueError, match="too short"):
        cpu.native.sparse_gemv(*arrays, x.numpy(), y.numpy(), 8, 16, 1, 1)


def test_the_tile_of_the_summation_order_is_one_number():
    assert gemv.TILE == codec.TILE
    if cpu.available():
        assert cpu.native.TILE == gemv.TILE


def test_pack_sparse_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="float16"):
        gemv.pack_sparse(torch.zeros(4, 4))


@needs_native
def test_thread_pool_survives_fork_and_concurrent_callers():
    """The kernels share one persistent pool of worker threads: a forked child (multiprocessing's default on
    Linux) must start its own instead of waiting on workers it does not have, and two Python threads calling at
    once must each get their own answer."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os, threading, torch
        from sparsezip.kernels.cpu.gemv import mixed_linear, pack_sparse, sparse_linear
        w = torch.randn(512, 1024).half()
        w[torch.rand(512, 1024) < 0.5] = 0
        sparse, x = pack_sparse(w), torch.randn(4, 1024)
        want = mixed_linear(x, w)  # 2M multiply-adds: runs on the pool
        results = []
        def call():
            results.extend(torch.equal(sparse_linear(x, sparse), want) for _ in range(50))
        threads = [threading.Thread(target=call) for _ in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(results) == 100 and all(results)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if torch.equal(sparse_linear(x, sparse), want) else 1)
        assert os.waitpid(pid, 0)[1] == 0
        print("ok")
    """)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("level, shown", [("avx512", "level avx512 (batches and prompts of dense rows, sparse rows "
                                                     "and batches of compressed tiles in AVX-512 registers"),
                                          ("avx2", "level avx2; best for")])
def test_info_says_which_code_the_kernels_run(monkeypatch, capsys, level, shown):
    from sparsezip.cli import main

    monkeypatch.setattr(cpu, "features", lambda: {"level": level, "detected": level, "flags": {"avx2": True}})
    assert main(["info"]) in (0, None)
    assert shown in capsys.readouterr().out
