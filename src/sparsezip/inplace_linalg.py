"""Cholesky factorisations that overwrite their square matrix instead of copying it.

A 7B down projection's Hessian is an [18944, 18944] fp32 matrix, 1.4 GB. torch's linalg functions return new
tensors and copy their input to column-major inside, so one factor plus one inverse held three to four such
matrices at once, the largest part of a Hessian pruner's peak memory. LAPACK's routines work in place: on the CPU
these functions call them through scipy on the tensor's own memory. Elsewhere (CUDA) they use torch's functions
and copy the result back, which costs memory but gives the same contract.

Each function reads and writes only the lower triangle (diagonal included) of a row-major `a` and leaves its
strict upper triangle as it was, so a symmetric matrix can be rebuilt after a failed factorisation from its upper
triangle and its saved diagonal (`restore_symmetric`).
"""

from __future__ import annotations

import torch

REVERSE_CHUNK = 1 << 18  # elements swapped per step of reverse_ (three temporaries of this size)
MIRROR_BAND = 512  # rows per step of mirror_upper
NORM_BAND = 512  # rows per step of lower_column_sq_norms


def _lapack(a: torch.Tensor):
    """scipy's LAPACK module and a's memory as a column-major array, or None where that cannot be in place.
    A row-major matrix read as column-major is its transpose, so LAPACK's upper triangle is a's lower one."""
    if a.device.type != "cpu" or a.dtype not in (torch.float32, torch.float64) or not a.is_contiguous():
        return None
    from scipy.linalg import lapack  # imported here: only the Hessian pruners on the CPU need scipy

    return lapack, a.numpy().T


def _prefix(a: torch.Tensor) -> str:
    return "s" if a.dtype == torch.float32 else "d"


def cholesky_lower_(a: torch.Tensor) -> bool:
    """Overwrite a's lower triangle with L, A = L L^T (A symmetric, read from a's lower triangle). False when
    A is not positive definite; a's lower triangle is then garbage."""
    inplace = _lapack(a)
    if inplace is None:
        factor, info = torch.linalg.cholesky_ex(a)
        if info.item() != 0:
            return False
        _write_lower(a, factor)
        return True
    lapack, col_major = inplace
    _, info = getattr(lapack, _prefix(a) + "potrf")(col_major, lower=0, clean=0, overwrite_a=1)
    return info == 0


def invert_lower_(a: torch.Tensor) -> bool:
    """Overwrite a's lower triangle L (non-singular) with L^-1. False when L is singular."""
    inplace = _lapack(a)
    if inplace is None:
        low = torch.tril(a)
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        _write_lower(a, torch.linalg.solve_triangular(low, eye, upper=False))
        return True
    lapack, col_major = inplace
    _, info = getattr(lapack, _prefix(a) + "trtri")(col_major, lower=0, overwrite_c=1)
    return info == 0


def inverse_from_cholesky_(a: torch.Tensor) -> bool:
    """Overwrite a's lower triangle L (A = L L^T) with the lower triangle of A^-1. False when L is singular."""
    inplace = _lapack(a)
    if inplace is None:
        _write_lower(a, torch.cholesky_inverse(torch.tril(a)))
        return True
    lapack, col_major = inplace
    _, info = getattr(lapack, _prefix(a) + "potri")(col_major, lower=0, overwrite_c=1)
    return info == 0


def _write_lower(a: torch.Tensor, full: torch.Tensor) -> None:
    """a's lower triangle := full's, a's strict upper triangle kept (the torch fallback's copy-back)."""
    a.copy_(torch.tril(full) + torch.triu(a, 1))


def mirror_upper(a: torch.Tensor, band: int = MIRROR_BAND) -> None:
    """Copy the strict upper triangle of a square a onto its strict lower one, in place, a band of rows at a
    time: the temporaries are one band, not whole copies of an [in, in] matrix that can take gigabytes."""
    n = a.shape[0]
    for lo in range(0, n, band):
        hi = min(lo + band, n)
        a[lo:hi, :lo] = a[:lo, lo:hi].mT
        block = a[lo:hi, lo:hi]
        block.copy_(torch.triu(block) + torch.triu(block, 1).mT)


def mirror_lower(a: torch.Tensor, band: int = MIRROR_BAND) -> None:
    """Copy the strict lower triangle of a square a onto its strict upper one, in place (see mirror_upper)."""
    mirror_upper(a.mT, band)


def restore_symmetric(a: torch.Tensor, diagonal: torch.Tensor) -> None:
    """Rebuild a symmetric a from its strict upper triangle and `diagonal`, after a factorisation overwrote the
    lower triangle."""
    mirror_upper(a)
    a.diagonal().copy_(diagonal)


def lower_column_sq_norms(a: torch.Tensor, band: int = NORM_BAND) -> torch.Tensor:
    """The squared norm of every column of a's lower triangle (diagonal included) [n], a band of rows at a time."""
    n = a.shape[0]
    out = torch.zeros(n, dtype=a.dtype, device=a.device)
    for lo in range(0, n, band):
        hi = min(lo + band, n)
        out[:hi] += torch.tril(a[lo:hi, :hi], lo).square_().sum(0)
    return out


def reverse_(a: torch.Tensor, chunk: int = REVERSE_CHUNK) -> None:
    """a := J a J, J the order-reversing permutation, in place: on a contiguous square matrix that reverses its
    flattened elements, swapped a chunk from each end at a time."""
    flat = a.view(-1)
    size = flat.numel()
    for lo in range(0, size // 2, chunk):
        hi = min(lo + chunk, size // 2)
        head = flat[lo:hi].clone()
        flat[lo:hi] = flat[size - hi:size - lo].flip(0)
        flat[size - hi:size - lo] = head.flip(0)
