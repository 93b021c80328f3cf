"""Helpers shared by the native CPU library's tests (test_native_cpu.py,
test_native_cpu_isa.py, test_native_cpu_loading.py, test_native_cpu_optimizers.py,
test_cpu_tuning.py): the loaded library and its backend, the update kinds, state precisions
and hyperparameters under test, one parameter's tensors (``Slot``), gradients with
NaN/Inf/zero elements, one step as the optimizers drive it, and the exact-tier comparisons;
the checks that test_native_cpu.py runs once and test_native_cpu_isa.py reruns at each
instruction-set level (``check_*``); and ``fresh_python``, a subprocess of this checkout with
the native tuning variables unset.

Importing this module skips the importing test module when the library was not built at all
(``pip install -e .`` builds it) and fails when it exists but does not load.
"""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys

import pytest
import torch

from pagedopt.backends import cpu
from pagedopt.functional import dispatch, reference
from pagedopt.functional.items import UpdateItem
from pagedopt.functional.kinds import kind_for
from pagedopt.functional.qmap import decision_thresholds, dynamic_map
from pagedopt.functional.quantization import codes_for, dequantize, num_blocks
from pagedopt.functional.scalars import step_scalars


LIB = cpu.library()
if LIB is None and not cpu.default_library_path().exists():
    pytest.skip(
        f"native CPU library not built ({cpu.unavailable_reason()}); build it with `pip install -e .` "
        "or `python setup.py build_ext --inplace`",
        allow_module_level=True,
    )
if LIB is None:
    raise RuntimeError(f"the native CPU library exists but does not load: {cpu.unavailable_reason()}")

BACKEND = cpu.CpuBackend(LIB)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("adam", "adamw", "lamb", "ademamix", "momentum", "lars", "lion", "rmsprop", "adagrad")
MODES = ("32bit", "8bit-blockwise", "8bit-tensorwise")

HYPER = {
    "adam": dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    "adamw": dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    "lamb": dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01),
    "ademamix": dict(lr=3e-3, betas=(0.9, 0.999, 0.9999), eps=1e-8, weight_decay=0.1, alpha=5.0, t_alpha=10,
                     t_beta3=10),
    "momentum": dict(lr=1e-2, betas=(0.9, 0.1), weight_decay=0.1, nesterov=True),
    "lars": dict(lr=1e-2, betas=(0.9, 0.0), weight_decay=0.01),
    "lion": dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
    "rmsprop": dict(lr=1e-3, betas=(0.99, 0.0), eps=1e-8, weight_decay=0.1),
    "adagrad": dict(lr=1e-2, eps=1e-10, weight_decay=0.1, lr_decay=0.01),
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_on_one_thread():
    """Run on one intra-op thread unless a test sets more: the reference's small-tensor ops pay
    milliseconds of OpenMP wake-up per op on a busy 2-core machine. The kernels' own threading
    is exercised where a test sets the thread count (same results for any count).

    Each test module makes it its autouse fixture:
    ``one_torch_thread = pytest.fixture(autouse=True)(torch_on_one_thread)``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Slot:
    """One parameter's tensors for the functional API (one per backend under test)."""

    def __init__(self, kind, shape, dtype, mode, seed):
        gen = torch.Generator().manual_seed(seed)
        self.kind, self.mode = kind, mode
        numel = math.prod(shape)
        self.param = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
        quantized = mode != "32bit"
        self.block_wise = mode != "8bit-tensorwise"
        state_dtype = torch.uint8 if quantized else torch.float32
        moments = kind.state1_moments
        self.state1 = torch.zeros((moments, *shape) if moments > 1 else shape, dtype=state_dtype)
        self.state2 = torch.zeros(shape, dtype=state_dtype) if kind.num_states == 2 else None
        blocks = num_blocks(numel, self.block_wise)
        self.absmax1 = torch.zeros((moments, blocks) if moments > 1 else (blocks,)) if quantized else None
        self.absmax2 = torch.zeros(blocks) if quantized and kind.num_states == 2 else None

    def clone(self):
        other = object.__new__(Slot)
        other.__dict__ = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return other

    def item(self, grad, scalars, gnorm_scale=None, update_scale=None):
        return UpdateItem(self.param, grad, self.state1, self.state2, self.absmax1, self.absmax2, scalars,
                          block_wise=self.block_wise, gnorm_scale=gnorm_scale, update_scale=update_scale)

    def tensors(self):
        return {k: v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}


