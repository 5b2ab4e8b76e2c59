"""Calibrated pruners as pure functions of (W, statistics): counts, patterns, quality, robustness."""

from __future__ import annotations

import logging

import pytest
import torch

from sparsezip.errors import SparsezipError
from sparsezip.kernels.cpu import prune as cpu_prune
from sparsezip.pruners import (METHODS, LinearStats, _inverse_diagonal_, _inverse_upper_factor_, _prune_block, add_hessian, damping_setting, float_sparse, float_sparse_damping,
                               magnitude, sparsegpt, wanda)


def problem(out: int, inp: int, tokens: int = 4096, seed: int = 0, rank: int | None = None):
    """Random W and correlated inputs X = Z A (columns of very different scales), with their statistics."""
    g = torch.Generator().manual_seed(seed)
    rank = rank or inp
    a = torch.randn(rank, inp, generator=g) / rank**0.5
    x = (torch.randn(tokens, rank, generator=g) @ a) * torch.exp(torch.randn(inp, generator=g))[None, :]
    w = torch.randn(out, inp, generator=g)
    return w, x, stats_of(x)


def stats_of(x: torch.Tensor) -> LinearStats:
    stats = LinearStats(x.shape[1], "cpu", hessian=True)
    for chunk in x.split(1000):
        stats.add_batch(chunk)
    return stats


def out_err(x: torch.Tensor, w: torch.Tensor, pruned: torch.Tensor) -> float:
    """||X W^T - X Wp^T||, computed in float64."""
    return float((x.double() @ (w.double() - pruned.double()).T).norm())


def assert_no_negative_zero(t: torch.Tensor) -> None:
    assert not (torch.signbit(t) & (t == 0)).any(), "pruned entries must be +0.0"


def assert_n_of_m(pruned: torch.Tensor, n: int, m: int) -> None:
    zeros = (pruned == 0).reshape(pruned.shape[0], -1, m).sum(-1)
    assert (zeros == m - n).all(), zeros.unique()


# ---------------------------------------------------------------------------------------------------------
# statistics and registry


def test_hessian_statistics_match_float64_sum():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 7, 12, generator=g), torch.randn(5, 12, generator=g)]
    stats = LinearStats(12, "cpu", hessian=True)
    for b in batches:
        stats.add_batch(b)
    x = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    assert stats.tokens == 19
    torch.testing.assert_close(stats.H.double(), x.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.sq_norm, (x**2).sum(0))  # the Hessian's diagonal
    plain = LinearStats(12, "cpu")
    for b in batches:
        plain.add_batch(b)
    assert plain.H is None and plain.tokens == 19
    torch.testing.assert_close(plain.sq_norm, (x**2).sum(0))  # accumulated on its own


@pytest.mark.parametrize("blocks", [1, 3, 4, 7])
def test_hessian_from_its_upper_triangle_is_exact_and_symmetric(blocks):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 50, generator=g)
    h = torch.zeros(50, 50)
    add_hessian(h, x, blocks)
    lo = 50 // blocks
    assert blocks == 1 or not h[lo:, :lo].any()  # below the first band: left for the mirror to fill
    stats = LinearStats(50, "cpu", hessian=True)
    stats.add_batch(x[:100])
    first = stats.H
    torch.testing.assert_close(first.double(), x[:100].double().T @ x[:100].double(), rtol=1e-5, atol=1e-4)
    stats.add_batch(x[100:])  # reading H in between must not spoil later batches
    assert torch.equal(stats.H, stats.H.T)
    torch.testing.assert_close(stats.H.double(), x.double().T @ x.double(), rtol=1e-5, atol=1e-4)


def upper_factor(h: torch.Tensor) -> torch.Tensor:
    """_inverse_upper_factor_ on a copy of h (the function overwrites its argument)."""
    u = h.clone()
    assert _inverse_upper_factor_(u)
    return u


