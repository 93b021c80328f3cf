"""The optimizer classes on the native CPU path against the same classes forced onto the
pure-torch reference (``PAGEDOPT_BACKEND=reference``): odd shapes, a strided parameter, a
parameter frozen on some steps, empty and one-element parameters, NaN and zero gradient
elements, and the norm-scaled steps (percentile clipping, trust ratios).

Tolerance tiers (DESIGN.md "Numerics contract"; the kernels' own tests are in test_native_cpu.py):

* **exact** - the kernels perform the reference's float32 operations in the same order
  (``native/include/pagedopt``), so parameters, float32 states, 8-bit codes and absmax must be
  bit-identical to the reference, over many steps without re-syncing (no drift allowed).
  Quantization codes would be allowed to differ on counted rounding ties, but pagedopt defines
  the code through float32 decision thresholds in both places, so there are none: we assert 0.
* **fp32 rounding** - optimizer steps whose scales come from float64 norms (percentile clipping,
  trust ratio) can see a scale one float32 ulp apart; those compare within a few ulps.

The library is built by ``pip install -e .`` (``setup.py``); these tests skip only when it was
not built at all, and fail when it exists but does not load (the import of native_cpu_helpers
does both).
"""

from __future__ import annotations

import pytest
import torch

import pagedopt
from pagedopt.functional import dispatch

from native_cpu_helpers import assert_bitwise_equal, torch_on_one_thread

one_torch_thread = pytest.fixture(autouse=True)(torch_on_one_thread)


def _model_params(dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(129, 33), (4097,), (64, 16), (1,), (0,), (8, 8)]
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes]
    # a non-contiguous parameter (a transposed view)
    params.append(torch.nn.Parameter((torch.randn(40, 70, generator=gen) * 0.1).to(dtype).t()))
    return params


def _run_optimizer(cls, kwargs, dtype, steps, backend_name, monkeypatch):
    if backend_name == "reference":
        monkeypatch.setenv(dispatch.FORCE_ENV, "reference")
    else:
        monkeypatch.delenv(dispatch.FORCE_ENV, raising=False)
    dispatch.reset_backends()
    assert dispatch.backend_for(torch.device("cpu")).name == backend_name
    params = _model_params(dtype)
    opt = cls(params, **kwargs)
    for step in range(1, steps + 1):
        gen = torch.Generator().manual_seed(step)
        for i, p in enumerate(params):
            if i == 2 and step % 3 == 0:
                p.grad = None  # frozen this step
                continue
            g = (torch.randn(p.shape, generator=gen) * 0.01).to(dtype)
            if g.numel() > 50:
                g.view(-1)[7] = float("nan")
                g.view(-1)[9] = 0.0
            p.grad = g
        opt.step()
    monkeypatch.delenv(dispatch.FORCE_ENV, raising=False)
    dispatch.reset_backends()
    return params, opt


def _assert_optimizers_equal(ref, nat, exact=True):
    (rp, ro), (np_, no) = ref, nat
    for a, b in zip(rp, np_):
        if exact:
            assert_bitwise_equal(a.detach(), b.detach(), "param")
        else:
            torch.testing.assert_close(b.detach(), a.detach(), rtol=4e-6, atol=1e-7)
    for a, b in zip(rp, np_):
        sa, sb = ro.state[a], no.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            if not isinstance(sa[key], torch.Tensor):
                assert sa[key] == sb[key]
                continue
            if exact:
                assert_bitwise_equal(sa[key], sb[key], key)
            elif sa[key].dtype == torch.uint8:
                frac = (sa[key].int() - sb[key].int()).abs().gt(0).float().mean().item() if sa[key].numel() else 0
                assert frac <= 0.005 and (sa[key].int() - sb[key].int()).abs().max() <= 1, key
            else:
                torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-9)


OPTIMIZER_CASES = [
    ("AdamW8bit", {"lr": 1e-2, "min_8bit_size": 64}),
    ("Adam8bit", {"lr": 1e-2, "weight_decay": 0.1, "min_8bit_size": 64, "block_wise": False}),
    ("AdEMAMix8bit", {"lr": 1e-2, "min_8bit_size": 64, "t_alpha": 5, "t_beta3": 5, "skip_zeros": True}),
    ("Lion8bit", {"lr": 1e-3, "weight_decay": 0.1, "min_8bit_size": 64}),
    ("SGD8bit", {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "min_8bit_size": 64}),
    ("RMSprop8bit", {"lr": 1e-3, "weight_decay": 0.1, "min_8bit_size": 64, "block_wise": False}),
    ("Adagrad8bit", {"lr": 1e-2, "min_8bit_size": 64}),
    ("AdamW32bit", {"lr": 1e-2}),
    ("Lion32bit", {"lr": 1e-3}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,kwargs", OPTIMIZER_CASES, ids=[c[0] for c in OPTIMIZER_CASES])
def test_optimizer_classes_native_equals_reference(name, kwargs, dtype, monkeypatch):
    """The optimizer classes (odd shapes, a strided parameter, a frozen-some-steps parameter,
    empty and one-element parameters, NaN and zero gradient elements) stepped 20 times on the
    native and on the forced reference path. Exact tier."""
    cls = pagedopt.optim.get_optimizer_class(name)
    ref = _run_optimizer(cls, kwargs, dtype, 20, "reference", monkeypatch)
    nat = _run_optimizer(cls, kwargs, dtype, 20, "cpu", monkeypatch)
    _assert_optimizers_equal(ref, nat, exact=True)


NORM_CASES = [
    ("AdamW8bit", {"lr": 1e-2, "min_8bit_size": 64, "percentile_clipping": 5}),
    ("LAMB8bit", {"lr": 1e-2, "min_8bit_size": 64}),
    ("LARS8bit", {"lr": 1e-2, "momentum": 0.9, "min_8bit_size": 64, "block_wise": False}),
    ("LAMB32bit", {"lr": 1e-2, "percentile_clipping": 10}),
]


@pytest.mark.parametrize("name,kwargs", NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_optimizer_classes_with_norm_scales(name, kwargs, monkeypatch):
    """Percentile clipping and trust ratios scale the step by float64 norms; the kernels sum in
    another order, which may move a float32 scale by an ulp. fp32-rounding tier: parameters
    within a few ulps, at most 0.5% of codes one step apart."""
    cls = pagedopt.optim.get_optimizer_class(name)
    ref = _run_optimizer(cls, kwargs, torch.float32, 15, "reference", monkeypatch)
    nat = _run_optimizer(cls, kwargs, torch.float32, 15, "cpu", monkeypatch)
    _assert_optimizers_equal(ref, nat, exact=False)