def gradient(shape, dtype, step, seed, special=True):
    """Gradients with NaN, +-Inf and exact zeros at fixed places (when the tensor is big enough)."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    g = torch.randn(shape, generator=gen) * 0.01
    flat = g.view(-1)
    if special and flat.numel() > 20:
        flat[3] = float("nan")
        flat[11] = float("inf") if step % 2 else -float("inf")
        flat[5:9] = 0.0
    return g.to(dtype)


def run_step(backend, kind, items):
    """One optimizer step through ``backend``, as Optimizer8bit.step drives it."""
    tensorwise = [it for it in items if it.quantized and not it.block_wise]
    if tensorwise:
        results = backend.prepare(kind, tensorwise, want_norms=False)
        for it, r in zip(tensorwise, results):
            it.new_absmax1, it.new_absmax2 = r.max1, r.max2
    backend.update(kind, items)
    return [(r.max1, r.max2) for r in results] if tensorwise else []


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str):
    """Exact tier: identical bits (NaN payloads included)."""
    assert a.shape == b.shape and a.dtype == b.dtype, what
    if a.dtype == torch.uint8:
        bad = int((a != b).sum())
        assert bad == 0, f"{what}: {bad} of {a.numel()} codes differ (rounding ties must not exist)"
        return
    view = {4: torch.int32, 2: torch.int16}[a.element_size()]
    bad = int((a.contiguous().view(view) != b.contiguous().view(view)).sum())
    if bad:
        diff = (a.double() - b.double()).abs().nan_to_num(0).max().item()
        pytest.fail(f"{what}: {bad} of {a.numel()} elements differ (max abs diff {diff:.3g})")


def assert_slots_equal(ref: Slot, nat: Slot, where: str):
    for name, t in ref.tensors().items():
        assert_bitwise_equal(t, nat.tensors()[name], f"{where}: {name}")


# ---- checks: test_native_cpu.py runs each once, test_native_cpu_isa.py at every level --------


def check_code_search_dense_sample_and_bad_range(signed):
    """A dense sample of all floats (every 8191st bit pattern, both signs, beyond [-1, 1],
    infinities and NaNs) - the quick version of test_native_cpu.py's exhaustive test."""
    first = ctypes.c_uint32()
    for lo, hi in ((0, 0x7FFFFFFF), (0x80000000, 0xFFFFFFFF)):
        for start in range(lo, hi, 1 << 24):
            end = min(start + 2047, hi)
            assert LIB.po_check_code_search(int(signed), start, end, ctypes.byref(first), 2) == 0
    assert LIB.po_check_code_search(int(signed), 0x7FFFFFFF, 0x80000000, ctypes.byref(first), 1) == -1


def _codes_native(x: torch.Tensor, signed: bool) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty(x.numel(), dtype=torch.uint8)
    LIB.check(LIB.po_quantize_normalized(int(signed), x.data_ptr(), out.data_ptr(), x.numel()), "quantize")
    return out


