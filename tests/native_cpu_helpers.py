"""Helpers shared by the native CPU library's tests (test_native_cpu.py,
test_native_cpu_loading.py, test_native_cpu_optimizers.py; test_native_cpu_isa.py reaches them
through test_native_cpu): the loaded library and its backend, the update kinds, state
precisions and hyperparameters under test, one parameter's tensors (``Slot``), gradients with
NaN/Inf/zero elements, one step as the optimizers drive it, and the exact-tier comparisons.

Importing this module skips the importing test module when the library was not built at all
(``pip install -e .`` builds it) and fails when it exists but does not load.
"""

from __future__ import annotations

import math

import pytest
import torch

from pagedopt.backends import cpu
from pagedopt.functional.items import UpdateItem
from pagedopt.functional.quantization import num_blocks


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