def test_sparsegpt_factor_is_the_upper_cholesky_of_the_inverse():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, 60, generator=g) * torch.exp(torch.randn(60, generator=g))
    h = x.T @ x
    u = upper_factor(h)
    want = torch.linalg.cholesky(torch.linalg.inv(h.double()), upper=True)
    assert torch.equal(u, torch.triu(u))
    torch.testing.assert_close(u.double(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    indefinite = h - 2 * float(h.diagonal().max()) * torch.eye(60)
    kept = indefinite.clone()
    assert not _inverse_upper_factor_(kept)
    assert torch.equal(kept, indefinite)  # a failed try leaves H as it was, for a retry with more damping


def test_inverse_diagonal_is_the_diagonal_of_the_inverse():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 150, generator=g) * torch.exp(torch.randn(150, generator=g))
    h = x.T @ x
    want = torch.linalg.inv(h.double()).diagonal()
    torch.testing.assert_close(_inverse_diagonal_(h.clone()).double(), want, rtol=1e-3, atol=0)
    assert _inverse_diagonal_(h - 2 * float(h.diagonal().max()) * torch.eye(150)) is None  # indefinite


def test_registry_flags():
    assert METHODS["float_sparse"].needs_hessian and METHODS["float_sparse"].calibrated
    assert METHODS["sparsegpt"].needs_hessian and METHODS["sparsegpt"].calibrated
    assert not METHODS["wanda"].needs_hessian and not METHODS["magnitude"].needs_hessian
    assert METHODS["float_sparse"].prune is float_sparse and METHODS["sparsegpt"].prune is sparsegpt


@pytest.mark.parametrize("method", [float_sparse, sparsegpt])
def test_hessian_methods_refuse_stats_without_hessian(method):
    stats = LinearStats(8, "cpu")
    stats.add_batch(torch.randn(32, 8))
    with pytest.raises(SparsezipError, match="Hessian"):
        method(torch.randn(4, 8), stats, 0.5, None)


# ---------------------------------------------------------------------------------------------------------
# float_sparse


def reference_admm(w, h, ratio, iters=20, mask_iters=15, rho=1.0, row_masks=False, damp=0.1, obs=False):
    """The DESIGN's ADMM written plainly in float64 (linalg.solve, argsort ranking), unstructured only; with
    `row_masks` each output row (a column of wn) keeps its own largest entries; with `obs` the ranking divides
    each entry by sqrt([(damped Hn)^-1]_jj)."""
    w, h = w.double(), h.double()
    d = h.diagonal().sqrt()
    hn = h / torch.outer(d, d)
    wn = (w * d).T.clone()
    hn = hn + damp * hn.diagonal().mean() * torch.eye(len(d), dtype=torch.float64)
    xy = hn @ wn
    scale = torch.linalg.inv(hn).diagonal()[:, None] ** -0.5 if obs else 1.0
    a = hn + rho * torch.eye(len(d), dtype=torch.float64)
    u = torch.zeros_like(wn)
    n_zero = int(wn.numel() * ratio)
    for it in range(iters):
        if it < mask_iters and row_masks:
            order = torch.argsort((wn + u).abs() * scale, dim=0)[:int(wn.shape[0] * ratio)]  # per column of wn
            mask = torch.ones_like(wn).scatter_(0, order, 0.0)
        elif it < mask_iters:
            order = torch.argsort(((wn + u).abs() * scale).flatten())
            mask = torch.ones(wn.numel(), dtype=torch.float64)
            mask[order[:n_zero]] = 0
            mask = mask.view_as(wn)
        z = (wn + u) * mask
        u = u + wn - z
        wn = torch.linalg.solve(a, xy + rho * (z - u))
    return ((wn + u) * mask).T / d


def test_float_sparse_follows_the_admm_recipe():
    w, x, stats = problem(16, 48, tokens=2048, seed=5)
    got = float_sparse(w, stats, 0.5, None)
    want = reference_admm(w, stats.H, 0.5)
    assert ((got == 0) == (want == 0)).float().mean() > 0.99
    assert float((got.double() - want).norm() / want.norm()) < 1e-3


def test_float_sparse_follows_the_admm_recipe_at_another_penalty():
    w, x, stats = problem(16, 48, tokens=2048, seed=5)
    got = float_sparse(w, stats, 0.5, None, rho=0.6)
    want = reference_admm(w, stats.H, 0.5, rho=0.6)
    assert ((got == 0) == (want == 0)).float().mean() > 0.99
    assert float((got.double() - want).norm() / want.norm()) < 1e-3
    assert float((got.double() - reference_admm(w, stats.H, 0.5)).norm() / want.norm()) > 1e-2  # rho matters


def test_float_sparse_auto_damping_follows_the_recipe_at_the_damping_the_token_count_gives():
    # 40 tokens for 48 inputs: a singular X^T X, where "auto" damps with 0.3; 2048 tokens: the original's 0.1
    for tokens, damp in ((40, 0.3), (2048, 0.1)):
        w, x, stats = problem(16, 48, tokens=tokens, seed=6)
        got = float_sparse(w, stats, 0.5, None, damp="auto")
        want = reference_admm(w, stats.H, 0.5, damp=damp)
        assert ((got == 0) == (want == 0)).float().mean() > 0.99
        assert float((got.double() - want).norm() / want.norm()) < 1e-3
    w, x, stats = problem(16, 48, tokens=40, seed=6)
    assert float((float_sparse(w, stats, 0.5, None, damp=0.1).double() - want).norm() / want.norm()) > 1e-2


@pytest.mark.parametrize("row_masks", [False, True])
def test_float_sparse_obs_mask_score_follows_the_recipe(row_masks):
    w, x, stats = problem(16, 48, tokens=2048, seed=5)
    got = float_sparse(w, stats, 0.5, None, row_masks=row_masks, mask_score="obs")
    want = reference_admm(w, stats.H, 0.5, row_masks=row_masks, obs=True)
    assert ((got == 0) == (want == 0)).float().mean() > 0.99
    assert float((got.double() - want).norm() / want.norm()) < 1e-3
    magnitude = reference_admm(w, stats.H, 0.5, row_masks=row_masks)
    assert ((got == 0) != (magnitude == 0)).float().mean() > 0.02  # another score, another mask


def test_obs_mask_score_prunes_the_input_another_one_can_take_over():
    # inputs 0 and 1 nearly equal, 2 and 3 independent; one weight of four goes in each row. By magnitude an
    # independent input goes, whose share of the output nothing can restore; by OBS one of the twins, whose
    # weight the other twin takes over
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2048, 3, generator=g)
    x = torch.stack([z[:, 0], z[:, 0] + 0.05 * torch.randn(2048, generator=g), z[:, 1], z[:, 2]], 1)
    w = torch.tensor([[1.0, 1.0, 0.9, 0.9], [1.0, 1.0, -0.9, 0.95]])
    stats = stats_of(x)
    by_magnitude = float_sparse(w, stats, 0.25, None, row_masks=True)
    by_obs = float_sparse(w, stats, 0.25, None, row_masks=True, mask_score="obs")
    assert (by_magnitude[:, 2:] == 0).sum(1).tolist() == [1, 1]
    assert (by_obs[:, :2] == 0).sum(1).tolist() == [1, 1]
    assert out_err(x, w, by_obs) < 0.2 * out_err(x, w, by_magnitude)


