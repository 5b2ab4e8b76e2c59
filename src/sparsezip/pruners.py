"""Pruning methods as pure functions of a weight and its calibration statistics.

Each method takes W [out, in] in fp32 and the `LinearStats` of its input and returns the pruned
W (same shape, explicit +0.0 zeros). Statistics are gathered by `calibrate.py`; nothing here runs the model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, TypeVar

import torch

from .errors import SparsezipError
from .inplace_linalg import (cholesky_lower_, inverse_from_cholesky_, invert_lower_, lower_column_sq_norms,
                             mirror_lower, mirror_upper, restore_symmetric, reverse_)
from .kernels.cpu import prune as cpu_prune
from .masks import apply_mask, make_mask

log = logging.getLogger("sparsezip")
T = TypeVar("T")

CHOLESKY_TRIES = 6  # damping grows x10 per failed try: up to 1e5 times the method's own damping
HESSIAN_BLOCKS = 4  # row bands of the X^T X accumulation (see add_hessian)
OBS_SUB_BLOCK = 16  # columns of SparseGPT's rank-1 updates between two GEMM updates of the rest of a block
WANDA_ROWS = 1024  # rows per step of wanda: its temporaries take about 16 bytes x WANDA_ROWS x in_features


class LinearStats:
    """Running input statistics of one linear: token count, the squared norm of every input column and,
    when `hessian` is set (SparseGPT, float_sparse), H = X^T X summed over the calibration tokens."""

    def __init__(self, in_features: int, device, hessian: bool = False):
        self.tokens = 0
        # fp32 sum of x^T x: [in, in]; None when the method does not need it (it costs in^2 memory).
        # add_batch fills only the upper triangle (see add_hessian); `H` mirrors it when read.
        self._h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        self._symmetric = True
        # sum_t x_tj^2, fp32 per batch and fp64 across batches; with a Hessian its diagonal holds these sums
        self._sq_norm = None if hessian else torch.zeros(in_features, dtype=torch.float64, device=device)
        # set by the caller before the last pruner call on these statistics: that call may take H and overwrite
        # it instead of copying it (one [in, in] copy fewer: 1.4 GB for a 7B down projection)
        self.last_use = False
        # sum over calibration tokens of x_pruned^T (x_dense W^T) [in, out] (add_dense_target): what the pruned
        # inputs must reproduce, the dense model's output of this linear; None fits the linear's own output
        self.dense_target: torch.Tensor | None = None

    @property
    def sq_norm(self) -> torch.Tensor:
        """The squared norm of every input column [in] (fp64): ||X_j||^2."""
        return self._sq_norm if self._h is None else self._h.diagonal().double()

    @property
    def H(self) -> torch.Tensor | None:
        if self._h is not None and not self._symmetric:
            mirror_upper(self._h)
            self._symmetric = True
        return self._h

    @H.setter
    def H(self, value: torch.Tensor | None) -> None:
        self._h, self._symmetric = value, True

    def take_H(self) -> torch.Tensor:
        """H, handed over to the caller, who may overwrite it; the squared norms stay (from its diagonal)."""
        h = self.H
        self._sq_norm = h.diagonal().double()
        self._h = None
        return h

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])  # [tokens, in]
        self.tokens += x.shape[0]
        if self._h is None:
            self._sq_norm += x.float().square().sum(0).double()
        else:  # the squared norms come with the Hessian's diagonal: no pass of their own
            add_hessian(self._h, x.to(device=self._h.device, dtype=torch.float32))
            self._symmetric = False

    def add_dense_target(self, x: torch.Tensor, dense_out: torch.Tensor) -> None:
        """x [.., in]: a batch of this linear's inputs in the pruned model; dense_out [.., out]: the dense model's
        output of the linear (no bias) for the same tokens."""
        x, y = x.reshape(-1, x.shape[-1]).float(), dense_out.reshape(-1, dense_out.shape[-1]).float()
        if self.dense_target is None:
            self.dense_target = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float32, device=x.device)
        self.dense_target.addmm_(x.T, y)


def add_hessian(h: torch.Tensor, x: torch.Tensor, blocks: int = HESSIAN_BLOCKS) -> None:
    """h += x^T x on and above the diagonal only: x [tokens, in], h [in, in].

    X^T X is symmetric, so each band of rows [lo, hi) computes only the columns from lo on: with 4 bands that
    is 10 of 16 blocks, 62.5% of a full product (more bands make the products too small). Every entry is still one fp32 dot product over the batch.
    """
    n = h.shape[0]
    edges = [n * i // blocks for i in range(blocks + 1)]
    for lo, hi in zip(edges, edges[1:]):
        if hi > lo:
            h[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:])


@dataclass(frozen=True)
class Method:
    prune: Callable[[torch.Tensor, LinearStats, float, tuple[int, int] | None], torch.Tensor]
    calibrated: bool  # False: needs no activations, so calibration forward passes are skipped
    description: str
    needs_hessian: bool = False  # True: LinearStats must accumulate X^T X (in^2 fp32 per linear)
    # True when each output row is pruned on its own (per-row masks), so q/k/v (or gate/up), which share
    # their input statistics, can be pruned as one fused matrix with the same result and fewer passes
    row_local: bool = False


def magnitude(w: torch.Tensor, stats: LinearStats | None, ratio: float, pattern) -> torch.Tensor:
    """Smallest |W| over the whole matrix (the classic baseline)."""
    return apply_mask(w, make_mask(w.abs(), ratio, pattern, per_row=False))


def wanda(w: torch.Tensor, stats: LinearStats, ratio: float, pattern) -> torch.Tensor:
    """Smallest |W_ij| * ||X_j|| compared within each output row (Sun et al. 2023).

    Row-local, so it goes WANDA_ROWS rows at a time: the scores, the top-k indices (int64) and the mask of a fused
    gate/up matrix at once would be several times its own size."""
    norm = stats.sq_norm.sqrt().to(device=w.device, dtype=torch.promote_types(w.dtype, torch.float32))[None, :]
    out = torch.empty_like(w)
    for r in range(0, w.shape[0], WANDA_ROWS):
        block = w[r:r + WANDA_ROWS]
        out[r:r + WANDA_ROWS] = apply_mask(block, make_mask(block.abs() * norm, ratio, pattern, per_row=True))
    return out


# ---------------------------------------------------------------------------------------------------------
# Hessian-based methods


def _hessian(stats: LinearStats | None, method: str, device) -> tuple[torch.Tensor, bool]:
    """(H in fp32 on device, whether the caller owns it): owned when this is the statistics' last use
    (`last_use`) or H had to be converted; otherwise H belongs to `stats` and must not be modified."""
    if stats is None or stats.H is None:
        raise SparsezipError(f"{method} needs the input Hessian X^T X: gather statistics with "
                             f"LinearStats(..., hessian=True) (Method.needs_hessian)")
    held = stats.take_H() if stats.last_use else stats.H
    h = held.to(device=device, dtype=torch.float32)
    if not _all_finite(h):
        raise SparsezipError(f"{method}: the calibration Hessian contains inf/NaN (the activations overflowed); "
                             f"calibrate in fp32 or with fewer/shorter samples")
    return h, stats.last_use or h is not held


def _all_finite(t: torch.Tensor) -> bool:
    """No inf or NaN in t, read from its sum: one reduction instead of isfinite's boolean copy of t. A sum of
    finite entries overflows only when they approach 1e38 / numel, which for a Hessian or its factors means they
    are unusable anyway, so counting that as non-finite is right."""
    return bool(torch.isfinite(t.sum()))


def _cholesky_(a: torch.Tensor) -> bool:
    """Overwrite a's lower triangle with its Cholesky factor (inplace_linalg.cholesky_lower_); False when a is
    not (numerically) positive definite."""
    return cholesky_lower_(a) and _all_finite(a)


def _with_damping(attempt: Callable[[float], T | None], damp: float, method: str) -> T:
    """Run `attempt(damp)` (a Cholesky-based factorisation), multiplying the relative damping by 10 after
    each failure, so that a rank-deficient or slightly indefinite Hessian costs a warning, not the run."""
    for _ in range(CHOLESKY_TRIES):
        result = attempt(damp)
        if result is not None:
            return result
        log.warning("%s: Cholesky factorisation failed at relative damping %.3g (Hessian not positive definite; "
                    "too few calibration tokens?); retrying with %.3g", method, damp, damp * 10)
        damp *= 10
    raise SparsezipError(f"{method}: the Hessian is not positive definite even with relative damping {damp / 10:.3g}; "
                         f"use more calibration tokens (at least 2048) or another method")


FLOAT_SPARSE_DAMPING = 0.1  # the original's relative damping of the normalised Hessian
SCARCE_TOKENS_DAMPING = 0.3  # "auto" damping of a linear with fewer calibration tokens than inputs
AUTO_DAMPING = "auto"
MASK_SCORES = ("magnitude", "obs")  # float_sparse's mask scores (see float_sparse): the original's first


def damping_setting(text: str) -> float | str:
    """float_sparse's damping as written on the command line: "auto" or a positive finite number."""
    if text == AUTO_DAMPING:
        return AUTO_DAMPING
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < math.inf:  # also refuses NaN
        raise SparsezipError(f"--admm_damp must be auto or a positive number, got {text!r}")
    return value