def check_code_search_matches_python_reference_at_thresholds(signed):
    """The kernels' search against quantization.codes_for (torch.searchsorted + rule) on every
    decision threshold and its float neighbours, the map values, specials and random values.
    Exact tier."""
    t = decision_thresholds(signed)
    bits = t.view(torch.int32)
    near = torch.cat([(bits + k).view(torch.float32) for k in range(-3, 4)])
    q = dynamic_map(signed)
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, -2.0, 1e-30, -1e-30, 1.4e-45, -1.4e-45, float("inf"),
                             -float("inf"), float("nan"), -float("nan"), 2.7e-7, -2.7e-7])
    rand = torch.rand(100_000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for x in (near, -near, q, -q, specials, rand, rand * 1e-4, rand * 1e-6):
        assert torch.equal(_codes_native(x, signed), codes_for(x, signed))


def check_dequantize_every_code(signed):
    """qmap[code] * absmax for all 256 codes and awkward scales. Exact tier."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(3)  # several chunks, odd tail below
    codes = torch.cat([codes, codes[:37]])
    for absmax in (0.0, 1.0, 0.3721, 3.4e38, 1e-40, 7e5):
        out = torch.empty(codes.numel())
        LIB.check(LIB.po_dequantize(int(signed), codes.data_ptr(), codes.numel(), absmax, out.data_ptr()), "dq")
        expected = dequantize(codes, torch.tensor([absmax]), signed=signed, block_wise=False)
        assert_bitwise_equal(out, expected, f"absmax={absmax}")


def check_tiny_and_huge_states_use_the_dividing_normalization(name):
    """Blocks whose absmax lies outside the reciprocal range [2^-126, 2^126] normalize by
    division (quantization.py): tiny gradients give subnormal states and block scales
    (whose float32 reciprocal would overflow), gradients near 1e19-1e30 give second moments
    near or at float32 overflow (v = inf: absmax inf, inf / inf = NaN -> code 255). Normal
    blocks sit next to them. Exact tier against the reference, block-wise and tensor-wise."""
    kind = kind_for(name)
    reached = [False, False]  # a subnormal block scale, an infinite one
    for mode in ("8bit-blockwise", "8bit-tensorwise"):
        ref = Slot(kind, (1280,), torch.float32, mode, 7)
        nat = ref.clone()
        for step in range(1, 12):
            g = torch.randn(1280, generator=torch.Generator().manual_seed(step)) * 2e-39
            g[::7] *= 1e-8  # subnormal gradients
            g[256:512] *= 1.5e18  # |g| ~ 3e-21: second moments (g * g) subnormal
            g[512:768] = torch.randn(256, generator=torch.Generator().manual_seed(99 + step)) * 1e-3  # normal block
            g[768:1024] = torch.randn(256, generator=torch.Generator().manual_seed(5 + step)) * 3e18  # v near 2^126
            if step == 11:
                # g * g overflows: v = inf, absmax inf. (Only on the last step: the next one would
                # dequantize the block's zero codes as 0 * inf = NaN, where NaN payloads differ.)
                g[1100] = 1e30
            s = step_scalars(kind, dict(HYPER[name], weight_decay=0.0), step)  # L2 decay would hide tiny g
            run_step(dispatch.REFERENCE, kind, [ref.item(g, s)])
            run_step(BACKEND, kind, [nat.item(g, s)])
            assert_slots_equal(ref, nat, f"{mode} step {step}")
        scales = torch.cat([ref.absmax1.reshape(-1)] + ([ref.absmax2] if ref.absmax2 is not None else []))
        reached[0] |= bool(((scales > 0) & (scales < 2.0**-126)).any())
        reached[1] |= bool(torch.isinf(scales).any())
    assert reached[0], "no block scale was subnormal"
    assert reached[1] or name == "momentum", "the overflow case was not reached"  # momentum: no g * g


def check_grad_norm_sq_matches_reference():
    """float64 sum of squares of the finite elements: fp32 (strided), fp16 with Inf, bf16 with
    NaN, empty, and float64 (handed to the reference). float64-order tier (rtol 1e-12)."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(300, 129, generator=gen).t()  # non-contiguous
    b = torch.randn(70_001, generator=gen).half()
    b[17] = float("inf")
    c = torch.randn(1000, generator=gen).bfloat16()
    c[::9] = float("nan")
    grads = [a, b, c, torch.zeros(0), torch.randn(33, generator=gen).double()]
    ours = BACKEND.grad_norm_sq(grads)
    theirs = reference.grad_norm_sq(grads)
    for x, y in zip(ours, theirs):
        assert x.dtype == torch.float64 and x.dim() == 0
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0)


# ---- subprocesses ----------------------------------------------------------------------------


def fresh_python(code: str, variable: str, value: str | None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter importing this checkout, with the environment
    ``variable`` set to ``value`` (None: unset) and the native tuning variables otherwise unset."""
    from pagedopt.backends import cpu_tuning

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in (cpu.ISA_ENV, cpu_tuning.CODE_SEARCH_ENV):
        env.pop(name, None)
    if value is not None:
        env[variable] = value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
