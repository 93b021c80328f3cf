"""A CPU replay of the fast-numerics CUDA kernels (``native/cuda/fast_math.cuh``) in torch.

The fast kernels write every multiply-add as an explicit fused multiply-add and use two
hardware approximations, so their float32 results can be replayed here operation by
operation:

* ``fma(a, b, c)``: the exact product ``a * b`` (float32 products fit float64 exactly) plus
  ``c`` in float64, rounded to float32. That is the correctly rounded fma except in the rare
  double-rounding case, far inside every tolerance the tests use.
* ``sqrt.approx.f32`` and ``__fdividef`` are replayed as the correctly rounded result times
  ``1 + e`` with ``|e|`` up to their documented error bound (PTX ISA: ``sqrt.approx.f32``
  relative error at most 2^-23; CUDA C++ Programming Guide: ``__fdividef`` 2 ulp), ``e``
  drawn by an :class:`Approx` policy: exact, random in the bound, or always at the top or the
  bottom of it (the worst cases for a bias that accumulates over many steps).
* dequantization decodes the map arithmetically (:func:`fast_code_values`), exactly as the
  kernel does.

Everything else (skip rule, block scale, normalization, code search) is the reference's,
which the fast kernels share. :func:`update` is the fast counterpart of
``pagedopt.functional.reference.update``; the CPU emulator of the CUDA launcher runs it for
fast kernels, and tests/test_fast_numerics.py checks it against the float64 reference.

Example:
    >>> import torch
    >>> from pagedopt.functional.qmap import dynamic_map
    >>> codes = torch.arange(256)
    >>> bool((fast_code_values(codes, True) - dynamic_map(True)).abs().max() < 1e-6)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pagedopt.functional import reference
from pagedopt.functional.items import PrepareResult, UpdateItem
from pagedopt.functional.kinds import Algorithm, UpdateKind
from pagedopt.functional.quantization import BLOCK_SIZE
from pagedopt.functional.scalars import StepScalars

Tensor = torch.Tensor

SQRT_REL_ERROR = 2.0**-23  # sqrt.approx.f32 (PTX ISA)
DIV_ULPS = 2.0  # __fdividef for 2^-126 <= |d| <= 2^126 (CUDA C++ Programming Guide)
_ULP_REL = 2.0**-23  # one ulp relative to the value, at most


@dataclass(frozen=True)
class Approx:
    """How the approximate operations err: ``mode`` is "exact", "random" (spread over the
    bound), "high" (always +bound) or "low" (always -bound); ``scale`` multiplies the bound
    (tests use 2 for a safety margin). Like the hardware, the error is a deterministic
    function of the operation's value (a hash of its exact result's bits and ``seed``), so
    a prepare pass and the update that follows it agree, as they do on a GPU."""

    mode: str = "random"
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "random", "high", "low"):
            raise ValueError(f"mode={self.mode!r} is not 'exact', 'random', 'high' or 'low'")

    def perturb(self, exact: Tensor, bound: float) -> Tensor:
        """float32 ``exact * (1 + e)``, ``|e| <= scale * bound``."""
        if self.mode == "exact":
            return exact
        if self.mode == "random":
            bits = exact.contiguous().view(torch.int32).long() & 0xFFFFFFFF
            mixed = ((bits ^ (self.seed * 0x9E3779B1)) * 2654435761) & 0xFFFFFFFF
            e = (mixed.double() / 2.0**31 - 1.0) * bound * self.scale
        else:
            e = torch.full(exact.shape, (bound if self.mode == "high" else -bound) * self.scale, dtype=torch.float64)
        return (exact.double() * (1.0 + e)).float()


EXACT = Approx("exact")


def _f(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.float32)


def fma(a, b, c) -> Tensor:
    """float32 fused multiply-add (see the module docstring)."""
    return (_f(a).double() * _f(b).double() + _f(c).double()).float()


def fast_sqrt(x: Tensor, approx: Approx) -> Tensor:
    return approx.perturb(torch.sqrt(x.double()).float(), SQRT_REL_ERROR)


def fast_div(a: Tensor, b: Tensor, approx: Approx) -> Tensor:
    return approx.perturb((a.double() / b.double()).float(), DIV_ULPS * _ULP_REL)


def fast_ema(beta: float, old: Tensor, one_minus_beta: float, value: Tensor) -> Tensor:
    return fma(beta, old, _f(one_minus_beta) * value)


def _denominator(v: Tensor, s: StepScalars, approx: Approx) -> Tensor:
    return fma(fast_sqrt(v, approx), s.inv_bias_correction2_sqrt, s.eps)


def _adam(g, states, s, approx):
    m, v = states
    m = fast_ema(s.beta1, m, s.one_minus_beta1, g)
    v = fma(s.beta2, v, (_f(s.one_minus_beta2) * g) * g)
    return [m, v], fast_div(m * _f(s.inv_bias_correction1), _denominator(v, s, approx), approx)


def _ademamix(g, states, s, approx):
    m1, m2, v = states
    m1 = fast_ema(s.beta1, m1, s.one_minus_beta1, g)
    m2 = fast_ema(s.beta3, m2, s.one_minus_beta3, g)
    v = fma(s.beta2, v, (_f(s.one_minus_beta2) * g) * g)
    numerator = fma(s.alpha, m2, m1 * _f(s.inv_bias_correction1))
    return [m1, m2, v], fast_div(numerator, _denominator(v, s, approx), approx)


def _momentum(g, states, s, approx):
    (m,) = states
    m = g.clone() if s.first_step else fma(s.beta1, m, _f(s.dampening_factor) * g)
    return [m], (fma(s.beta1, m, g) if s.nesterov else m)


def _lion(g, states, s, approx):
    (m,) = states
    d = torch.sign(fast_ema(s.beta1, m, s.one_minus_beta1, g))
    return [fast_ema(s.beta2, m, s.one_minus_beta2, g)], d


def _rmsprop(g, states, s, approx):
    (v,) = states
    v = fma(s.beta1, v, (_f(s.one_minus_beta1) * g) * g)
    return [v], fast_div(g, fast_sqrt(v, approx) + _f(s.eps), approx)


def _adagrad(g, states, s, approx):
    (v,) = states
    v = fma(g, g, v)
    return [v], fast_div(g, fast_sqrt(v, approx) + _f(s.eps), approx)


ALGORITHMS = {
    Algorithm.ADAM: _adam, Algorithm.ADEMAMIX: _ademamix, Algorithm.MOMENTUM: _momentum,
    Algorithm.LION: _lion, Algorithm.RMSPROP: _rmsprop, Algorithm.ADAGRAD: _adagrad,
}

# --- arithmetic dequantization (fast_code_value) -------------------------------------------------

_POW10 = torch.tensor([10.0 ** (i - 6) for i in range(7)], dtype=torch.float32)


def fast_code_values(codes: Tensor, signed: bool) -> Tensor:
    """The map value of every code as ``fast_code_value`` computes it (float32)."""
    c = codes.long()
    negative = (c < 127) if signed else torch.zeros_like(c, dtype=torch.bool)
    t = torch.where(negative, 127 - c, c - 127) if signed else c + 1
    t = t.clamp_min(1)
    e = torch.floor(torch.log2(t.double())).long()  # exact for integers below 2^52
    level = e if signed else e - 1
    k = t - (1 << e)
    inv_n = torch.pow(2.0, -e.double()).float()
    mid = fma(torch.tensor(0.45, dtype=torch.float32) * (2 * k + 1).float(), inv_n, 0.1)
    value = mid * _POW10[level.clamp(0, 6)]
    value = torch.where(c == (127 if signed else 0), 0.0, value)
    value = torch.where(c == 255, 1.0, value)
    return torch.where(negative, -value, value)


def fast_dequantize(codes: Tensor, absmax: Tensor, signed: bool, block_wise: bool) -> Tensor:
    values = fast_code_values(codes.reshape(-1), signed)
    n = values.numel()
    scale = absmax.float().repeat_interleave(BLOCK_SIZE)[:n] if block_wise else absmax.float().reshape(1).expand(n)
    return values * scale


def _load_states(kind: UpdateKind, item: UpdateItem) -> list[Tensor]:
    out: list[Tensor] = []
    for index, (tensor, absmax) in enumerate(((item.state1, item.absmax1), (item.state2, item.absmax2))[: kind.num_states]):
        count = kind.state1_moments if index == 0 else 1
        codes = reference._moments(tensor, count)
        if not item.quantized:
            out += [c.float() for c in codes]
            continue
        scales = absmax.reshape(count, -1)
        out += [fast_dequantize(c, a, kind.state_signed[index], item.block_wise) for c, a in zip(codes, scales)]
    return out


# --- one item ---------------------------------------------------------------------------------------


def _compute(kind: UpdateKind, item: UpdateItem, approx: Approx):
    s = item.scalars
    p = item.param.detach().reshape(-1).float()
    g_raw = item.grad.detach().reshape(-1).float()
    keep = torch.isfinite(g_raw)
    if s.skip_zeros:
        keep &= g_raw != 0
    g = torch.where(keep, g_raw, 0.0) * reference._scale_or_one(item.gnorm_scale, p.device)
    if s.weight_decay != 0.0:
        g = fma(s.weight_decay, p, g)
    old = _load_states(kind, item)
    new, d = ALGORITHMS[kind.algorithm](g, old, s, approx)
    new = [torch.where(keep, n, o) for n, o in zip(new, old)]
    return p, new, torch.where(keep, d, 0.0), keep


def update_one(kind: UpdateKind, item: UpdateItem, approx: Approx = EXACT) -> None:
    p, new_states, d, keep = _compute(kind, item, approx)
    s = item.scalars
    scaled = d * reference._scale_or_one(item.update_scale, p.device)
    p_new = torch.where(keep, fma(-s.lr, scaled, p * _f(s.decay_factor)), p)
    reference._store_states(kind, item, new_states)
    item.param.detach().copy_(p_new.reshape(item.param.shape))


def prepare_one(kind: UpdateKind, item: UpdateItem, want_norms: bool, approx: Approx = EXACT) -> PrepareResult:
    p, new_states, d, _ = _compute(kind, item, approx)
    result = PrepareResult()
    if item.quantized and not item.block_wise:
        k1 = kind.state1_moments
        result.max1 = reference._new_absmax(new_states[:k1], None, kind.state_signed[0], False).reshape(k1)
        if kind.num_states == 2:
            result.max2 = reference._new_absmax(new_states[k1:], None, kind.state_signed[1], False).reshape(1)
    if want_norms:
        result.unorm_sq = d.double().square().sum()
        result.pnorm_sq = p.double().square().sum()
    return result


def prepare(kind: UpdateKind, items: Sequence[UpdateItem], want_norms: bool, approx: Approx = EXACT) -> list[PrepareResult]:
    return [prepare_one(kind, item, want_norms, approx) for item in items]


@torch.no_grad()
def update(kind: UpdateKind, items: Sequence[UpdateItem], approx: Approx = EXACT) -> None:
    for item in items:
        update_one(kind, item, approx)


# --- the float64 oracle of one step (same inputs, exact arithmetic up to float64) --------------------


def _f64_algorithm(algo: Algorithm, g: Tensor, states: list[Tensor], s: StepScalars) -> tuple[list[Tensor], Tensor]:
    if algo == Algorithm.ADAM:
        m, v = states
        m, v = s.beta1 * m + s.one_minus_beta1 * g, s.beta2 * v + s.one_minus_beta2 * g * g
        return [m, v], m * s.inv_bias_correction1 / (v.sqrt() * s.inv_bias_correction2_sqrt + s.eps)
    if algo == Algorithm.ADEMAMIX:
        m1, m2, v = states
        m1, m2 = s.beta1 * m1 + s.one_minus_beta1 * g, s.beta3 * m2 + s.one_minus_beta3 * g
        v = s.beta2 * v + s.one_minus_beta2 * g * g
        return [m1, m2, v], (m1 * s.inv_bias_correction1 + s.alpha * m2) / (v.sqrt() * s.inv_bias_correction2_sqrt + s.eps)
    if algo == Algorithm.MOMENTUM:
        (m,) = states
        m = g.clone() if s.first_step else s.beta1 * m + s.dampening_factor * g
        return [m], (g + s.beta1 * m if s.nesterov else m)
    if algo == Algorithm.LION:
        (m,) = states
        return [s.beta2 * m + s.one_minus_beta2 * g], torch.sign(s.beta1 * m + s.one_minus_beta1 * g)
    (v,) = states
    v = s.beta1 * v + s.one_minus_beta1 * g * g if algo == Algorithm.RMSPROP else v + g * g
    return [v], g / (v.sqrt() + s.eps)


def float64_step(kind: UpdateKind, item: UpdateItem) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """The step of ``item`` in float64 from its stored (float32 / dequantized) inputs:
    (new parameter before rounding to its dtype, new states, direction, keep mask)."""
    s = item.scalars
    p = item.param.detach().reshape(-1).double()
    g_raw = item.grad.detach().reshape(-1).double()
    keep = torch.isfinite(g_raw)
    if s.skip_zeros:
        keep &= g_raw != 0
    g = torch.where(keep, g_raw, 0.0) * reference._scale_or_one(item.gnorm_scale, p.device).double()
    if s.weight_decay != 0.0:
        g = g + s.weight_decay * p
    old = [x.double() for x in reference._load_states(kind, item)]
    new, d = _f64_algorithm(kind.algorithm, g, old, s)
    new = [torch.where(keep, n, o) for n, o in zip(new, old)]
    d = torch.where(keep, d, 0.0)
    scaled = d * reference._scale_or_one(item.update_scale, p.device).double()
    p_new = torch.where(keep, p * s.decay_factor - s.lr * scaled, p)
    return p_new, new, d, keep


def float_states(kind: UpdateKind, item: UpdateItem) -> list[Tensor]:
    """The item's states as float32 values (8-bit: dequantized with the exact map)."""
    return reference._load_states(kind, item)


