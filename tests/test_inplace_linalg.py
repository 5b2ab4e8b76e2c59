"""In-place factorisations: the same results as torch's linalg, written into the matrix itself (the LAPACK path
on the CPU and the torch fallback forced), with the strict upper triangle kept."""

from __future__ import annotations

import pytest
import torch

from sparsezip import inplace_linalg
from sparsezip.inplace_linalg import (cholesky_lower_, inverse_from_cholesky_, invert_lower_, lower_column_sq_norms,
                                      mirror_lower, mirror_upper, restore_symmetric, reverse_)


@pytest.fixture(params=["lapack", "torch"])
def path(request, monkeypatch):
    """Both paths of every function: scipy's LAPACK on the tensor's memory, and torch with a copy back (the one
    CUDA takes), forced here on the CPU."""
    if request.param == "torch":
        monkeypatch.setattr(inplace_linalg, "_lapack", lambda a: None)
    return request.param


def spd(n: int, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64) * torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    return (x.T @ x + torch.eye(n, dtype=torch.float64)).to(dtype)


def asymmetric_upper(a: torch.Tensor) -> torch.Tensor:
    """a with a strict upper triangle unlike its lower one, so a test sees which triangle a function read."""
    return torch.tril(a) + torch.triu(torch.full_like(a, 7.0), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_writes_the_factor_into_the_lower_triangle_and_keeps_the_upper(path, dtype):
    a = spd(70, dtype)
    want = torch.linalg.cholesky(a.double())
    m = asymmetric_upper(a)
    ptr = m.data_ptr()
    assert cholesky_lower_(m)
    assert m.data_ptr() == ptr
    assert torch.equal(torch.triu(m, 1), torch.triu(torch.full_like(m, 7.0), 1))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(torch.tril(m).double(), want, rtol=0, atol=tol * float(want.abs().max()))


def test_cholesky_of_an_indefinite_matrix_says_so(path):
    a = spd(40, torch.float32)
    assert not cholesky_lower_(a - 2 * float(a.diagonal().max()) * torch.eye(40))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triangular_and_cholesky_inverses_in_place(path, dtype):
    a = spd(90, dtype, seed=1)
    low = torch.linalg.cholesky(a)
    inv_low = asymmetric_upper(low)
    invert_lower_(inv_low)
    want = torch.linalg.inv(low.double())
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(torch.tril(inv_low).double(), want, rtol=0, atol=tol * float(want.abs().max()))
    assert torch.equal(torch.triu(inv_low, 1), torch.triu(torch.full_like(a, 7.0), 1))

    inv_a = asymmetric_upper(low)
    inverse_from_cholesky_(inv_a)
    want = torch.linalg.inv(a.double())
    torch.testing.assert_close(torch.tril(inv_a).double(), torch.tril(want), rtol=0,
                               atol=tol * float(want.abs().max()))
    assert torch.equal(torch.triu(inv_a, 1), torch.triu(torch.full_like(a, 7.0), 1))


@pytest.mark.parametrize("n, band", [(1, 4), (9, 4), (12, 4), (13, 512)])
def test_mirrors_copy_one_triangle_onto_the_other(n, band):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g)
    up = a.clone()
    mirror_upper(up, band)
    assert torch.equal(up, torch.triu(a) + torch.triu(a, 1).T)
    low = a.clone()
    mirror_lower(low, band)
    assert torch.equal(low, torch.tril(a) + torch.tril(a, -1).T)


def test_restore_symmetric_rebuilds_the_matrix_a_factorisation_overwrote(path):
    a = spd(50, torch.float32, seed=2)
    work = a.clone()
    diagonal = a.diagonal().clone()
    assert cholesky_lower_(work)
    restore_symmetric(work, diagonal)
    assert torch.equal(work, torch.triu(a) + torch.triu(a, 1).T)


@pytest.mark.parametrize("n, band", [(1, 3), (10, 3), (10, 10), (33, 8)])
def test_lower_column_norms_ignore_the_upper_triangle(n, band):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    want = torch.tril(a).square().sum(0)
    torch.testing.assert_close(lower_column_sq_norms(a, band), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n, chunk", [(1, 2), (5, 2), (6, 4), (7, 1000), (16, 3)])
def test_reverse_is_both_flips_in_place(n, chunk):
    a = torch.arange(n * n, dtype=torch.float32).reshape(n, n)
    want = a.flip(0, 1)
    ptr = a.data_ptr()
    reverse_(a, chunk)
    assert torch.equal(a, want) and a.data_ptr() == ptr
