"""Quantization maps and block-wise quantization (pagedopt.functional.qmap / quantization)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pagedopt.functional.qmap import SIGNED_ZERO_CODE, decision_thresholds, dynamic_map, is_canonical_map
from pagedopt.functional.quantization import (
    BLOCK_SIZE,
    NEGATIVE_WEIGHT,
    RECIPROCAL_MAX,
    RECIPROCAL_MIN,
    absmax_reciprocal,
    block_absmax,
    codes_for,
    dequantize,
    normalize,
    num_blocks,
    quantize,
    quantize_with_absmax,
)


# --- the maps -------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_map_structure(signed):
    q = dynamic_map(signed)
    assert q.dtype == torch.float32 and q.numel() == 256
    assert torch.all(q[1:] > q[:-1]), "codes must be strictly increasing"
    assert q[-1] == 1.0
    if signed:
        assert q[SIGNED_ZERO_CODE] == 0.0
        assert (q < 0).sum() == 127 and (q > 0).sum() == 128
        assert not torch.any(q == -1.0)
    else:
        assert q[0] == 0.0 and torch.all(q >= 0)


@pytest.mark.parametrize("signed", [True, False])
def test_map_values_follow_the_paper(signed):
    """Level i contributes the midpoints of linspace(0.1, 1, k+1) * 10**(i-6), k = 2**i per sign
    (signed) or 2**(i+1) (unsigned) - computed here independently in float64."""
    expected = [0.0, 1.0]
    for i in range(7):
        k = 2**i if signed else 2 ** (i + 1)
        edges = np.linspace(0.1, 1.0, k + 1)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
        expected += list(mids) + (list(-mids) if signed else [])
    expected = torch.tensor(sorted(expected), dtype=torch.float64)
    torch.testing.assert_close(dynamic_map(signed).double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_map_equals_bitsandbytes(signed):
    """So that bitsandbytes state dicts load without re-quantization."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(dynamic_map(signed), bnb_functional.create_dynamic_map(signed=signed))
    assert is_canonical_map(bnb_functional.create_dynamic_map(signed=signed), signed)


def test_thresholds_are_float32_midpoints():
    for signed in (True, False):
        q = dynamic_map(signed).double()
        t = decision_thresholds(signed)
        assert t.numel() == 255 and torch.all(t[1:] > t[:-1])
        assert torch.equal(t, ((q[:-1] + q[1:]) / 2).float())


# --- code search ----------------------------------------------------------------------------


EPS32 = torch.finfo(torch.float32).eps  # 2^-23: one float32 ulp at 1.0