# --- the tolerance tiers (tests/test_fast_numerics.py states them) -----------------------------------

FAST_MATH_RATIO = 4.0
TIE_WINDOW = 2.0**-18
MAX_CODE_MISMATCH = 1e-3


def step_errors(kind: UpdateKind, item: UpdateItem, p64: Tensor, s64: list[Tensor]) -> list[Tensor]:
    """|state - oracle| per state value, then |param - oracle| (float64, on the CPU)."""
    states = float_states(kind, item)
    errs = [(a.double().cpu() - b).abs() for a, b in zip(states, s64)]
    errs.append((item.param.detach().reshape(-1).double().cpu() - p64).abs())
    return errs


def assert_fast_math_tier(kind: UpdateKind, fast: UpdateItem, strict: UpdateItem, p64: Tensor, s64: list[Tensor],
                          label: str = "", d64: Tensor | None = None) -> None:
    """Largest and mean error of ``fast`` against the float64 oracle at most FAST_MATH_RATIO
    times those of ``strict`` (the same step with the strict, float32-rounding-only math),
    plus a floor for tensors too small for that statistic (a strict error may be 0 there):
    one float32 ulp at the tensor's scale, and for parameters 8 ulp (2^-20, the approximate
    sqrt and division at twice their bounds) of the largest step ``lr * |d64|``."""
    names = [f"state {i}" for i in range(len(s64))] + ["param"]
    wants = list(s64) + [p64]
    step = fast.scalars.lr * float(d64.abs().max()) if d64 is not None and d64.numel() else 0.0
    for name, e, b, want in zip(names, step_errors(kind, fast, p64, s64), step_errors(kind, strict, p64, s64), wants):
        finite = want[torch.isfinite(want)]
        ulp = 2.0**-23 * float(finite.abs().max()) if finite.numel() else 0.0
        if name == "param":
            ulp += 2.0**-20 * step
        limit = FAST_MATH_RATIO * float(b.max()) + ulp
        assert float(e.max()) <= limit, f"{label} {name}: max error {float(e.max()):.3e} > {limit:.3e}"
        limit = FAST_MATH_RATIO * float(b.mean()) + ulp
        assert float(e.mean()) <= limit, f"{label} {name}: mean error {float(e.mean()):.3e} > {limit:.3e}"