def test_damping_rule_and_its_parsing():
    assert float_sparse_damping("auto", tokens=8191, in_features=8192) == 0.3
    assert float_sparse_damping("auto", tokens=8192, in_features=8192) == 0.1
    assert float_sparse_damping(0.05, tokens=10, in_features=8192) == 0.05  # a number is used as it is
    assert damping_setting("auto") == "auto" and damping_setting("0.25") == 0.25
    for bad in ("0", "-1", "nan", "inf", "lots"):
        with pytest.raises(SparsezipError, match="--admm_damp must be auto or a positive number"):
            damping_setting(bad)


def test_float_sparse_with_row_masks_prunes_every_output_row_equally():
    w, x, stats = problem(16, 48, tokens=2048, seed=5)
    w = w * torch.linspace(0.05, 2.0, 16)[:, None]  # rows of very different norms: a whole-matrix rank favours big ones
    got = float_sparse(w, stats, 0.5, None, rho=0.6, row_masks=True)
    want = reference_admm(w, stats.H, 0.5, rho=0.6, row_masks=True)
    assert ((got == 0) == (want == 0)).float().mean() > 0.99
    assert float((got.double() - want).norm() / want.norm()) < 1e-3
    assert (got == 0).sum(1).tolist() == [24] * 16  # exactly half of every row
    matrix_scope = float_sparse(w, stats, 0.5, None, rho=0.6)
    assert int((matrix_scope == 0).sum()) == 16 * 24 and len(set((matrix_scope == 0).sum(1).tolist())) > 1


def test_float_sparse_with_its_own_outputs_as_dense_target_is_the_original():
    w, x, stats = problem(16, 48, tokens=2048, seed=5)
    own = x.T @ (x @ w.T)  # X^T Y with Y = X W^T: what the original fits
    got = float_sparse(w, stats, 0.5, None, dense_target=own)
    want = float_sparse(w, stats, 0.5, None)
    assert torch.equal(got == 0, want == 0)
    assert float((got - want).norm() / want.norm()) < 1e-4


