"""Whole-matrix masks and the native k-th value they rank with."""

from __future__ import annotations

import pytest
import torch

from sparsezip.kernels.cpu import prune as cpu_prune
from sparsezip.masks import keep_largest_per_matrix


def value_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(884_736, generator=g).abs(),  # a 576 x 1536 score matrix
        torch.randn(1001, generator=g),  # negatives too
        torch.randint(0, 5, (10_000,), generator=g).float(),  # heavy ties
        torch.randn(3000, generator=g) * 1e-40,  # fp32 subnormals
        torch.tensor([3.0, 1.0, float("inf"), 2.0, 1.0, -float("inf"), 0.0, -5.0]),
        torch.zeros(50),
        torch.tensor([7.0]),
    ]


@pytest.mark.skipif(cpu_prune.native is None, reason="native pruning kernels not built")
@pytest.mark.parametrize("case", range(len(value_cases())))
def test_native_kth_smallest_is_kthvalue(case):
    values = value_cases()[case]
    n = values.numel()
    for k in sorted(k for k in {1, 2, n // 3, n // 2, n - 1, n} if 1 <= k <= n):
        got = cpu_prune.kth_smallest(values, k)
        want = torch.kthvalue(values, k).values
        assert got.dtype == want.dtype and got.item() == want.item(), (case, k)


def test_kth_smallest_falls_back_to_torch_off_the_fast_path():
    values = torch.randn(100, dtype=torch.float64)
    assert cpu_prune.kth_smallest(values, 10).item() == torch.kthvalue(values, 10).values.item()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.005, 0.3, 0.5, 0.999, 1.0])
def test_whole_matrix_mask_prunes_exactly_and_breaks_ties_in_index_order(ratio, transposed):
    """Also on a transposed view (float_sparse's [in, out] iterate seen as [out, in]): ties go in the view's own
    index order, not in its memory order."""
    g = torch.Generator().manual_seed(1)
    score = torch.randint(0, 4, (53, 37) if transposed else (37, 53), generator=g).float()  # ties at every threshold
    if transposed:
        score = score.T
    keep = keep_largest_per_matrix(score, ratio)
    n_zero = int(score.numel() * ratio)
    order = torch.argsort(score.flatten(), stable=True)  # ascending score, then index
    want = torch.ones(score.numel(), dtype=torch.bool)
    want[order[:n_zero]] = False
    assert keep.shape == score.shape and torch.equal(keep.flatten(), want)