def assert_codes_tier(kind: UpdateKind, fast: UpdateItem, strict: UpdateItem, s64: list[Tensor], label: str = "") -> None:
    """8-bit codes of ``fast`` equal ``strict``'s except neighbours around a decision
    threshold that the float64 value lies within TIE_WINDOW of; at most MAX_CODE_MISMATCH."""
    from pagedopt.functional.qmap import decision_thresholds

    k1 = kind.state1_moments
    groups = [(strict.state1, fast.state1, strict.absmax1, s64[:k1], kind.state_signed[0])]
    if kind.num_states == 2:
        groups.append((strict.state2, fast.state2, strict.absmax2, s64[k1:], kind.state_signed[1]))
    total = mismatched = 0
    for codes_s, codes_f, absmax, values, signed in groups:
        t = decision_thresholds(signed).double()
        codes_s = codes_s.detach().cpu().reshape(len(values), -1).long()
        codes_f = codes_f.detach().cpu().reshape(len(values), -1).long()
        scale = absmax.detach().cpu().reshape(len(values), -1).double()
        for row, v in enumerate(values):
            cs, cf = codes_s[row], codes_f[row]
            bad = (cs != cf).nonzero().flatten()
            total += cs.numel()
            mismatched += bad.numel()
            if not bad.numel():
                continue
            assert int((cs[bad] - cf[bad]).abs().max()) == 1, f"{label}: fast and strict codes are not neighbours"
            if strict.block_wise:
                blocks = scale[row].repeat_interleave(BLOCK_SIZE)[: v.numel()]
            else:
                blocks = scale[row].expand(v.numel())
            x = v[bad] / blocks[bad]
            threshold = t[torch.minimum(cs[bad], cf[bad])]
            assert bool(((x - threshold).abs() <= TIE_WINDOW * threshold.abs()).all()), f"{label}: code outside the tie window"
    assert mismatched <= MAX_CODE_MISMATCH * total, f"{label}: {mismatched} of {total} codes differ"