def float_sparse_damping(setting: float | str, tokens: int, in_features: int) -> float:
    """The relative damping float_sparse applies to one linear: `setting` itself, or with "auto" 0.3 where the
    linear has fewer calibration tokens than inputs and the original's 0.1 elsewhere. With fewer tokens than inputs
    X^T X is singular and the damping alone decides the fit in its null space: on Qwen2.5-Coder-1.5B's down
    projections (0.9 tokens per input) 0.3 left 10% less held-out error than 0.1 and 1.0 about 40% more, while on
    its other linears (5.3 tokens per input) 0.1 was best (bench/layer_error.py, BENCHMARKS.md)."""
    if setting != AUTO_DAMPING:
        return float(setting)
    return SCARCE_TOKENS_DAMPING if tokens < in_features else FLOAT_SPARSE_DAMPING


def blended_target(dense: torch.Tensor, hn: torch.Tensor, wn: torch.Tensor, blend: float,
                   damping: float) -> torch.Tensor:
    """float_sparse's right-hand side for a dense target, in place of `dense` (D^-1 X^T Y [in, out]): blend of it
    plus 1 - blend of the linear's own, Hn wn. hn holds the damped Hn + damping I, and the damping pulls towards the
    dense weights whichever the target: the result is blend D^-1 X^T Y + (1 - blend) Hn wn + damping wn."""
    if blend == 1.0:
        return dense.add_(wn, alpha=damping)
    return dense.mul_(blend).addmm_(hn, wn, alpha=1.0 - blend).add_(wn, alpha=blend * damping)