@pytest.mark.parametrize("blend", [0.25, 0.5])
def test_float_sparse_with_a_blended_target_fits_the_blend_of_the_two_outputs(blend):
    """A blend b fits b Y + (1 - b) X W^T: the same as a dense target made of that mix, and neither of the two."""
    w, x_dense, _ = problem(24, 64, seed=6)
    g = torch.Generator().manual_seed(7)
    x = x_dense + 0.3 * x_dense.std() * torch.randn(x_dense.shape, generator=g)
    y = x_dense @ w.T
    stats = stats_of(x)
    got = float_sparse(w, stats, 0.5, None, dense_target=x.T @ y, target_blend=blend)
    mix = float_sparse(w, stats, 0.5, None, dense_target=x.T @ (blend * y + (1 - blend) * (x @ w.T)))
    assert ((got == 0) == (mix == 0)).float().mean() > 0.99
    assert float((got - mix).norm() / mix.norm()) < 1e-3
    for end in (float_sparse(w, stats, 0.5, None, dense_target=x.T @ y), float_sparse(w, stats, 0.5, None)):
        assert float((got - end).norm() / end.norm()) > 1e-2


def test_float_sparse_fits_the_dense_models_outputs_from_changed_inputs():
    """The inputs moved (earlier layers were pruned): fitting the dense outputs Y gets closer to Y than fitting
    the linear's own outputs on the moved inputs."""
    w, x_dense, _ = problem(24, 64, seed=6)
    g = torch.Generator().manual_seed(7)
    x = x_dense + 0.3 * x_dense.std() * torch.randn(x_dense.shape, generator=g)
    y = x_dense @ w.T
    stats = stats_of(x)
    to_dense = float_sparse(w, stats, 0.5, None, dense_target=x.T @ y)
    local = float_sparse(w, stats, 0.5, None)
    assert int((to_dense == 0).sum()) == int((local == 0).sum()) == 24 * 64 // 2

    def miss(pruned):
        return float((x @ pruned.T - y).norm())
    assert miss(to_dense) < 0.9 * miss(local)


def test_float_sparse_counts_zeros_over_the_whole_matrix():
    w, x, stats = problem(24, 40, seed=1)
    w[:8] *= 20  # loud rows: a whole-matrix ranking prunes mostly the quiet rows
    pruned = float_sparse(w, stats, 0.37, None)
    zeros = pruned == 0
    assert int(zeros.sum()) == int(24 * 40 * 0.37)  # 355, not 24 * floor(40 * 0.37) = 336
    per_row = zeros.sum(1)
    assert per_row[:8].float().mean() < 0.5 * per_row[8:].float().mean()
    assert_no_negative_zero(pruned)
    assert torch.isfinite(pruned).all()
    assert pruned.is_contiguous() and pruned.dtype == torch.float32


@pytest.mark.parametrize("method, rows, cols, seed, n, m", [
    (float_sparse, 16, 64, 2, 2, 4), (float_sparse, 16, 64, 2, 4, 8),
    (sparsegpt, 8, 264, 9, 2, 4), (sparsegpt, 8, 264, 9, 4, 8),
    (sparsegpt, 8, 264, 9, 3, 6),  # 3:6 does not divide SparseGPT's 128-column block
])
def test_n_of_m_patterns_are_exact(method, rows, cols, seed, n, m):
    w, x, stats = problem(rows, cols, seed=seed)
    pruned = method(w, stats, 0.5, (n, m))
    assert_n_of_m(pruned, n, m)
    assert_no_negative_zero(pruned)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_float_sparse_beats_masking_and_wanda(pattern):
    w, x, stats = problem(32, 64, seed=3)
    pruned = float_sparse(w, stats, 0.5, pattern)
    same_mask = torch.where(pruned != 0, w, torch.zeros(()))
    e = out_err(x, w, pruned)
    assert e < 0.9 * out_err(x, w, same_mask)
    assert e < 0.9 * out_err(x, w, wanda(w, stats, 0.5, pattern))
    assert int((pruned == 0).sum()) == int((wanda(w, stats, 0.5, pattern) == 0).sum())


def test_float_sparse_singular_hessian():
    w, x, _ = problem(12, 32, seed=4)
    x[:, 5] = x[:, 3]  # duplicate input
    x[:, 7] = 0  # never activated
    x[:, 20] = 0
    pruned = float_sparse(w, stats_of(x), 0.5, None)
    assert torch.isfinite(pruned).all()
    assert int((pruned == 0).sum()) == 12 * 32 // 2
    assert (pruned[:, 7] == 0).all() and (pruned[:, 20] == 0).all()  # dead inputs are pruned first
    assert_no_negative_zero(pruned)