def check_backend_tiers(backend, device, kind_name: str, dtype: torch.dtype, mode: str) -> None:
    """One multi-tensor prepare + update of fast items on ``backend`` (odd sizes, NaN/Inf/zero
    gradients, scales on every other tensor) held to the fast-math tier (32-bit state) or
    the codes tier (8-bit), skipped elements bit for bit. Used by the GPU tests and, with
    the emulated launcher, on the CPU."""
    from cuda_helpers import SIZES, make_item, run_prepare_and_update, to_device
    from pagedopt.functional.kinds import kind_for

    kind = kind_for(kind_name)

    def items(numerics):
        return [make_item(kind_name, n, dtype, mode, seed=n, scales=i % 2 == 1, numerics=numerics)[1]
                for i, n in enumerate(SIZES)]

    cpu = items("fast")
    oracles = [float64_step(kind, it) for it in cpu]
    strict = items("strict")
    fast = [to_device(it, device) for it in cpu]
    strict, fast = run_prepare_and_update(backend, kind, strict, fast, want_norms=False, exact=False)
    for i, (f, s, (p64, s64, d64, keep)) in enumerate(zip(fast, strict, oracles)):
        label = f"{kind_name}/{dtype}/{mode} n={SIZES[i]}"
        kept = f.param.detach().cpu().reshape(-1)[~keep]
        assert torch.equal(kept, cpu[i].param.reshape(-1)[~keep]), f"{label}: skipped elements changed"
        if mode == "state32":
            assert_fast_math_tier(kind, f, s, p64, s64, label, d64)
        else:
            assert_codes_tier(kind, f, s, s64, label)