def float_sparse(w: torch.Tensor, stats: LinearStats, ratio: float, pattern, *,
                 dense_target: torch.Tensor | None = None, target_blend: float = 1.0, rho: float = 1.0,
                 row_masks: bool = False,
                 iters: int = 20, mask_iters: int = 15, damp: float | str = FLOAT_SPARSE_DAMPING,
                 mask_score: str = "magnitude") -> torch.Tensor:
    """The original W16A16S sparsifier: Wanda scores ranked over the whole matrix (or N:M groups) with an
    ADMM weight reconstruction (Boza 2024) on the diagonally normalised Hessian.

    The reconstruction fits X W^T by default (the original). With `dense_target` = X^T Y [in, out] for w's rows,
    where Y are the dense model's outputs of this linear, it fits those instead: min ||X W'^T - Y||, so each
    linear also undoes what the pruned layers before it changed in its inputs. `target_blend` b < 1 fits
    b Y + (1 - b) X W^T instead: a fit between the two, for calibration too scarce to pin the dense one down.

    The mask ranks the whole matrix (the original) or, with `row_masks`, each output row on its own. A
    whole-matrix ranking minimises the total error but can prune an output row of small norm almost entirely
    (up to 93% on Qwen2.5-1.5B's o_proj), which leaves that output channel mostly error.

    The mask ranks the ADMM iterate's magnitude on the normalised Hessian (the original's Wanda-like score), or
    with `mask_score` "obs" that magnitude divided by sqrt([(Hn + damping)^-1]_jj): OBS's saliency, which
    prunes first the inputs whose loss the other inputs can take over (those correlated with others).

    All maths in fp32 on w's device, the inverse included: after the normalisation diag(Hn) = 1, the
    damping and rho = 1 put every eigenvalue of the inverted matrix at >= 1.1 while the largest is at most
    ~1.1 * in + 1, so it is well conditioned and an fp64 inverse buys nothing: it costs in^2 * 8 bytes and is
    slow on most GPUs and on torch's CPU path.
    The ADMM loop is 20 [in, in] x [in, out] matmuls plus 15 whole-matrix k-th value selections.
    `damp` is relative to the mean of Hn's diagonal, or "auto" (float_sparse_damping).
    """
    h, owned = _hessian(stats, "float_sparse", w.device)  # [in, in]
    damp = float_sparse_damping(damp, stats.tokens, w.shape[1])
    live = h.diagonal() > 0
    d = h.diagonal().clamp_min(0).sqrt()  # ||X_j||; no view of h kept: once hn is freed, so is h's memory
    # a never-activated column (H row and column all 0) gets a tiny positive norm: its score |W|*d ranks it
    # below the live columns and nothing divides by 0; with no live column at all, d = 1 (plain magnitude)
    dmax = d.max()
    floor = torch.where(dmax > 0, dmax * 1e-8, torch.ones_like(dmax))
    d = torch.where(live, d, floor)  # [in]
    hn = h.div_(d[:, None]) if owned else h / d[:, None]
    hn /= d[None, :]  # D^-1 H D^-1, unit diagonal on live columns
    del h
    wn = w.to(torch.float32, copy=True).mul_(d[None, :]).T  # [in, out], a view of [out, in] memory; |wn|: Wanda score
    mean_diag = hn.diagonal().mean()
    undamped = hn.diagonal().clone()

    def factor(rel: float):
        # hn is the only [in, in] matrix: each factorisation overwrites its lower triangle, and its strict upper
        # triangle with the saved diagonal rebuilds it for the next one (or for a retry with more damping)
        damped = undamped + rel * mean_diag
        restore_symmetric(hn, damped)
        xy = hn @ wn if dense_target is None else blended_target(dense_target / d[:, None], hn, wn, target_blend,
                                                                  float(rel * mean_diag))
        score_scale = None
        if mask_score == MASK_SCORES[1]:
            score_scale = _inverse_diagonal_(hn)
            if score_scale is None:
                return None
            score_scale = score_scale.rsqrt_()[:, None]  # [in, 1]
            restore_symmetric(hn, damped)
        hn.diagonal().add_(rho)
        return (xy, score_scale) if _cholesky_(hn) else None

    # [in, out], the mask score's factor per input (or None); hn's lower triangle: the factor L of damped Hn + rho I
    xy, score_scale = _with_damping(factor, damp, "float_sparse")
    inverse_from_cholesky_(hn)
    mirror_lower(hn)
    hinv = hn  # [in, in]: (L L^T)^-1
    del hn
    # the ADMM iterates, each [in, out]: four such buffers, every step written into them (the same operations in
    # the same order as `v = wn + u; z = mask(v); u += wn - z; wn = hinv @ (xy + rho * (z - u))`, so the same bits;
    # v is formed twice on a step that remakes the mask rather than held)
    u, z = torch.zeros_like(wn), torch.empty_like(wn)
    zero = torch.zeros((), dtype=wn.dtype, device=wn.device)
    keep = None
    for it in range(iters):
        if it < mask_iters or keep is None:
            keep = None  # the old mask goes before the new one is made
            score = torch.add(wn, u, out=z).abs_()
            if score_scale is not None:
                score.mul_(score_scale)
            keep = make_mask(score.T, ratio, pattern, per_row=row_masks).T  # [in, out]; N:M along the inputs
        torch.where(keep, torch.add(wn, u, out=z), zero, out=z)  # apply_mask
        u.add_(wn.sub_(z))  # wn's memory holds wn - z until the product below overwrites it
        torch.matmul(hinv, z.sub_(u).mul_(rho).add_(xy), out=wn)
    del hinv, xy, z, score  # before the result's copies: the [in, in] inverse is the largest thing held
    out = torch.where(keep, wn.add_(u), zero, out=u).T.div_(d[None, :])  # apply_mask in place; +0.0 / d = +0.0
    del wn
    return out.to(w.dtype).contiguous()  # row-major, as safetensors needs