def test_float_sparse_recovers_from_indefinite_hessian(caplog):
    g = torch.Generator().manual_seed(6)
    v = torch.randn(24, generator=g)
    v /= v.norm()
    stats = LinearStats(24, "cpu", hessian=True)
    stats.H = torch.eye(24) - 3 * torch.outer(v, v) + 0.0 * torch.eye(24)  # eigenvalue -2: Hn + 1.1 I fails
    stats.H += 3 * torch.diag(v * v) + 0.1 * torch.eye(24)  # keep the diagonal positive
    w = torch.randn(8, 24, generator=g)
    with caplog.at_level(logging.WARNING, logger="sparsezip"):
        pruned = float_sparse(w, stats, 0.5, None)
    assert any("Cholesky" in r.message for r in caplog.records)
    assert torch.isfinite(pruned).all() and int((pruned == 0).sum()) == 8 * 24 // 2


# ---------------------------------------------------------------------------------------------------------
# sparsegpt


def reference_sparsegpt(w, h, ratio, pattern=None, block=128, damp=0.01):
    """SparseGPT without lazy batching, in float64: immediate OBS updates of every later column."""
    w, h = w.double().clone(), h.double()
    cols = w.shape[1]
    h = h + damp * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    prune = torch.zeros_like(w, dtype=torch.bool)
    for j in range(cols):
        if pattern is None and j % block == 0:
            i2 = min(j + block, cols)
            s = w[:, j:i2] ** 2 / u.diagonal()[j:i2] ** 2
            k = int(i2 * ratio) - int(j * ratio)
            for r in range(w.shape[0]):
                prune[r, j + torch.argsort(s[r])[:k]] = True
        if pattern is not None and j % pattern[1] == 0:
            n, m = pattern
            s = w[:, j:j + m] ** 2 / u.diagonal()[j:j + m] ** 2
            for r in range(w.shape[0]):
                prune[r, j + torch.argsort(s[r])[:m - n]] = True
        q = torch.where(prune[:, j], 0.0, w[:, j])
        e = (w[:, j] - q) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None, :]
        w[:, j] = q
    return w


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_matches_plain_obs(pattern):
    w, x, stats = problem(10, 300, tokens=3000, seed=7)
    got = sparsegpt(w, stats, 0.4, pattern)
    want = reference_sparsegpt(w, stats.H, 0.4, pattern)
    assert ((got == 0) == (want == 0)).float().mean() > 0.995
    assert float((got.double() - want).norm() / want.norm()) < 1e-2


