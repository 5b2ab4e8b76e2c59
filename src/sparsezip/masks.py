"""Pure mask maths: which entries of a score matrix survive. True means keep."""

from __future__ import annotations

import torch

from .errors import SparsezipError
from .kernels.cpu.prune import kth_smallest

BLOCK_ENTRIES = 1 << 20  # the unit of work of row-by-row selections, which hold several bytes per entry


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

    Beyond the score it holds two boolean matrices and per-row counts: float_sparse ranks [in, out] matrices of
    the ADMM iterate (at 7B 68M entries), where a flattened copy or a running count over every entry would cost
    as much as several of its iterates.
    """
    n_zero = int(score.numel() * ratio)
    if n_zero <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    if n_zero >= score.numel():
        return torch.zeros_like(score, dtype=torch.bool)
    thresh = kth_smallest(_flat_view(score), n_zero)  # the n_zero-th smallest score
    prune = score < thresh
    ties = score == thresh
    missing = n_zero - int(prune.count_nonzero())  # >= 1: the threshold entry itself is a tie
    if int(ties.count_nonzero()) > missing:  # more ties than places: the first ones in index order
        _keep_first_true_(ties, missing)
    return prune.logical_or_(ties).logical_not_()


def _flat_view(score: torch.Tensor) -> torch.Tensor:
    """The score's entries as one contiguous vector, a view where its memory is dense in either index order (the
    k-th value does not depend on the order): float_sparse ranks a transposed view."""
    if score.dim() == 2 and not score.is_contiguous() and score.T.is_contiguous():
        return score.T.reshape(-1)
    return score.reshape(-1)


def _keep_first_true_(flags: torch.Tensor, count: int) -> None:
    """Leave only the first `count` True entries of a 2-D boolean matrix, in row-major order. Counted by blocks
    of rows: a running count over every entry costs 8 bytes each (as does sum() of booleans; count_nonzero does
    not copy)."""
    for _, block in row_blocks(flags):
        here = int(block.count_nonzero())
        if count == 0:
            block.zero_()
        elif here > count:
            block &= (torch.cumsum(block.reshape(-1), 0) <= count).view(block.shape)
        count -= min(here, count)


def keep_largest_per_row(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero floor(cols * ratio) smallest entries in every row (Wanda's comparison group)."""
    n_zero = int(score.shape[1] * ratio)
    keep = torch.ones_like(score, dtype=torch.bool, memory_format=torch.contiguous_format)
    if n_zero:
        for rows, block in row_blocks(score):
            keep[rows].scatter_(1, torch.topk(block, n_zero, dim=1, largest=False).indices, False)
    return keep


def keep_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest of every m consecutive inputs in each row."""
    rows, cols = score.shape
    if cols % m:
        raise SparsezipError(f"a matrix with {cols} inputs cannot take a {n}:{m} pattern ({cols} % {m} != 0)")
    keep = torch.zeros((rows, cols // m, m), dtype=torch.bool, device=score.device)
    for at, block in row_blocks(score):
        groups = block.reshape(-1, cols // m, m)
        keep[at].scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.view(rows, cols)


def row_blocks(matrix: torch.Tensor):
    """(slice, rows) blocks of about BLOCK_ENTRIES entries of a 2-D tensor: a top-k's values and int64 indices take
    12 bytes per selected entry, several times the score itself on the ADMM iterate of a 7B's down projection."""
    step = max(1, BLOCK_ENTRIES // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], step):
        yield slice(start, start + step), matrix[start:start + step]


def make_mask(score: torch.Tensor, ratio: float, pattern: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    if pattern is not None:
        return keep_n_of_m(score, *pattern)
    return keep_largest_per_row(score, ratio) if per_row else keep_largest_per_matrix(score, ratio)


def apply_mask(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the pruned entries with +0.0: `w * keep` would leave -0.0, a non-zero bit pattern for the codec."""
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))
