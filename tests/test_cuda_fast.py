"""The fast-numerics CUDA kernels on a GPU (``pytest -m cuda``), held to the tolerance tiers
of tests/test_fast_numerics.py (which checks the same math replayed on the CPU):

* **fast-math** (32-bit state): largest and mean error against the float64 oracle at most
  4x the strict kernels' (measured on the CPU replay: 2.5x worst).
* **codes** (8-bit state): equal to the strict codes except neighbours within a 2^-18 tie
  window of their threshold, at most 0.1% of them.
* **replay**: the GPU's fast results against the CPU replay with exact approximations - the
  replay is the specification of the fast kernels, so they differ only by what
  ``sqrt.approx``/``__fdividef`` err (fast-math tier against the replay's errors).
* **drift**: 200 steps without re-syncing, fast GPU vs strict CPU: mean absolute < 6e-5,
  mean relative < 6e-4.

The strict kernels stay bit-exact against the CPU in tests/test_cuda.py. Every test here
needs an NVIDIA GPU; each skips with the reason otherwise.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fast_numerics as F
from cuda_helpers import DTYPES, HP, KINDS, MODES, SIZES, make_item, run_prepare_and_update, to_device
from pagedopt.functional import reference
from pagedopt.functional.kinds import kind_for
from pagedopt.functional.scalars import step_scalars
from cuda_helpers import SKIP_REASON

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]


@pytest.fixture(scope="module")
def backend():
    from pagedopt.backends.cuda import CudaBackend

    return CudaBackend()


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda", torch.cuda.current_device())


def _items(kind_name, dtype, mode, numerics):
    return [make_item(kind_name, n, dtype, mode, seed=n, scales=i % 2 == 1, numerics=numerics)[1]
            for i, n in enumerate(SIZES)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kind_name", KINDS)
def test_fast_kernels_within_tiers(backend, device, kind_name, dtype, mode):
    """One multi-tensor launch over odd sizes (NaN/Inf/zero gradients, scales on every other
    tensor): fast GPU results against the float64 oracle (fast-math tier; 8-bit: codes tier)."""
    F.check_backend_tiers(backend, device, kind_name, dtype, mode)


@pytest.mark.parametrize("kind_name", KINDS)
def test_fast_kernels_match_the_cpu_replay(backend, device, kind_name):
    """Tier replay: 32-bit state, bf16 parameters, every algorithm."""
    kind = kind_for(kind_name)
    cpu = _items(kind_name, torch.bfloat16, "state32", "fast")
    oracles = [F.float64_step(kind, it) for it in cpu]
    gpu = [to_device(it, device) for it in cpu]
    F.update(kind, cpu)  # exact approximations: the replay without hardware error
    backend.update(kind, gpu)
    for i, (g, c, (p64, s64, d64, _)) in enumerate(zip(gpu, cpu, oracles)):
        F.assert_fast_math_tier(kind, g, c, p64, s64, f"{kind_name} n={SIZES[i]}", d64)


@pytest.mark.parametrize("mode", ("block8", "tensor8"))
def test_fast_drift_over_200_steps_on_the_gpu(backend, device, mode):
    kind = kind_for("adamw")
    _, c = make_item("adamw", 70_001, torch.float32, mode, seed=3, step=1, specials=False, numerics="strict")
    g = dataclasses.replace(to_device(c, device), numerics="fast")
    for step in range(1, 201):
        scalars = step_scalars(kind, HP["adamw"], step)
        grad = torch.randn(70_001, generator=torch.Generator().manual_seed(step)) * 0.01
        c = dataclasses.replace(c, scalars=scalars, grad=grad, new_absmax1=None, new_absmax2=None)
        g = dataclasses.replace(g, scalars=scalars, grad=grad.to(device), new_absmax1=None, new_absmax2=None)
        (c,), (g,) = run_prepare_and_update(backend, kind, [c], [g], want_norms=False)
    fast, strict = g.param.double().cpu(), c.param.double()
    diff = (fast - strict).abs()
    assert float(diff.mean()) < 6e-5
    assert float((diff / (strict.abs() + 1e-9)).mean()) < 6e-4


def test_strict_and_fast_items_in_one_call(backend, device):
    """One update call with both modes: strict items bit-exact against the CPU reference."""
    from cuda_helpers import assert_items_equal

    kind = kind_for("adamw")
    cpu = [make_item("adamw", n, torch.bfloat16, "block8", seed=n, numerics=("strict", "fast")[i % 2])[1]
           for i, n in enumerate((4097, 300, 70_001, 1))]
    gpu = [to_device(it, device) for it in cpu]
    strict_cpu = [it for it in cpu if it.numerics == "strict"]
    reference.update(kind, strict_cpu)
    backend.update(kind, gpu)
    for g, c in zip([it for it in gpu if it.numerics == "strict"], strict_cpu):
        assert_items_equal(g, c, "strict item next to fast ones")