def obs_block_problem(b: int, rows: int, seed: int):
    """A lazy block as sparsegpt hands it over: w1 [b, rows] and the upper factor of a random H^-1, one dead input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * b, b, generator=g) @ torch.randn(b, b, generator=g)
    h = x.T @ x + 0.1 * torch.eye(b)
    dead = torch.zeros(b, dtype=torch.bool)
    dead[3] = True
    return torch.randn(b, rows, generator=g), upper_factor(h), dead


@pytest.mark.skipif(cpu_prune.native is None, reason="native OBS kernel not built")
@pytest.mark.parametrize("b, rows, k, pattern, threads", [
    (128, 64, 64, None, 1), (128, 130, 51, None, 2), (128, 7, 0, None, 2), (96, 200, 96, None, 2),
    (128, 2100, 51, None, 2), (128, 70, 0, (2, 4), 1), (128, 2051, 0, (2, 4), 2), (126, 65, 0, (3, 6), 2),
    (128, 9, 0, (1, 8), 1)])
def test_native_obs_block_matches_torch_loop(b, rows, k, pattern, threads, monkeypatch, kernel_level):
    """The C loop (row chunks of 64; threads from 1024 rows each) makes the same masks as the torch loop and the same
    updates up to fp32 summation order; rows not a multiple of the chunk, and the N:M groups, included."""
    w1, h1, dead = obs_block_problem(b, rows, seed=b + rows)
    want_w = w1.clone()
    want_err = _prune_block(want_w, h1, dead, k, pattern)
    monkeypatch.setattr(cpu_prune, "threads", lambda: threads)
    got_w = w1.clone()
    got_err = cpu_prune.obs_block(got_w, h1, dead, k, pattern)
    assert torch.equal(got_w == 0, want_w == 0)
    assert torch.allclose(got_w, want_w, rtol=1e-4, atol=1e-4 * float(want_w.abs().max()))
    assert torch.allclose(got_err, want_err, rtol=1e-4, atol=1e-4 * float(want_err.abs().max()))
    zeros = (got_w == 0).sum(0)
    assert (zeros == (k if pattern is None else b // pattern[1] * (pattern[1] - pattern[0]))).all()
    if k or pattern:
        assert bool((got_w[3] == 0).all())  # the dead input is pruned first in every row
    assert_no_negative_zero(got_w)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_torch_loop_matches_native(pattern, monkeypatch):
    """Without the extension (or off the CPU) sparsegpt takes the torch loop, with the same result."""
    w, x, stats = problem(40, 300, seed=13)
    native = sparsegpt(w, stats, 0.5, pattern)
    monkeypatch.setattr(cpu_prune, "native", None)
    torch_loop = sparsegpt(w, stats, 0.5, pattern)
    assert torch.equal(native == 0, torch_loop == 0)
    assert float((native - torch_loop).norm() / torch_loop.norm()) < 1e-5


def test_sparsegpt_exact_sparsity_per_row_and_block():
    w, x, stats = problem(16, 300, seed=8)
    pruned = sparsegpt(w, stats, 0.4, None)
    zeros = pruned == 0
    assert (zeros.sum(1) == int(300 * 0.4)).all()  # 120 in every row
    blocks = [zeros[:, :128].sum(1), zeros[:, 128:256].sum(1), zeros[:, 256:].sum(1)]
    for got, want in zip(blocks, [51, 51, 18]):  # floor(128*.4), floor(256*.4)-51, floor(300*.4)-102
        assert (got == want).all()
    assert_no_negative_zero(pruned)
    assert pruned.is_contiguous() and pruned.dtype == torch.float32


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_and_wanda(pattern):
    w, x, stats = problem(32, 128, seed=10, rank=64)  # strongly correlated inputs, as in LLM layers
    e = out_err(x, w, sparsegpt(w, stats, 0.5, pattern))
    assert e < 0.9 * out_err(x, w, magnitude(w, None, 0.5, pattern))
    assert e < 0.9 * out_err(x, w, wanda(w, stats, 0.5, pattern))


def test_sparsegpt_recovers_from_indefinite_hessian(caplog):
    w, x, _ = problem(8, 64, tokens=32, seed=11)  # 32 tokens for 64 inputs: H is singular
    stats = stats_of(x)
    stats.H -= 0.05 * stats.H.diagonal().mean() * torch.eye(64)  # and now indefinite beyond the 1% damping
    with caplog.at_level(logging.WARNING, logger="sparsezip"):
        pruned = sparsegpt(w, stats, 0.5, None)
    assert any("Cholesky" in r.message for r in caplog.records)
    assert torch.isfinite(pruned).all()
    assert ((pruned == 0).sum(1) == 32).all()


def test_sparsegpt_dead_inputs():
    w, x, _ = problem(8, 64, seed=12)
    x[:, 10] = 0
    x[:, 11] = x[:, 12]
    pruned = sparsegpt(w, stats_of(x), 0.25, None)
    assert torch.isfinite(pruned).all()
    assert ((pruned == 0).sum(1) == 16).all()
    assert (pruned[:, 10] == 0).all()  # a never-activated input costs nothing, so it is pruned first


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_wanda_in_row_blocks_equals_one_pass_over_the_matrix(pattern, monkeypatch):
    from sparsezip import pruners
    from sparsezip.masks import apply_mask, make_mask

    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, 16, generator=g)
    stats = LinearStats(16, "cpu")
    stats.add_batch(torch.randn(40, 16, generator=g))
    monkeypatch.setattr(pruners, "WANDA_ROWS", 3)  # blocks of 3, 3, 3 and 1 rows
    got = pruners.wanda(w, stats, 0.5, pattern)
    want = apply_mask(w, make_mask(w.abs() * stats.sq_norm.sqrt()[None, :], 0.5, pattern, per_row=True))
    assert torch.equal(got, want)
    assert (got == 0).sum() == w.numel() // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_pruners_leave_the_callers_weight_untouched(method, dtype):
    """The weight may be a mapped file or the dense model's own tensor: a pruner works on its own copy, also where
    converting to fp32 would be no copy at all."""
    w, _, stats = problem(24, 32, tokens=256, seed=9)
    w = w.to(dtype)
    before = w.clone()
    METHODS[method].prune(w, stats, 0.5, None)
    assert torch.equal(w, before)