def sparsegpt(w: torch.Tensor, stats: LinearStats, ratio: float, pattern, *, block: int = 128,
              damp: float = 0.01) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with weight updates through the upper Cholesky factor
    of H^-1, in lazy blocks of 128 columns, with adaptive mask selection.

    Unstructured: at the start of each block every row prunes its entries with the smallest w^2 / [H^-1]_jj^2
    in that block; the per-block count is floor(i2 * ratio) - floor(i1 * ratio) for the block's columns
    [i1, i2), so each row ends with exactly floor(in * ratio) zeros, spread as evenly as rounding allows.
    N:M: the mask of every M columns is chosen when the first of them is reached. fp32 throughout (as the
    paper's reference), with the damping raised x10 when a Cholesky factorisation fails.
    """
    rows, cols = w.shape
    if pattern is not None:
        n, m = pattern
        if cols % m:
            raise SparsezipError(f"a matrix with {cols} inputs cannot take a {n}:{m} pattern ({cols} % {m} != 0)")
        block = m * max(1, block // m)  # an N:M group never straddles two blocks
    h, owned = _hessian(stats, "sparsegpt", w.device)
    h = h if owned else h.clone()  # [in, in], overwritten below
    dead = h.diagonal() <= 0  # inputs never activated: no loss whatever their weight
    live_mean = h.diagonal()[~dead].mean() if bool((~dead).any()) else torch.ones((), device=h.device)
    h[dead, :] = 0
    h[:, dead] = 0
    h.diagonal()[dead] = live_mean  # decoupled from the rest: OBS updates never reach these columns
    mean_diag = h.diagonal().mean()

    def factor(rel: float):
        return h if _inverse_upper_factor_(h, rel * mean_diag) else None

    hinv = _with_damping(factor, damp, "sparsegpt")  # h overwritten: upper triangular, H^-1 = hinv^T hinv
    del h
    # [in, out], the only copy of w: one input column is one contiguous row, for the per-column updates
    Wt = w.T.to(torch.float32).contiguous()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = Wt[i1:i2]  # [b, rows], updated in place
        k = int(i2 * ratio) - int(i1 * ratio) if pattern is None else 0
        prune_block = cpu_prune.obs_block if cpu_prune.applies(w1) else _prune_block
        err1 = prune_block(w1, hinv[i1:i2, i1:i2], dead[i1:i2], k, pattern)
        Wt[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1)  # lazy update of the later blocks
    return Wt.T.to(w.dtype).contiguous()  # row-major, as safetensors needs


def _prune_block(w1: torch.Tensor, h1: torch.Tensor, dead1: torch.Tensor, prune_k: int,
                 pattern: tuple[int, int] | None) -> torch.Tensor:
    """One lazy block in torch (any device; kernels.cpu.prune.obs_block is the CPU fast path with the same rules):
    w1 [b, rows] (transposed columns of W) is pruned and masked in place; returns the errors [b, rows]."""
    prune1 = torch.zeros_like(w1, dtype=torch.bool)  # True: prune
    if pattern is None and prune_k:
        idx = torch.topk(_obs_score(w1, h1.diagonal(), dead1), prune_k, dim=0, largest=False).indices
        prune1.scatter_(0, idx, True)
    select = None if pattern is None else partial(_select_n_of_m, w1, h1.diagonal(), dead1, prune1, pattern)
    sub = OBS_SUB_BLOCK if pattern is None else pattern[1] * max(1, OBS_SUB_BLOCK // pattern[1])  # whole groups
    err1 = _obs_block(w1, h1, prune1, select, sub)
    w1.masked_fill_(prune1, 0.0)  # +0.0, never -0.0
    return err1


def _inverse_upper_factor_(h: torch.Tensor, damping: float = 0.0) -> bool:
    """Overwrite a symmetric h with the upper triangular U, U^T U = (H + damping I)^-1 (SparseGPT's factor), or
    return False, h unchanged, when that matrix is not positive definite.

    With J the order-reversing permutation and J H J = L L^T: H^-1 = J L^-T L^-1 J = (J L^-1 J)^T (J L^-1 J), and
    J L^-1 J is upper triangular with a positive diagonal, so it is that (unique) factor. One Cholesky and one
    triangular inverse, both in h's own memory: at 7B an [in, in] matrix takes gigabytes.
    """
    reverse_(h)
    diagonal = h.diagonal().clone()
    h.diagonal().add_(damping)
    if _cholesky_(h):
        invert_lower_(h)
        if _all_finite(h):
            reverse_(h.tril_())
            return True
    restore_symmetric(h, diagonal)
    reverse_(h)
    return False


def _inverse_diagonal_(a: torch.Tensor) -> torch.Tensor | None:
    """diag(a^-1) of a positive definite a, or None where its Cholesky factorisation fails: a^-1 = L^-T L^-1, so
    [a^-1]_jj is the squared norm of column j of L^-1. Overwrites a's lower triangle (with L^-1)."""
    if not _cholesky_(a):
        return None
    invert_lower_(a)
    diag = lower_column_sq_norms(a)
    return diag if _all_finite(diag) else None


def _obs_score(w1: torch.Tensor, d1: torch.Tensor, dead1: torch.Tensor) -> torch.Tensor:
    """OBS saliency w^2 / [H^-1]_jj^2 ([b, rows]); dead inputs cost nothing, so they go first."""
    return torch.where(dead1[:, None], torch.zeros((), device=w1.device), w1.square() / d1.square()[:, None])


def _select_n_of_m(w1: torch.Tensor, d1: torch.Tensor, dead1: torch.Tensor, prune1: torch.Tensor,
                   pattern: tuple[int, int], j: int) -> None:
    """At the first column j of each group of M, mark its M - N least salient inputs (their weights are up to
    date now: every earlier column's update has reached them)."""
    n, m = pattern
    if j % m:
        return
    s = _obs_score(w1[j:j + m], d1[j:j + m], dead1[j:j + m])  # [m, rows]
    prune1[j:j + m].scatter_(0, torch.topk(s, m - n, dim=0, largest=False).indices, True)


def _obs_block(w1: torch.Tensor, h1: torch.Tensor, prune1: torch.Tensor,
               select: Callable[[int], None] | None, sub: int) -> torch.Tensor:
    """Prune one block's columns in order with OBS updates of the columns after each; returns the errors
    ([b, rows], for the lazy update of later blocks). w1 [b, rows] is updated in place but not masked.

    Column j's error e = w_j / [H^-1]_jj where pruned (0 where kept) moves every later column by
    -H^-1_jk * e. The updates reach the next `sub` columns as rank-1 updates and the rest of the block as one
    GEMM per `sub` columns: the same sums in another order, with a fraction of the memory traffic. `select`
    (N:M) chooses the mask of a group when its first column is reached (a group never straddles a sub-block).
    """
    b = w1.shape[0]
    d1 = h1.diagonal()
    err1 = torch.empty_like(w1)
    for s1 in range(0, b, sub):
        s2 = min(s1 + sub, b)
        for j in range(s1, s2):
            if select is not None:
                select(j)
            e = torch.mul(w1[j], prune1[j], out=err1[j]).div_(d1[j])  # [rows]
            w1[j + 1:s2].addr_(h1[j, j + 1:s2], e, alpha=-1)
        w1[s2:].addmm_(h1[s1:s2, s2:].T, err1[s1:s2], alpha=-1)
    return err1


METHODS = {
    "magnitude": Method(magnitude, calibrated=False, needs_hessian=False,
                        description="|W|, ranked over each matrix"),
    "wanda": Method(wanda, calibrated=True, needs_hessian=False, row_local=True,
                    description="|W|*||X||, ranked within each output row"),
    "sparsegpt": Method(sparsegpt, calibrated=True, needs_hessian=True, row_local=True,
                        description="OBS with weight updates, 128-column blocks, per-row sparsity (SparseGPT)"),
    "float_sparse": Method(float_sparse, calibrated=True, needs_hessian=True,
                           description="the original W16A16S: |W|*||X|| over each matrix + ADMM weight update"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise SparsezipError(f"unknown pruning method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
