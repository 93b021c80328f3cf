"""The native CPU kernels against the pure-torch reference (pagedopt.functional.reference):
the quantization and fp16/bf16 conversion primitives, the update kernels through the
functional API, the norms of the prepare pass, and marshalling and errors. Loading and backend
dispatch are tested in test_native_cpu_loading.py, the optimizer classes on the native path in
test_native_cpu_optimizers.py; the helpers are in native_cpu_helpers.py.

Tolerance tiers (DESIGN.md "Numerics contract"):

* **exact** - the kernels perform the reference's float32 operations in the same order
  (``native/include/pagedopt``), so parameters, float32 states, 8-bit codes and absmax must be
  bit-identical to the reference, over many steps without re-syncing (no drift allowed).
  Quantization codes would be allowed to differ on counted rounding ties, but pagedopt defines
  the code through float32 decision thresholds in both places, so there are none: we assert 0.
* **float64 order** - squared norms are float64 sums; the kernels add in a different order
  than torch, so they agree to float64 rounding (rtol 1e-12), and exactly between thread counts.

The library is built by ``pip install -e .`` (``setup.py``); these tests skip only when it was
not built at all, and fail when it exists but does not load (the import of native_cpu_helpers
does both).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from pagedopt.backends import cpu
from pagedopt.functional import dispatch, reference
from pagedopt.functional.items import UpdateItem
from pagedopt.functional.kinds import kind_for
from pagedopt.functional.scalars import step_scalars

from native_cpu_helpers import (
    BACKEND,
    DTYPES,
    HYPER,
    KINDS,
    LIB,
    MODES,
    Slot,
    assert_bitwise_equal,
    assert_slots_equal,
    check_code_search_dense_sample_and_bad_range,
    check_code_search_matches_python_reference_at_thresholds,
    check_dequantize_every_code,
    check_grad_norm_sq_matches_reference,
    check_tiny_and_huge_states_use_the_dividing_normalization,
    gradient,
    run_step,
    torch_on_one_thread,
)

SHAPES = ((4097,), (257, 3), (1,), (0,))

one_torch_thread = pytest.fixture(autouse=True)(torch_on_one_thread)


# ---- the fast code search --------------------------------------------------------------------

ONE_BITS = 0x3F800000


@pytest.mark.slow
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_code_search_is_exact_for_every_float_in_minus_one_to_one(signed):
    """Every float32 in [-1, 1] (2 x 1.07e9 values): the table search (portable and, where
    built, AVX-512) gives quantize_value()'s code (count_below over the thresholds, then the
    no-collapse rule). Exact tier."""
    first = ctypes.c_uint32()
    for lo, hi in ((0, ONE_BITS), (0x80000000, 0x80000000 | ONE_BITS)):
        bad = LIB.po_check_code_search(int(signed), lo, hi, ctypes.byref(first), torch.get_num_threads())
        assert bad == 0, f"{bad} mismatches, first at bits {first.value:#010x}"


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_code_search_dense_sample_and_bad_range(signed):
    check_code_search_dense_sample_and_bad_range(signed)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_code_search_matches_python_reference_at_thresholds(signed):
    check_code_search_matches_python_reference_at_thresholds(signed)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_dequantize_every_code(signed):
    check_dequantize_every_code(signed)


# ---- fp16 / bf16 conversions -----------------------------------------------------------------


def _native_from_float(dtype_code, x):
    out = torch.empty(x.numel(), dtype=torch.int16)
    LIB.check(LIB.po_convert_from_float(dtype_code, x.data_ptr(), out.data_ptr(), x.numel()), "convert")
    return out


def _compare_from_float(x, torch_dtype, dtype_code, what):
    ours = _native_from_float(dtype_code, x)
    theirs = x.to(torch_dtype).view(torch.int16)
    nan = torch.isnan(x)
    bad = int(((ours != theirs) & ~nan).sum())
    assert bad == 0, f"{what}: {bad} conversions differ from torch"
    # NaN stays NaN (payload bits may differ between torch's own scalar and vector paths)
    assert bool(torch.isnan(ours[nan].view(torch_dtype)).all()), what


@pytest.mark.parametrize("torch_dtype,code", [(torch.float16, 1), (torch.bfloat16, 2)], ids=["fp16", "bf16"])
def test_to_float_every_value(torch_dtype, code):
    """All 65536 fp16/bf16 values to float32 against torch. Exact tier (NaN: stays NaN)."""
    h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    out = torch.empty(h.numel())
    LIB.check(LIB.po_convert_to_float(code, h.data_ptr(), out.data_ptr(), h.numel()), "convert")
    expected = h.view(torch_dtype).float()
    nan = torch.isnan(expected)
    assert torch.equal(out[~nan].view(torch.int32), expected[~nan].view(torch.int32))
    assert bool(torch.isnan(out[nan]).all())


@pytest.mark.parametrize("torch_dtype,code", [(torch.float16, 1), (torch.bfloat16, 2)], ids=["fp16", "bf16"])
def test_from_float_dense_and_boundaries(torch_dtype, code):
    """float32 -> fp16/bf16 against torch: every bit pattern near the subnormal, overflow and
    rounding boundaries, plus a dense sample of all floats. Exact tier."""
    parts = [torch.arange(start, start + (1 << 16), dtype=torch.int64)
             for start in (0x33000000 - 100, 0x387FE000, 0x38800000 - 100, 0x477FE000, 0x7F7F0000, 0x7F800000 - 10)]
    parts.append(torch.arange(0, 1 << 32, 4093, dtype=torch.int64))
    bits = torch.cat(parts)
    bits = torch.cat([bits, bits | 0x80000000]) & 0xFFFFFFFF
    x = (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)  # uint32 -> int32 bits
    _compare_from_float(x.contiguous(), torch_dtype, code, "sample")


@pytest.mark.slow
@pytest.mark.parametrize("torch_dtype,code", [(torch.float16, 1), (torch.bfloat16, 2)], ids=["fp16", "bf16"])
def test_from_float_every_value(torch_dtype, code):
    """All 2^32 float32 bit patterns to fp16/bf16 against torch (in chunks). Exact tier."""
    chunk = 1 << 24
    torch.set_num_threads(2)
    bits, converted = torch.empty(chunk, dtype=torch.int32), torch.empty(chunk, dtype=torch_dtype)
    step = torch.full((chunk,), chunk, dtype=torch.int32)
    torch.arange(-(1 << 31), -(1 << 31) + chunk, dtype=torch.int32, out=bits)
    for start in range(-(1 << 31), 1 << 31, chunk):
        x = bits.view(torch.float32)
        converted.copy_(x)
        bad = LIB.po_count_conversion_mismatches(code, x.data_ptr(), converted.data_ptr(), chunk)
        assert bad == 0, f"{bad} conversions differ from torch in the chunk at {start & 0xFFFFFFFF:#010x}"
        bits.add_(step)  # next chunk (wraps at the end, harmlessly)


# ---- kernels vs reference: the functional API ------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", KINDS)
def test_kernels_match_reference_over_many_steps(name, mode, dtype, shape):
    """22 steps of every update kind x state precision x dtype x odd shape, with NaN/Inf and zero
    gradient elements, skip_zeros on odd kinds, gradient scales and update scales given as 0-d
    views into larger tensors. Parameters, states, codes and absmax: exact tier, no re-sync."""
    kind = kind_for(name)
    seed = hash((name, mode, str(dtype), shape)) % 10_000
    ref = Slot(kind, shape, dtype, mode, seed)
    nat = ref.clone()
    skip_zeros = KINDS.index(name) % 2 == 1
    scales = torch.tensor([0.25, 0.8, 1.0, 0.5])
    for step in range(1, 23):
        g = gradient(shape, dtype, step, seed)
        s = step_scalars(kind, HYPER[name], step, skip_zeros=skip_zeros)
        gs, us = scales[step % 4], scales[(step + 1) % 4]  # 0-d views, storage offset != 0
        ref_max = run_step(dispatch.REFERENCE, kind, [ref.item(g, s, gs, us)])
        nat_max = run_step(BACKEND, kind, [nat.item(g, s, gs, us)])
        for (r1, r2), (n1, n2) in zip(ref_max, nat_max):
            assert_bitwise_equal(r1, n1, f"step {step}: prepare max1")
            if r2 is not None:
                assert_bitwise_equal(r2, n2, f"step {step}: prepare max2")
        if step in (1, 2, 22):
            assert_slots_equal(ref, nat, f"step {step}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["adamw", "ademamix", "lion", "adagrad"])
def test_many_items_in_one_call_with_multi_unit_tensors(name, mode):
    """One native call over several parameters of different sizes and dtypes, some spanning
    several work units (16384 elements) and ending in partial blocks, on 2 threads. Exact tier,
    20 steps."""
    kind = kind_for(name)
    specs = [((130, 257), torch.float32), ((3,), torch.float16), ((0,), torch.float32), ((16384,), torch.bfloat16),
             ((16385,), torch.float16)]
    refs = [Slot(kind, shape, dtype, mode, 100 + i) for i, (shape, dtype) in enumerate(specs)]
    nats = [r.clone() for r in refs]
    for step in range(1, 21):
        s = step_scalars(kind, HYPER[name], step)
        grads = [gradient(shape, dtype, step, 100 + i) for i, (shape, dtype) in enumerate(specs)]
        run_step(dispatch.REFERENCE, kind, [r.item(g, s) for r, g in zip(refs, grads)])
        torch.set_num_threads(2)  # the kernels' OpenMP path
        run_step(BACKEND, kind, [n.item(g, s) for n, g in zip(nats, grads)])
        torch.set_num_threads(1)
    for i, (r, n) in enumerate(zip(refs, nats)):
        assert_slots_equal(r, n, f"param {i} {specs[i]}")


@pytest.mark.parametrize("name", ["adamw", "ademamix", "momentum", "rmsprop"])
def test_tiny_and_huge_states_use_the_dividing_normalization(name):
    check_tiny_and_huge_states_use_the_dividing_normalization(name)


def test_results_do_not_depend_on_the_thread_count():
    """1 and 2 threads (and 3 on 2 cores): identical parameters, states and float64 norms.
    Exact tier - units and their reduction order are fixed by the data, not by threads."""
    kind = kind_for("lamb")
    specs = [((300, 257), torch.float32), ((5000,), torch.bfloat16), ((70_000,), torch.float16)]
    outputs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            slots = [Slot(kind, shape, dtype, mode, 5) for (shape, dtype), mode in zip(specs, MODES)]
            norms = []
            for step in range(1, 6):
                grads = [gradient(shape, dtype, step, 5) for shape, dtype in specs]
                s = step_scalars(kind, HYPER["lamb"], step)
                items = [sl.item(g, s) for sl, g in zip(slots, grads)]
                prepared = BACKEND.prepare(kind, items, want_norms=True)
                norms += [(p.unorm_sq, p.pnorm_sq) for p in prepared]
                norms += [tuple(BACKEND.grad_norm_sq(grads))]
                run_step(BACKEND, kind, items)
            outputs.append((slots, norms))
    finally:
        torch.set_num_threads(old)
    (first_slots, first_norms), others = outputs[0], outputs[1:]
    for slots, norms in others:
        for a, b in zip(first_slots, slots):
            assert_slots_equal(a, b, "threads")
        for na, nb in zip(first_norms, norms):
            for x, y in zip(na, nb):
                assert torch.equal(x, y)


# ---- norms -----------------------------------------------------------------------------------


def test_grad_norm_sq_matches_reference():
    check_grad_norm_sq_matches_reference()


@pytest.mark.parametrize("mode", MODES)
def test_prepare_norms_and_maxima_match_reference(mode):
    """Update / parameter norms (float64-order tier) and tensor-wise maxima (exact tier) of the
    prepare pass, after a few steps so the states are nonzero."""
    kind = kind_for("ademamix")
    ref = Slot(kind, (3000, 7), torch.bfloat16, mode, 11)
    nat = ref.clone()
    for step in range(1, 5):
        g = gradient((3000, 7), torch.bfloat16, step, 11)
        s = step_scalars(kind, HYPER["ademamix"], step)
        r = dispatch.REFERENCE.prepare(kind, [ref.item(g, s)], want_norms=True)[0]
        n = BACKEND.prepare(kind, [nat.item(g, s)], want_norms=True)[0]
        torch.testing.assert_close(n.unorm_sq, r.unorm_sq, rtol=1e-12, atol=0)
        torch.testing.assert_close(n.pnorm_sq, r.pnorm_sq, rtol=1e-12, atol=0)
        if mode == "8bit-tensorwise":
            assert_bitwise_equal(r.max1, n.max1, "max1")
            assert_bitwise_equal(r.max2, n.max2, "max2")
        else:
            assert n.max1 is None and n.max2 is None
        run_step(dispatch.REFERENCE, kind, [ref.item(g, s)])
        run_step(BACKEND, kind, [nat.item(g, s)])
    assert_slots_equal(ref, nat, mode)


def test_prepare_of_many_items_returns_each_items_own_results():
    """One prepare call over items of every state layout (the outputs are read as tables and
    handed out as per-item views): each item's norms and maxima are its own, as from a call
    of its own (exact tier for the maxima, float64 order for the norms)."""
    kind = kind_for("adamw")
    slots = [Slot(kind, shape, torch.float32, mode, 5 + i)
             for i, (shape, mode) in enumerate([((4097,), "8bit-tensorwise"), ((300,), "8bit-blockwise"),
                                                 ((1,), "8bit-tensorwise"), ((77, 3), "32bit"),
                                                 ((513,), "8bit-tensorwise")])]
    s = step_scalars(kind, HYPER["adamw"], 3)
    grads = [gradient(slot.param.shape, torch.float32, 3, 5 + i) for i, slot in enumerate(slots)]
    together = BACKEND.prepare(kind, [slot.item(g, s) for slot, g in zip(slots, grads)], want_norms=True)
    for slot, g, r in zip(slots, grads, together):
        alone = BACKEND.prepare(kind, [slot.item(g, s)], want_norms=True)[0]
        assert r.unorm_sq.dim() == 0 and r.unorm_sq.dtype == torch.float64
        assert torch.equal(r.unorm_sq, alone.unorm_sq) and torch.equal(r.pnorm_sq, alone.pnorm_sq)
        if slot.mode == "8bit-tensorwise":
            assert r.max1.shape == (1,) and r.max2.shape == (1,)
            assert_bitwise_equal(alone.max1, r.max1, "max1")
            assert_bitwise_equal(alone.max2, r.max2, "max2")
        else:
            assert r.max1 is None and r.max2 is None


def test_prepare_columns_read_the_struct_layout():
    from pagedopt.backends.cpu_items import _CPrepareOut, prepare_columns

    outs = (_CPrepareOut * 2)()
    for i, o in enumerate(outs):
        o.max1[0], o.max1[1], o.max2 = 1.5 + i, 2.5 + i, 3.5 + i
        o.reserved, o.unorm_sq, o.pnorm_sq = 7, 0.1 + i, 0.2 + i
    maxima, norms = prepare_columns(outs, 2)
    assert maxima.tolist() == [[1.5, 2.5, 3.5], [2.5, 3.5, 4.5]]
    assert norms.tolist() == [[0.1, 0.2], [1.1, 1.2]]
    outs[0].unorm_sq = 9.0
    assert norms[0, 0].item() == 0.1  # a copy: the ctypes buffer may go away
    assert prepare_columns(outs, 0)[0].shape == (0, 3)


# ---- marshalling, errors ---------------------------------------------------------------------


def test_strided_tensors_are_copied_in_and_back():
    """Non-contiguous parameter, gradient and 32-bit states (views with strides). Exact tier."""
    kind = kind_for("adamw")
    base = torch.randn(64, 48) * 0.1
    ref_p, nat_p = base.clone(), base.clone()
    ref_m, ref_v, nat_m, nat_v = (torch.zeros(48, 64) for _ in range(4))
    for step in range(1, 6):
        g = (torch.randn(48, 64, generator=torch.Generator().manual_seed(step)) * 0.01).t()
        s = step_scalars(kind, HYPER["adamw"], step)
        reference.update(kind, [UpdateItem(ref_p.t(), g.t(), ref_m.t()[::1], ref_v.t(), None, None, s)])
        BACKEND.update(kind, [UpdateItem(nat_p.t(), g.t(), nat_m.t(), nat_v.t(), None, None, s)])
    assert_bitwise_equal(ref_p, nat_p, "param")
    assert_bitwise_equal(ref_m, nat_m, "m")
    assert_bitwise_equal(ref_v, nat_v, "v")


def test_float64_parameters_go_to_the_reference():
    kind = kind_for("lion")
    p = torch.randn(100, dtype=torch.float64)
    q = p.clone()
    g = torch.randn(100, dtype=torch.float64)
    s = step_scalars(kind, HYPER["lion"], 1)
    reference.update(kind, [UpdateItem(p, g, torch.zeros(100), None, None, None, s)])
    BACKEND.update(kind, [UpdateItem(q, g, torch.zeros(100), None, None, None, s)])
    assert torch.equal(p, q)


def test_tensorwise_maxima_of_another_float_dtype_are_accepted():
    """The reference takes new_absmax in any float dtype (``.float()``); so do the kernels.
    Exact tier."""
    kind = kind_for("rmsprop")
    ref = Slot(kind, (5000,), torch.float32, "8bit-tensorwise", 21)
    nat = ref.clone()
    for step in range(1, 4):
        g = gradient((5000,), torch.float32, step, 21)
        s = step_scalars(kind, HYPER["rmsprop"], step)
        items = [ref.item(g, s)], [nat.item(g, s)]
        for backend, its in zip((dispatch.REFERENCE, BACKEND), items):
            maxima = backend.prepare(kind, its, want_norms=False)[0]
            its[0].new_absmax1 = maxima.max1.double()  # as a float64 all-reduce might return it
            backend.update(kind, its)
    assert_slots_equal(ref, nat, "float64 maxima")


def test_bad_items_raise_errors_naming_the_field():
    kind = kind_for("adamw")
    s = step_scalars(kind, HYPER["adamw"], 1)
    p, g = torch.zeros(600), torch.zeros(600)
    with pytest.raises(ValueError, match="state2"):
        BACKEND.update(kind, [UpdateItem(p, g, torch.zeros(600), torch.zeros(599), None, None, s)])
    with pytest.raises(ValueError, match="absmax1"):
        BACKEND.update(kind, [UpdateItem(p, g, torch.zeros(600, dtype=torch.uint8), torch.zeros(600, dtype=torch.uint8),
                                         torch.zeros(2), torch.zeros(3), s)])
    with pytest.raises(ValueError, match="new_absmax1"):
        BACKEND.update(kind, [UpdateItem(p, g, torch.zeros(600, dtype=torch.uint8), torch.zeros(600, dtype=torch.uint8),
                                         torch.zeros(1), torch.zeros(1), s, block_wise=False)])
    with pytest.raises(ValueError, match="gnorm_scale"):
        BACKEND.update(kind, [UpdateItem(p, g, torch.zeros(600), torch.zeros(600), None, None, s,
                                         gnorm_scale=torch.ones(2))])


def test_native_errors_raise_with_the_library_message():
    item = cpu._CItem()
    status = LIB.po_update(42, ctypes.byref(item), 1, 1, None)
    with pytest.raises(cpu.NativeError, match="algorithm 42 is unknown"):
        LIB.check(status, "update")
    item.numel = 10
    status = LIB.po_update(0, ctypes.byref(item), 1, 1, None)
    with pytest.raises(cpu.NativeError, match="item 0: param is NULL"):
        LIB.check(status, "update")
