"""The native fp16-weight GEMV must compute what an fp32 matmul on the same weights computes."""

import pytest
import torch

from sparsezip.kernels import cpu_linear
from sparsezip.kernels.cpu_linear import GEMV_MAX_ROWS, mixed_linear

needs_native = pytest.mark.skipif(not cpu_linear.available(), reason="native extension not built")


def reference(x, w, bias=None):
    return torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, GEMV_MAX_ROWS])
@pytest.mark.parametrize("k", [1, 8, 13, 96, 577])
def test_gemv_matches_an_fp64_matmul(rows, k):
    gen = torch.Generator().manual_seed(rows * 1000 + k)
    w = torch.randn(37, k, generator=gen).half()
    x = torch.randn(rows, k, generator=gen)
    got = mixed_linear(x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, 37)
    torch.testing.assert_close(got.double(), reference(x, w), rtol=1e-5, atol=1e-5 * k**0.5)


@needs_native
def test_gemv_converts_every_finite_fp16_pattern_exactly():
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
@pytest.mark.parametrize("codec_name", ["bitmap-v1", "huff-v2"])
@pytest.mark.parametrize("shape", [(130, 13), (256, 128), (300, 577)])
def test_gemv_is_bit_identical_to_the_fused_compressed_linear(codec_name, shape):
    """Dense mode (fp16 GEMV) and compressed mode (multiply from the tiles) must agree to the bit at batch 1."""
    from sparsezip import codec
    from sparsezip.kernels import cpu

    if not cpu.available():
        pytest.skip("native codec not built")
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=gen).half()
    w[torch.rand(*shape, generator=gen) < 0.5] = 0
    x, bias = torch.randn(1, shape[1], generator=gen), torch.randn(shape[0], generator=gen)
    enc = codec.encode(w, codec_name)
    assert torch.equal(mixed_linear(x, w, bias), cpu.linear(x, enc.weight, enc.index, enc.info, bias))


@needs_native
def test_native_gemv_with_many_rows():
    """Large weights use the kernel for up to GEMV_MAX_ROWS_LARGE rows: call it directly at 40 rows."""
    from sparsezip.kernels.cpu_linear import _native

    gen = torch.Generator().manual_seed(8)
    w, x = torch.randn(50, 70, generator=gen).half(), torch.randn(40, 70, generator=gen)
    y = torch.empty(40, 50)
    _native.gemv_f16(w.numpy(), x.numpy(), y.numpy(), 50, 70, 40, 2)
    torch.testing.assert_close(y.double(), reference(x, w), rtol=1e-5, atol=1e-4)
