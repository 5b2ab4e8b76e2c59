"""L2 precision rounding against an independent float64 reference, on every fp16 bit pattern."""

from __future__ import annotations

import pytest
import torch

from sparsezip.rounding import l2_round

E5M2_MAX = 57344.0


def all_fp16() -> torch.Tensor:
    """Every one of the 65536 fp16 bit patterns, as a [256, 256] matrix."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(256, 256)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF


def reference_q(w: torch.Tensor) -> torch.Tensor:
    """Q(w) by plain float64 arithmetic: neighbours on the E5M2 grid, nearest wins, ties to the even mantissa;
    2^-14 <= |w| < 2^-8 -> the linearly nearest power of two (tie up); subnormals and zeros -> +0;
    saturation at 57344; inf / NaN unchanged."""
    v = w.double()
    a = v.abs()
    m, E = torch.frexp(a)  # a = m * 2^E, 0.5 <= m < 1
    e = (E - 1).double()  # a in [2^e, 2^(e+1))
    # E5M2 grid: 4 values per binade, spacing 2^(e-2)
    spacing = torch.pow(2.0, e - 2)
    steps = torch.floor(a / spacing)  # 4..7
    lo, hi = steps * spacing, (steps + 1) * spacing
    tie_pick = torch.where(steps % 2 == 0, lo, hi)
    grid = torch.where(a - lo < hi - a, lo, torch.where(hi - a < a - lo, hi, tie_pick))
    grid = grid.clamp_max(E5M2_MAX)
    p_lo, p_hi = torch.pow(2.0, e), torch.pow(2.0, e + 1)
    pow2 = torch.where(a - p_lo < p_hi - a, p_lo, p_hi)
    mag = torch.where(a >= 2.0**-8, grid, pow2)
    mag = torch.where(a < 2.0**-14, torch.zeros_like(a), mag)  # zeros and subnormals
    out = torch.where(mag == 0, torch.zeros_like(a), torch.copysign(mag, v)).to(torch.float16)
    special = ~torch.isfinite(v)
    return torch.where(special, w, out)


def test_every_fp16_pattern_matches_reference():
    w = all_fp16()
    got = l2_round(w, torch.ones(256), keep_fraction=0.0)
    want = reference_q(w)
    mismatch = bits(got) != bits(want)
    assert not mismatch.any(), f"{int(mismatch.sum())} patterns differ, e.g. input bits " \
                               f"{hex(int(bits(w)[mismatch][0]))}"


def test_output_grid_properties_on_every_pattern():
    w = all_fp16()
    out = l2_round(w, torch.ones(256), keep_fraction=0.0)
    wa, oa = w.double().abs(), out.double().abs()
    finite = torch.isfinite(w.double())
    big = finite & (wa >= 2.0**-8)
    assert ((bits(out)[big] & 0xFF) == 0).all()  # an E5M2 value: low byte 0
    assert torch.isfinite(out.double()[finite]).all()  # nothing finite overflows to inf
    small = finite & (wa >= 2.0**-14) & (wa < 2.0**-8)
    m, _ = torch.frexp(oa[small])
    assert (m == 0.5).all()  # powers of two
    assert ((oa[small] / wa[small]) <= 2).all() and ((oa[small] / wa[small]) >= 0.5).all()
    sub_or_zero = wa < 2.0**-14
    assert (bits(out)[sub_or_zero] == 0).all()  # +0.0, never -0.0
    special = ~finite
    assert (bits(out)[special] == bits(w)[special]).all()  # inf and NaN payloads unchanged
    assert (torch.signbit(out[finite & (wa >= 2.0**-14)]) == torch.signbit(w[finite & (wa >= 2.0**-14)])).all()


@pytest.mark.parametrize("value, expected", [
    (65504.0, 57344.0),  # fp16 max: saturates instead of becoming inf
    (-65504.0, -57344.0),
    (61440.0, 57344.0),  # the IEEE overflow tie
    (61408.0, 57344.0),
    (57344.0, 57344.0),
    (53248.0, 49152.0),  # 1.625 * 2^15: tie between 1.5 (mantissa 10) and 1.75 (11): to even
    (1.125, 1.0),  # tie between 1.0 (mantissa 00) and 1.25 (01): to even
    (1.375, 1.5),  # tie between 1.25 (01) and 1.5 (10): to even
    (1.625, 1.5),  # tie between 1.5 (10) and 1.75 (11): to even
    (1.875, 2.0),  # tie between 1.75 (11) and 2.0: to even, carrying into the exponent
    (1.0009765625, 1.0),
    (-1.3740234375, -1.25),
    (1.9990234375, 2.0),
    (2.0**-8, 2.0**-8),
    (1.49902343750 * 2.0**-9, 2.0**-9),  # just under 1.5 * 2^-9: down
    (1.5 * 2.0**-9, 2.0**-8),  # the tie goes up
    (-1.75 * 2.0**-14, -2.0**-13),
    (2.0**-14, 2.0**-14),
    (2.0**-24, 0.0),  # subnormals -> +0
    (-(2.0**-15), 0.0),
    (-0.0, 0.0),
])
def test_hand_checked_values(value, expected):
    w = torch.tensor([[value]], dtype=torch.float16)
    assert float(w) == value  # the test value itself is exactly representable
    got = l2_round(w, torch.ones(1), keep_fraction=0.0)
    assert bits(got).item() == bits(torch.tensor([[expected]], dtype=torch.float16)).item(), float(got)


@pytest.mark.parametrize("rows_per_block", [None, 3])  # the default blocks hold the whole matrix; 3: 4 blocks
def test_keeps_exactly_floor_count_with_largest_weighted_error(rows_per_block, monkeypatch):
    from sparsezip import masks

    if rows_per_block:
        monkeypatch.setattr(masks, "BLOCK_ENTRIES", 13 * rows_per_block)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(10, 13, generator=g) * 0.05).to(torch.float16)  # 130 entries: 2.6 -> floor 2 (round: 3)
    norm = torch.rand(13, generator=g) * 10 + 0.1
    ref = reference_q(w)
    err = (w.double() - ref.double()).abs() * norm.double()[None, :]
    assert (err > 0).sum() > 10  # the reference changes many entries, so keeping is visible
    for frac, k in [(0.02, 2), (0.1, 13), (0.5, 65)]:
        out = l2_round(w, norm, keep_fraction=frac)
        kept = (bits(out) == bits(w)) & (bits(ref) != bits(w))
        assert int(kept.sum()) == k
        assert (bits(out)[~kept] == bits(ref)[~kept]).all()
        assert err[kept].min() >= err[~kept].max() * (1 - 1e-6)


def test_keep_never_restores_negative_zero_and_leaves_specials():
    w = torch.tensor([[-0.0, 0.0, float("inf"), float("nan"), 1.1, -2.0**-20, 300.3, -0.0]], dtype=torch.float16)
    out = l2_round(w, torch.full((8,), 1e3), keep_fraction=1.0)
    ob = bits(out)[0].tolist()
    wb = bits(w)[0].tolist()
    assert ob[0] == 0 and ob[1] == 0 and ob[7] == 0
    assert ob[2] == wb[2] and ob[3] == wb[3]
    assert ob[4] == wb[4] and ob[5] == wb[5] and ob[6] == wb[6]  # all entries with an error are kept


def test_large_matrix_keep_count():
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(300, 200, generator=g) * 0.02).to(torch.float16)
    norm = torch.rand(200, generator=g) + 0.5
    ref = reference_q(w)
    out = l2_round(w, norm)
    changed = bits(out) != bits(ref)
    assert int(changed.sum()) == int(300 * 200 * 0.02)  # 1200 kept entries, each differing from Q(w)
    assert (bits(out)[changed] == bits(w)[changed]).all()


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        l2_round(torch.zeros(4, 4), torch.ones(4))  # fp32
    with pytest.raises(ValueError):
        l2_round(torch.zeros(4, 4, dtype=torch.float16), torch.ones(3))
