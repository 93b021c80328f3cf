"""The fast-numerics CUDA math (``native/cuda/fast_math.cuh``) against the float64 oracle, on
the CPU: the kernels' float32 operations are replayed in torch (tests/fast_numerics.py),
with the hardware approximations (``sqrt.approx.f32``, ``__fdividef``) perturbed anywhere
inside twice their documented error bound - randomly, and always high or always low.

Tolerance tiers of numerics="fast" (docs/numerics.md):

* **arithmetic decode** - every code's decoded value within 2 ulp of the map entry, and
  every decoded value quantizes back to its own code (so unchanged states never move).
* **fast-math** (one step, 32-bit state) - the largest and the mean absolute error of the
  parameters and states against the float64 oracle (same float32 inputs) at most 4x those
  of the strict kernels (pure float32 rounding: "what the same precision errs anyway").
  Measured worst: 2.5x (RMSprop parameters); most are below 1x, FMA rounds once less.
* **codes** (one step, 8-bit state) - equal to the strict kernels' codes except where the
  float64 value lies within a tie window (2^-18 relative) of the decision threshold between
  them; then the codes are neighbours. At most 0.1% of the codes differ.
* **drift** (200 steps, 8-bit block-wise state, no re-syncing) - fast vs strict parameters:
  mean absolute difference < 6e-5 and mean relative difference < 6e-4 (the bounds of
  bitsandbytes' 8-bit optimizer tests); and fast's mean error against the float64 32-bit
  trajectory at most 2% above strict's (the fast math adds nothing visible to the
  quantization error).
* **training** - AdamW8bit with fast kernels (emulated CUDA backend) vs torch.optim.AdamW in
  float32 on a small regression model (150 steps, loss down 10x): the fast 8-bit loss is
  never more than 10% above the float32 loss at a logged step (8-bit state itself moves
  the curve by up to 30% either way on this model), and within 1% of the strict 8-bit
  curve (what the fast math adds).

tests/test_cuda_fast.py holds the same tiers for the real kernels on a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fast_numerics as F
from cuda_helpers import HP, KINDS, make_item
from pagedopt.functional import reference
from pagedopt.functional.qmap import decision_thresholds, dynamic_map
from pagedopt.functional.scalars import step_scalars

APPROX = [F.Approx(mode, 2.0, seed=11) for mode in ("random", "high", "low")]


def _fresh(kind_name, n, dtype, mode, **kw):
    return make_item(kind_name, n, dtype, mode, seed=1, scales=True, **kw)


# --- arithmetic decode ------------------------------------------------------------------------


@pytest.mark.parametrize("signed", (True, False))
def test_arithmetic_decode_is_within_2_ulp_and_keeps_every_code(signed):
    codes = torch.arange(256)
    decoded, table = F.fast_code_values(codes, signed), dynamic_map(signed)
    assert torch.equal(torch.sign(decoded), torch.sign(table))
    ulps = (decoded.view(torch.int32) - table.view(torch.int32)).abs()
    assert int(ulps.max()) <= 2
    assert int((ulps > 0).sum()) > 0  # not the table itself: the decode is really exercised
    assert torch.equal(torch.searchsorted(decision_thresholds(signed), decoded), codes)


# --- one step, 32-bit state: fast-math tier ---------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=("f32", "bf16", "f16"))
@pytest.mark.parametrize("kind_name", KINDS)
def test_one_step_within_fast_math_tier(kind_name, dtype):
    kind, item = _fresh(kind_name, 20_000, dtype, "state32")
    p64, s64, _, keep = F.float64_step(kind, item)
    strict = _fresh(kind_name, 20_000, dtype, "state32")[1]
    reference.update(kind, [strict])
    for approx in APPROX:
        fast = _fresh(kind_name, 20_000, dtype, "state32")[1]
        F.update(kind, [fast], approx)
        F.assert_fast_math_tier(kind, fast, strict, p64, s64, approx.mode)
        # skipped elements (NaN/Inf gradients) keep their exact bits
        assert torch.equal(fast.param.reshape(-1)[~keep], _fresh(kind_name, 20_000, dtype, "state32")[1].param[~keep])


def test_fast_math_tier_catches_a_wrong_formula():
    """The tier is tight enough to fail: a replay that forgets Adam's first-moment bias
    correction (a plausible kernel bug) is far outside it."""
    kind, item = _fresh("adamw", 20_000, torch.float32, "state32")
    p64, s64, _, _ = F.float64_step(kind, item)
    strict = _fresh("adamw", 20_000, torch.float32, "state32")[1]
    reference.update(kind, [strict])
    base = F.step_errors(kind, strict, p64, s64)[-1]
    wrong = _fresh("adamw", 20_000, torch.float32, "state32")[1]
    wrong.scalars = dataclasses.replace(wrong.scalars, inv_bias_correction1=1.0)
    F.update(kind, [wrong])
    assert float(F.step_errors(kind, wrong, p64, s64)[-1].max()) > 100 * F.FAST_MATH_RATIO * float(base.max())


# --- one step, 8-bit state: codes tier ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ("block8", "tensor8"))
@pytest.mark.parametrize("kind_name", KINDS)
def test_codes_equal_except_ties(kind_name, mode):
    kind, item = _fresh(kind_name, 70_001, torch.float32, mode)
    _, s64, _, _ = F.float64_step(kind, item)
    strict = _fresh(kind_name, 70_001, torch.float32, mode)[1]
    fast = _fresh(kind_name, 70_001, torch.float32, mode)[1]
    if mode == "tensor8":  # requantize with the maxima of the prepare pass, like the kernels
        for it, run in ((strict, reference), (fast, F)):
            r = run.prepare(kind, [it], False)[0]
            it.new_absmax1, it.new_absmax2 = r.max1, r.max2
    reference.update(kind, [strict])
    F.update(kind, [fast], APPROX[0])
    F.assert_codes_tier(kind, fast, strict, s64, f"{kind_name}/{mode}")


@pytest.mark.parametrize("mode", ("state32", "block8", "tensor8"))
@pytest.mark.parametrize("kind_name,dtype", [
    ("adamw", torch.bfloat16), ("lion", torch.float32),
    pytest.param("ademamix", torch.float16, marks=pytest.mark.slow),
    pytest.param("rmsprop", torch.float32, marks=pytest.mark.slow),
])
def test_tiers_through_the_emulated_cuda_backend(kind_name, dtype, mode):
    """The GPU tier check (tests/test_cuda_fast.py) on the CUDA backend's host code with the
    fast kernels emulated on the CPU (approximations perturbed), odd sizes down to 1."""
    from cuda_emulation import EmulatedLauncher
    from pagedopt.backends import cuda as cuda_backend

    launcher = EmulatedLauncher(approx=F.Approx("random", 2.0, seed=5))
    backend = cuda_backend.CudaBackend(launcher_factory=lambda device: launcher)
    F.check_backend_tiers(backend, torch.device("cpu"), kind_name, dtype, mode)
    assert 1 in launcher.numerics_launched


# --- drift over 200 steps --------------------------------------------------------------------------------


def _drift(kind_name: str, n: int = 1031, steps: int = 200):
    kind, base = make_item(kind_name, n, torch.float32, "block8", seed=5, step=1, specials=False)
    copies = {}
    for tag in ("fast", "strict"):
        copies[tag] = dataclasses.replace(base, **{
            f: getattr(base, f).clone() for f in ("param", "state1", "state2", "absmax1", "absmax2")
            if getattr(base, f) is not None
        })
    p64, s64 = base.param.double().clone(), [x.double() for x in F.float_states(kind, base)]
    approx = F.Approx("random", 2.0, seed=7)
    for t in range(1, steps + 1):
        s = step_scalars(kind, HP[kind_name], t)
        g = torch.randn(n, generator=torch.Generator().manual_seed(1000 + t)) * 0.01
        for tag in copies:
            copies[tag] = dataclasses.replace(copies[tag], grad=g, scalars=s)
        F.update(kind, [copies["fast"]], approx)
        reference.update(kind, [copies["strict"]])
        g64 = g.double() + (s.weight_decay * p64 if s.weight_decay else 0.0)
        s64, d = F._f64_algorithm(kind.algorithm, g64, s64, s)
        p64 = p64 * s.decay_factor - s.lr * d
    fast, strict = copies["fast"].param.double(), copies["strict"].param.double()
    diff = (fast - strict).abs()
    return diff.mean(), (diff / (strict.abs() + 1e-9)).mean(), (fast - p64).abs().mean(), (strict - p64).abs().mean()


@pytest.mark.parametrize("kind_name", [
    k if k == "adamw" else pytest.param(k, marks=pytest.mark.slow) for k in KINDS
])
def test_drift_over_200_steps_without_resync(kind_name):
    mean_abs, mean_rel, fast_err, strict_err = _drift(kind_name)
    assert mean_abs < 6e-5 and mean_rel < 6e-4, (float(mean_abs), float(mean_rel))
    assert fast_err <= 1.02 * strict_err, (float(fast_err), float(strict_err))


# --- training parity --------------------------------------------------------------------------------------


def test_training_parity_fast_8bit_vs_fp32_adamw(monkeypatch):
    """AdamW8bit through the CUDA backend's host code with the fast kernels (emulated on the
    CPU, approximations perturbed) against torch.optim.AdamW in float32 and against
    AdamW8bit on the strict CPU path, on a small regression model."""
    import pagedopt
    from cuda_emulation import EmulatedLauncher
    from pagedopt.backends import cuda as cuda_backend
    from pagedopt.functional import dispatch

    launcher = EmulatedLauncher(approx=F.Approx("random", 2.0, seed=3))
    backend = cuda_backend.CudaBackend(launcher_factory=lambda device: launcher)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=gen)
    w_true = torch.randn(32, 1, generator=gen)
    y = torch.tanh(x @ w_true) + 0.01 * torch.randn(512, 1, generator=gen)

    def model_and_params():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        return model, list(model.parameters())

    curves = {}
    for tag in ("fp32", "strict8", "fast8"):
        model, params = model_and_params()
        if tag == "fp32":
            opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
        else:
            opt = pagedopt.AdamW8bit(params, lr=3e-3, weight_decay=0.01, min_8bit_size=1)
            dispatch.reset_backends()
            if tag == "fast8":
                monkeypatch.setitem(dispatch._resolved, "cpu", backend)
        losses = []
        for _ in range(150):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        curves[tag] = torch.tensor(losses)
        dispatch.reset_backends()
    assert any(n == 1 for n in launcher.numerics_launched)  # the fast kernels ran
    fp32, strict, fast = curves["fp32"], curves["strict8"], curves["fast8"]
    assert float(fp32[-1]) < 0.1 * float(fp32[0]) and float(fast[-1]) < 0.1 * float(fast[0])
    logged = torch.arange(20, 150, 10)
    # parity: 8-bit fast AdamW never trains more than 10% worse than float32 AdamW
    assert bool((fast[logged] <= 1.1 * fp32[logged]).all()), (fast[logged], fp32[logged])
    # the fast math itself: within 1% of the strict 8-bit curve at every logged step
    rel = ((fast[logged] - strict[logged]).abs() / strict[logged]).max()
    assert float(rel) < 0.01, f"fast and strict 8-bit loss curves differ by {float(rel):.4f}"
