"""Pure mask maths: which entries of a score matrix survive. True means keep."""

from __future__ import annotations

import torch

from .errors import SparsezipError
from .kernels.cpu.prune import kth_smallest


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "2:4" -> (2, 4) meaning keep 2 of every 4 consecutive inputs."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise SparsezipError(f"unknown sparsity pattern {pattern!r}; use unstructured or N:M such as 2:4") from None
    if not 0 < n < m:
        raise SparsezipError(f"pattern {pattern!r} must keep N of M with 0 < N < M")
    return n, m


def keep_largest_per_matrix(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero exactly floor(numel * ratio) entries with the smallest score, ranked over the whole matrix.

    A k-th value threshold (about twice as fast as a top-k of ~half the matrix with torch.kthvalue, and several
    times more natively, which matters inside the ADMM loop); entries tied at the threshold are pruned in index
    order until the count is exact.
    """
    n_zero = int(score.numel() * ratio)
    flat = score.flatten()
    if n_zero <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    if n_zero >= flat.numel():
        return torch.zeros_like(score, dtype=torch.bool)
    thresh = kth_smallest(flat, n_zero)  # the n_zero-th smallest score
    prune = flat < thresh
    ties = flat == thresh
    missing = n_zero - int(prune.sum())  # >= 1: the threshold entry itself is a tie
    if int(ties.sum()) > missing:  # more ties than places: the first ones in index order
        ties &= torch.cumsum(ties, 0) <= missing
    return ~(prune | ties).view_as(score)


def keep_largest_per_row(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero floor(cols * ratio) smallest entries in every row (Wanda's comparison group)."""
    n_zero = int(score.shape[1] * ratio)
    keep = torch.ones_like(score, dtype=torch.bool)
    if n_zero:
        keep.scatter_(1, torch.topk(score, n_zero, dim=1, largest=False).indices, False)
    return keep


def keep_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest of every m consecutive inputs in each row."""
    rows, cols = score.shape
    if cols % m:
        raise SparsezipError(f"a matrix with {cols} inputs cannot take a {n}:{m} pattern ({cols} % {m} != 0)")
    groups = score.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.view(rows, cols)


def make_mask(score: torch.Tensor, ratio: float, pattern: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    if pattern is not None:
        return keep_n_of_m(score, *pattern)
    return keep_largest_per_row(score, ratio) if per_row else keep_largest_per_matrix(score, ratio)


def apply_mask(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the pruned entries with +0.0: `w * keep` would leave -0.0, a non-zero bit pattern for the codec."""
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))