def brute_force_codes(x: torch.Tensor, signed: bool, tie_window: float = 2 * EPS32) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over the map in float64 (the definition of "nearest"), plus a mask of rounding
    ties: values whose distances to the two nearest codes differ by at most
    ``tie_window * |x|``, i.e. that lie within ``tie_window / 2 * |x|`` of a midpoint.

    The default window (2 ulps of x) is for values handed to :func:`codes_for` as they are:
    there the only rounding is that of the float32 threshold (half an ulp of the midpoint,
    so 1 ulp of window would do; 2 leave room)."""
    q = dynamic_map(signed).double()
    xd = x.double().reshape(-1, 1)
    dist = (xd - q.reshape(1, -1)).abs()
    codes = dist.argmin(dim=1)
    best2 = dist.topk(2, largest=False).values
    tie = (best2[:, 1] - best2[:, 0]) <= tie_window * xd.abs().clamp_min(1e-30).reshape(-1)
    return codes, tie


floats_in_unit = arrays(
    np.float32, st.integers(1, 600),
    elements=st.floats(-1.0, 1.0, width=32, allow_subnormal=True),
)


@given(floats_in_unit)
def test_signed_codes_equal_brute_force_except_ties(values):
    x = torch.from_numpy(values)
    codes = codes_for(x, signed=True).long()
    brute, tie = brute_force_codes(x, signed=True)
    q = dynamic_map(True)
    nonzero = x != 0
    # The no-collapse/no-sign-flip rule may move a code off the nearest one; everywhere else
    # the codes are the nearest ones (float32 ties excepted).
    fixed = nonzero & (torch.sign(q[brute]) != torch.sign(x))
    differs = (codes != brute) & ~tie & ~fixed
    assert not torch.any(differs), x[differs][:5]


@given(floats_in_unit)
def test_unsigned_codes_equal_brute_force_except_ties(values):
    x = torch.from_numpy(np.abs(values))
    codes = codes_for(x, signed=False).long()
    brute, tie = brute_force_codes(x, signed=False)
    fixed = (x > 0) & (brute == 0)
    differs = (codes != brute) & ~tie & ~fixed
    assert not torch.any(differs), x[differs][:5]


@given(floats_in_unit)
def test_nonzero_never_flips_sign_or_collapses(values):
    x = torch.from_numpy(values)
    q = dynamic_map(True)
    decoded = q[codes_for(x, signed=True).long()]
    assert torch.all(torch.sign(decoded) == torch.sign(x))
    u = x.abs()
    decoded_u = dynamic_map(False)[codes_for(u, signed=False).long()]
    assert torch.all((decoded_u > 0) == (u > 0))


def test_exact_code_values_round_trip():
    for signed in (True, False):
        q = dynamic_map(signed)
        assert torch.equal(codes_for(q, signed).long(), torch.arange(256))


# --- normalization by the block's reciprocal --------------------------------------------------


def test_block_maximum_normalizes_to_at_most_one():
    """Tier: exact. fl(a * fl(1 / a)) <= 1 for every float32 a in the reciprocal range, so the
    largest element of a block never normalizes above 1 (the fast code searches may rely on
    it). Checked for every significand of the binade [1, 2): while a and 1 / a are normal,
    scaling a by 2^k scales both roundings exactly, so this covers every a in
    [2^-126, 2^126]. (About 15% of them give 1 - 2^-24, which still takes the top code.)"""
    bits = torch.arange(0x3F800000, 0x40000000, dtype=torch.int64).to(torch.int32)
    a = bits.view(torch.float32)
    q = a * absmax_reciprocal(a)
    assert float(q.max()) == 1.0
    assert float(q.min()) == 1.0 - 2.0**-24
    for scale in (RECIPROCAL_MIN, 2.0**-100, 2.0**100, RECIPROCAL_MAX / 2):  # spot checks across binades
        b = a * scale
        assert bool(((b * absmax_reciprocal(b)) == q).all())
    top = codes_for(q, signed=True)
    assert bool((top == 255).all())


def test_reciprocal_range_and_fallbacks():
    """Tier: exact. Inside [2^-126, 2^126] blocks multiply by f32(1 / absmax) (a float32
    division rounded once); below (subnormal scales: 1 / absmax may overflow) and above
    (1 / absmax subnormal) they divide; absmax 0 or NaN normalizes to 0."""
    absmax = torch.tensor([0.0, float("nan"), 1e-40, RECIPROCAL_MIN, 3.0, RECIPROCAL_MAX, 1e38, float("inf")])
    inverse = absmax_reciprocal(absmax)
    expected_inverse = [0.0, 0.0, 0.0, 2.0**126, float(torch.tensor(1.0) / torch.tensor(3.0)), 2.0**-126, 0.0, 0.0]
    assert inverse.tolist() == expected_inverse
    x = torch.tensor([1.0, 1.0, 7e-41, -RECIPROCAL_MIN, 2.0, RECIPROCAL_MAX, -1e38, float("inf")])
    got = torch.cat([normalize(x[i : i + 1], absmax[i : i + 1], block_wise=False) for i in range(len(x))])
    expected = torch.stack([
        torch.tensor(0.0), torch.tensor(0.0), x[2] / absmax[2], x[3] * inverse[3], x[4] * inverse[4],
        x[5] * inverse[5], x[6] / absmax[6], x[7] / absmax[7],
    ])
    assert torch.equal(got[:7], expected[:7]) and bool(torch.isnan(got[7]))  # inf / inf
    assert codes_for(got[7:], signed=False).tolist() == [255]  # NaN sorts above every threshold


def test_values_above_one_take_the_top_code():
    """Normalized values may exceed 1 (a caller's absmax below a value); the threshold search
    clamps them: above 1 -> 255, below the lowest signed code -> 0."""
    x = torch.tensor([1.0 + 2.0**-23, 1.5, 1e30, float("inf"), -1.0, -1.5, -float("inf")])
    assert codes_for(x, signed=True).tolist() == [255, 255, 255, 255, 0, 0, 0]
    assert codes_for(x[:4], signed=False).tolist() == [255, 255, 255, 255]


floats_any_scale = arrays(
    np.float32, st.integers(1, 600),
    elements=st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True),
)


def _codes_against_exact_quotient(values: np.ndarray, signed: bool, block_wise: bool) -> None:
    """Codes of quantize() against the nearest code of the *exact* quotient x / absmax.

    Tie window, stated: the kernel's normalized value q = fl(x * fl(1 / a)) carries two
    roundings of at most 2^-24 relative each (|q - x/a| <= (2^-23 + 2^-48) |x/a|; the dividing
    fallback carries one), and the float32 threshold is off its float64 midpoint by at most
    half an ulp (2^-24 relative). So a code can differ from the nearest one only when x/a lies
    within (2^-23 + 2^-24) |x/a| (+ second-order terms) of a midpoint, i.e. the two nearest
    distances differ by at most 3 * 2^-23 |x/a|. The window below adds 1% for second-order
    terms and float64 rounding of the brute force, nothing more."""
    x = torch.from_numpy(values)
    if not signed:
        x = x.abs()
    codes, absmax = quantize(x, signed=signed, block_wise=block_wise)
    per_elem = absmax.repeat_interleave(BLOCK_SIZE)[: x.numel()] if block_wise else absmax.expand(x.numel())
    exact = torch.where(per_elem > 0, x.double() / per_elem.double().clamp_min(1e-300), torch.zeros_like(x.double()))
    brute, tie = brute_force_codes(exact, signed, tie_window=3 * EPS32 * 1.01)
    q = dynamic_map(signed)
    fixed = (exact != 0) & (torch.sign(q[brute]) != torch.sign(exact))  # no-collapse / no-sign-flip rule
    differs = (codes.long() != brute) & ~tie & ~fixed
    assert not torch.any(differs), (x[differs][:5], per_elem[differs][:5])


@given(floats_any_scale, st.booleans())
def test_signed_block_codes_equal_brute_force_of_exact_quotient_except_ties(values, block_wise):
    _codes_against_exact_quotient(values, signed=True, block_wise=block_wise)


@given(floats_any_scale, st.booleans())
def test_unsigned_block_codes_equal_brute_force_of_exact_quotient_except_ties(values, block_wise):
    _codes_against_exact_quotient(values, signed=False, block_wise=block_wise)


# --- block-wise quantization -----------------------------------------------------------------


def half_gap_bound(x: torch.Tensor, absmax_per_elem: torch.Tensor, signed: bool) -> torch.Tensor:
    """Half the gap between the two codes around each normalized value, times absmax: the
    worst-case round-to-nearest error. The signed map has no -1.0, so values below its lowest
    code are off by their distance to it (at most 1 - 0.99297)."""
    q = dynamic_map(signed).double()
    raw = x.double() / absmax_per_elem.double().clamp_min(1e-38)
    xn = raw.clamp(q[0].item(), 1.0)
    hi = torch.searchsorted(q, xn).clamp(1, 255)
    gap = q[hi] - q[hi - 1]
    below_range = (q[0] - raw).clamp_min(0)
    return torch.maximum(gap / 2, below_range) * absmax_per_elem.double()


@given(
    n=st.integers(0, 3 * BLOCK_SIZE + 7),
    scale=st.floats(1e-8, 1e4),
    signed=st.booleans(),
    block_wise=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_within_half_a_code_gap(n, scale, signed, block_wise, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    if not signed:
        x = x.abs()
    codes, absmax = quantize(x, signed=signed, block_wise=block_wise)
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert absmax.numel() == num_blocks(n, block_wise)
    if n == 0:
        return
    per_elem = absmax.repeat_interleave(BLOCK_SIZE)[:n] if block_wise else absmax.expand(n)
    err = (dequantize(codes, absmax, signed=signed, block_wise=block_wise).double() - x.double()).abs()
    # Values below half the smallest code may be pushed up to it (no-collapse rule).
    smallest = dynamic_map(signed)[SIGNED_ZERO_CODE + 1 if signed else 1].double() * per_elem.double()
    bound = torch.maximum(half_gap_bound(x, per_elem, signed), smallest) * (1 + 1e-5) + 1e-30
    assert torch.all(err <= bound), (err - bound).max()


def test_absmax_per_block_and_partial_last_block():
    x = torch.zeros(2 * BLOCK_SIZE + 3)
    x[5], x[BLOCK_SIZE + 1], x[-1] = 3.0, 2.0, 0.5
    assert block_absmax(x, signed=True).tolist() == [3.0, 2.0, 0.5]
    assert block_absmax(x, signed=True, block_wise=False).tolist() == [3.0]
    assert block_absmax(x, signed=False).tolist() == [3.0, 2.0, 0.5]


def test_negative_extreme_is_exact():
    """The signed map's lowest code is -0.99297, not -1: the block scale is stretched so the
    most negative value decodes to itself instead of shrinking by 0.7% at every step."""
    q0 = -float(dynamic_map(True)[0])
    assert NEGATIVE_WEIGHT == pytest.approx(1 / q0, rel=1e-7)
    for x in (torch.tensor([-2.0, 1.0, 0.5]), torch.tensor([-3.0e-4]), torch.randn(1000) - 5):
        codes, absmax = quantize(x, signed=True, block_wise=False)
        i = int(x.argmin())
        assert codes[i] == 0
        decoded = dequantize(codes, absmax, signed=True, block_wise=False)
        assert float(decoded[i]) == pytest.approx(float(x[i]), rel=2e-7)
    # a positive extreme still decodes exactly through the code of 1.0
    codes, absmax = quantize(torch.tensor([0.25, -0.1, 4.0]), signed=True)
    assert codes[2] == 255 and absmax.item() == 4.0


def test_zero_block_quantizes_to_zero_code():
    codes, absmax = quantize(torch.zeros(300), signed=True)
    assert torch.all(codes == SIGNED_ZERO_CODE) and torch.all(absmax == 0)
    assert torch.all(dequantize(codes, absmax, signed=True) == 0)
    codes_u, _ = quantize(torch.zeros(10), signed=False)
    assert torch.all(codes_u == 0)


def test_quantize_with_given_absmax_clamps_nothing_and_keeps_shape():
    x = torch.randn(3, 5, 7)
    codes, absmax = quantize(x, signed=True)
    again = quantize_with_absmax(x, absmax, signed=True)
    assert torch.equal(codes, again) and again.shape == (3, 5, 7)
