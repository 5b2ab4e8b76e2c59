"""L2 precision rounding: the last step of the original W16A16S sparsifier.

Most non-zero fp16 weights are rounded to FP8-E5M2 values held in fp16 (low byte 0), which is what makes
the lossless codec's job easy; the entries whose rounding would hurt the layer output most keep their
exact fp16 value. Bit manipulation on the 16-bit patterns, vectorised, on any device.
"""

from __future__ import annotations

import torch

from .masks import row_blocks

E5M2_MAX_BITS = 0x7B00  # 57344 = 1.75 * 2^15, the largest finite E5M2 value
SMALL_EXP = 7  # biased fp16 exponent of 2^-8: |w| below it (but normal) becomes a power of two


def _q_bits(u: torch.Tensor) -> torch.Tensor:
    """Q(w) on fp16 bit patterns u (int32 in [0, 0xFFFF]) -> int32 bit patterns of the rounded values."""
    sign = u & 0x8000
    a = u & 0x7FFF  # magnitude bits
    exp = a >> 10
    # |w| >= 2^-8: keep 2 of the 10 mantissa bits, round to nearest, ties to even. A carry out of the
    # mantissa correctly bumps the exponent; a carry into exponent 31 (|w| >= 61440) saturates at 57344.
    lsb = (a >> 8) & 1
    e5m2 = ((a + 0x7F + lsb) & 0x7F00).clamp_max(E5M2_MAX_BITS)
    # 2^-14 <= |w| < 2^-8: the nearest power of two (linear distance, ties up): drop all 10 mantissa bits
    # after adding half of them, so a mantissa >= 1.5 carries into the next power (at most 2^-8 itself)
    pow2 = (a + 0x200) & 0x7C00
    mag = torch.where(exp >= SMALL_EXP, e5m2, pow2)
    out = torch.where(exp == 0, torch.zeros_like(u), sign | mag)  # +-0 and subnormals -> +0.0
    return torch.where(exp == 31, u, out)  # +-inf and NaN unchanged


def _to_fp16(bits: torch.Tensor) -> torch.Tensor:
    """int32 patterns in [0, 0xFFFF] -> fp16 (wrapped into int16 explicitly, not by an overflowing cast)."""
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.float16)


def l2_round(w: torch.Tensor, col_norm: torch.Tensor, keep_fraction: float = 0.02) -> torch.Tensor:
    """Round the fp16 weight w [out, in] to E5M2 precision, keeping the entries that matter most exact.

    Q(w), entry by entry (all results are E5M2 values, i.e. fp16 with the low byte 0, unless kept):
    - |w| >= 2^-8: round to nearest with 2 mantissa bits, ties to even mantissa. There is no inf: every
      finite |w| >= 61440 (which IEEE rounding would send to 2^16 = inf), 65504 included, saturates to
      +-57344, like the "saturating" FP8 conversions; its large error makes it a first candidate to keep.
    - 2^-14 <= |w| < 2^-8 (normal): the power of two nearest in the *linear* sense, which minimises
      |w - Q(w)|: for w = m * 2^e with 1 <= m < 2, 2^e if m < 1.5, 2^(e+1) if m >= 1.5 (the tie m = 1.5
      goes up: round-half-to-even of the significand, 1.5 -> 2). 2^-8 itself can be the result.
    - subnormals and zeros (of either sign) become +0.0; a pruned weight never turns into -0.0.
    - +-inf and NaN are left unchanged (payload included).
    Then the k = floor(numel * keep_fraction) entries with the largest |w - Q(w)| * col_norm[j] keep their
    exact fp16 value (ties broken arbitrarily; an entry whose error is 0 needs no keeping and is left as Q(w),
    so fewer than k entries differ from Q(w) only when fewer than k have an error at all).

    col_norm [in] is ||X_j||, the calibration norm of input j (sqrt of LinearStats.sq_norm).
    """
    if w.dtype != torch.float16 or w.dim() != 2:
        raise ValueError(f"l2_round takes a 2-D fp16 weight, got {w.dtype} of shape {tuple(w.shape)}")
    if col_norm.shape != (w.shape[1],):
        raise ValueError(f"col_norm must have shape ({w.shape[1]},), got {tuple(col_norm.shape)}")
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    w = w.contiguous()
    k = int(w.numel() * keep_fraction)
    norm = col_norm.to(device=w.device, dtype=torch.float32)[None, :]
    out = torch.empty_like(w)
    err = torch.empty(w.shape, dtype=torch.float32, device=w.device) if k else None
    # by blocks of rows: the bit maths holds several int32 matrices at once, 0.27 GB each for a whole 7B gate matrix
    for rows, block in row_blocks(w):
        out[rows] = _to_fp16(_q_bits(block.view(torch.int16).to(torch.int32) & 0xFFFF))
        if k:
            wf = block.float()
            e = (wf - out[rows].float()).abs_().mul_(norm)  # an inf or NaN weight's error is 0
            err[rows] = torch.where(torch.isfinite(wf), e, torch.zeros((), device=w.device)).nan_to_num_(0.0)
    if k:
        flat = err.view(-1)
        kept = torch.topk(flat, k).indices
        kept = kept[flat[kept] > 0]
        out.view(-1)[kept] = w.view(-1)[kept]
    return out
