"""The pure-torch reference of every update: the oracle for all backends and paging policies.

It is written for reading, not speed: whole-tensor float32 torch ops, one IEEE-rounded
operation at a time, in exactly the order the native kernels (``native/include``) perform
them, so a kernel that follows the same recipe agrees with it bit for bit. The only
order-dependent parts are the float64 reductions (gradient norm, update norm), which agree
to float64 rounding.

Per element, with ``g`` the gradient, ``p`` the parameter, states in float32:

1. skip mask: a gradient element that is NaN/Inf (or exactly 0 with ``skip_zeros``) leaves
   its parameter and its states unchanged (bitsandbytes instead zeroes ``m``/``v``, which
   throws away the history on one bad element);
2. ``g = g * gnorm_scale``; L2 weight decay ``g = g + wd * p`` (skipped when ``wd == 0``);
3. the algorithm updates its states and produces a direction ``d`` (see ``_ALGORITHMS``);
   bias corrections are applied by multiplying with the host-computed float32 reciprocals of
   :class:`~pagedopt.functional.scalars.StepScalars` (Adam:
   ``d = (m * inv_bc1) / (sqrt(v) * inv_bc2_sqrt + eps)``); the divisions by the denominator
   stay IEEE float32 divisions and ``sqrt`` is correctly rounded;
4. decoupled weight decay ``p = p * decay_factor`` (skipped when the factor is exactly 1);
5. ``p = p - lr * (d * update_scale)``; the result is rounded to the parameter's dtype.

8-bit states are dequantized first (``qmap[code] * absmax``) and requantized last against the
new absmax of the updated float32 values, normalized as ``x * f32(1 / absmax)`` (one
reciprocal per block; see :mod:`~pagedopt.functional.quantization`).

Example:
    >>> import torch
    >>> from pagedopt.functional.items import UpdateItem
    >>> from pagedopt.functional.kinds import kind_for
    >>> from pagedopt.functional.scalars import step_scalars
    >>> from pagedopt.functional import reference
    >>> p, g = torch.ones(3), torch.tensor([1.0, -1.0, 0.0])
    >>> s = step_scalars(kind_for("momentum"), {"lr": 0.1, "betas": (0.9, 0.0)}, 1)
    >>> reference.update(kind_for("momentum"), [UpdateItem(p, g, torch.zeros(3), None, None, None, s)])
    >>> p
    tensor([0.9000, 1.1000, 1.0000])
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import nonfinite_tally
from .items import PrepareResult, UpdateItem
from .kinds import Algorithm, UpdateKind
from .quantization import block_absmax, dequantize, quantize_with_absmax
from .scalars import StepScalars

Tensor = torch.Tensor


# --- per-algorithm math: (g, states, scalars) -> (new states, direction d) -------------------


def _ema(beta: float, old: Tensor, one_minus_beta: float, new: Tensor) -> Tensor:
    return beta * old + one_minus_beta * new


def _sqrt(v: Tensor) -> Tensor:
    """Correctly rounded float32 square root (IEEE ``sqrtf``, CUDA ``__fsqrt_rn``).

    ``torch.sqrt`` on CPU float32 tensors of more than about a thousand elements goes through
    MKL VML, which is not correctly rounded (1-ulp errors in ~0.7% of elements), so its result
    would depend on the tensor's size and on the device. The float64 square root rounded to
    float32 is the correctly rounded result (a float32's square root is never within a float64
    ulp of a float32 rounding boundary).
    """
    return torch.sqrt(v.double()).float()


def _adam_denominator(v: Tensor, s: StepScalars) -> Tensor:
    return _sqrt(v) * s.inv_bias_correction2_sqrt + s.eps


def _adam(g: Tensor, states: list[Tensor], s: StepScalars) -> tuple[list[Tensor], Tensor]:
    m, v = states
    m = _ema(s.beta1, m, s.one_minus_beta1, g)
    v = _ema(s.beta2, v, s.one_minus_beta2, g * g)
    d = (m * s.inv_bias_correction1) / _adam_denominator(v, s)
    return [m, v], d


def _ademamix(g: Tensor, states: list[Tensor], s: StepScalars) -> tuple[list[Tensor], Tensor]:
    m1, m2, v = states
    m1 = _ema(s.beta1, m1, s.one_minus_beta1, g)
    m2 = _ema(s.beta3, m2, s.one_minus_beta3, g)
    v = _ema(s.beta2, v, s.one_minus_beta2, g * g)
    d = (m1 * s.inv_bias_correction1 + s.alpha * m2) / _adam_denominator(v, s)
    return [m1, m2, v], d


def _momentum(g: Tensor, states: list[Tensor], s: StepScalars) -> tuple[list[Tensor], Tensor]:
    (m,) = states
    m = g.clone() if s.first_step else s.beta1 * m + s.dampening_factor * g
    d = g + s.beta1 * m if s.nesterov else m
    return [m], d


def _lion(g: Tensor, states: list[Tensor], s: StepScalars) -> tuple[list[Tensor], Tensor]:
    (m,) = states
    d = torch.sign(_ema(s.beta1, m, s.one_minus_beta1, g))
    m = _ema(s.beta2, m, s.one_minus_beta2, g)
    return [m], d


def _rmsprop(g: Tensor, states: list[Tensor], s: StepScalars) -> tuple[list[Tensor], Tensor]:
    (v,) = states
    v = _ema(s.beta1, v, s.one_minus_beta1, g * g)
    return [v], g / (_sqrt(v) + s.eps)


def _adagrad(g: Tensor, states: list[Tensor], s: StepScalars) -> tuple[list[Tensor], Tensor]:
    (v,) = states
    v = v + g * g
    return [v], g / (_sqrt(v) + s.eps)


_ALGORITHMS: dict[Algorithm, Callable[..., tuple[list[Tensor], Tensor]]] = {
    Algorithm.ADAM: _adam,
    Algorithm.ADEMAMIX: _ademamix,
    Algorithm.MOMENTUM: _momentum,
    Algorithm.LION: _lion,
    Algorithm.RMSPROP: _rmsprop,
    Algorithm.ADAGRAD: _adagrad,
}


# --- loading and storing states ---------------------------------------------------------------


def _moments(t: Tensor, count: int) -> list[Tensor]:
    return list(t.reshape(count, -1).unbind(0)) if count > 1 else [t.reshape(-1)]


def _load_states(kind: UpdateKind, item: UpdateItem) -> list[Tensor]:
    """float32 flat views/copies of the states: [m] or [m, v] or [m1, m2, v]."""
    out: list[Tensor] = []
    for index, (tensor, absmax) in enumerate(
        ((item.state1, item.absmax1), (item.state2, item.absmax2))[: kind.num_states]
    ):
        count = kind.state1_moments if index == 0 else 1
        signed = kind.state_signed[index]
        codes = _moments(tensor, count)
        if not item.quantized:
            out += [c.float() for c in codes]
            continue
        scales = absmax.reshape(count, -1)
        out += [dequantize(c, a, signed, item.block_wise) for c, a in zip(codes, scales)]
    return out


def _new_absmax(values: list[Tensor], given: Tensor | None, signed: bool, block_wise: bool) -> Tensor:
    if given is not None:
        return given.reshape(len(values), -1).float()
    return torch.stack([block_absmax(v, signed, block_wise) for v in values])


def _store_states(kind: UpdateKind, item: UpdateItem, values: list[Tensor]) -> None:
    k1 = kind.state1_moments
    groups = [(item.state1, item.absmax1, item.new_absmax1, values[:k1])]
    if kind.num_states == 2:
        groups.append((item.state2, item.absmax2, item.new_absmax2, values[k1:]))
    for index, (tensor, absmax, given, vals) in enumerate(groups):
        if not item.quantized:
            tensor.copy_(torch.stack(vals).reshape(tensor.shape))
            continue
        signed = kind.state_signed[index]
        scales = _new_absmax(vals, given, signed, item.block_wise)
        codes = [quantize_with_absmax(v, a, signed, item.block_wise) for v, a in zip(vals, scales)]
        tensor.copy_(torch.stack(codes).reshape(tensor.shape))
        absmax.copy_(scales.reshape(absmax.shape))


# --- one item -----------------------------------------------------------------------------------


def _scale_or_one(scale: Tensor | None, device: torch.device) -> Tensor:
    if scale is None:
        return torch.ones((), dtype=torch.float32, device=device)
    return scale.reshape(()).float()


def _compute(kind: UpdateKind, item: UpdateItem):
    """Run steps 1-3 for one item: (p float32, new states, direction d, keep mask)."""
    s = item.scalars
    p = item.param.detach().reshape(-1).float()
    g_raw = item.grad.detach().reshape(-1).float()
    keep = torch.isfinite(g_raw)
    if s.skip_zeros:
        keep &= g_raw != 0
    g = torch.where(keep, g_raw, 0.0) * _scale_or_one(item.gnorm_scale, p.device)
    if s.weight_decay != 0.0:
        g = g + s.weight_decay * p
    old = _load_states(kind, item)
    new, d = _ALGORITHMS[kind.algorithm](g, old, s)
    new = [torch.where(keep, n, o) for n, o in zip(new, old)]
    d = torch.where(keep, d, 0.0)
    return p, new, d, keep


def _apply_direction(p: Tensor, d: Tensor, keep: Tensor, item: UpdateItem) -> Tensor:
    s = item.scalars
    out = p * s.decay_factor if s.decay_factor != 1.0 else p
    out = out - s.lr * (d * _scale_or_one(item.update_scale, p.device))
    return torch.where(keep, out, p)


def update_one(kind: UpdateKind, item: UpdateItem) -> None:
    """Update ``item.param`` and its states in place."""
    p, new_states, d, keep = _compute(kind, item)
    p_new = _apply_direction(p, d, keep, item)
    _store_states(kind, item, new_states)
    item.param.detach().copy_(p_new.reshape(item.param.shape))


def prepare_one(kind: UpdateKind, item: UpdateItem, want_norms: bool) -> PrepareResult:
    """Maxima of the updated states (tensor-wise 8-bit) and, if asked, the norms for the
    trust ratio - computed without writing anything."""
    p, new_states, d, _ = _compute(kind, item)
    result = PrepareResult()
    if item.quantized and not item.block_wise:
        k1 = kind.state1_moments
        result.max1 = _new_absmax(new_states[:k1], None, kind.state_signed[0], False).reshape(k1)
        if kind.num_states == 2:
            result.max2 = _new_absmax(new_states[k1:], None, kind.state_signed[1], False).reshape(1)
    if want_norms:
        result.unorm_sq = d.double().square().sum()
        result.pnorm_sq = p.double().square().sum()
    return result


# --- backend interface --------------------------------------------------------------------------


def grad_norm_sq(grads: Sequence[Tensor]) -> list[Tensor]:
    """float64 squared L2 norm of the finite elements of each gradient (0-d tensors)."""
    out = []
    for g in grads:
        g = g.detach().reshape(-1).double()
        out.append(torch.where(torch.isfinite(g), g, 0.0).square().sum())
    return out


def prepare(kind: UpdateKind, items: Sequence[UpdateItem], want_norms: bool) -> list[PrepareResult]:
    return [prepare_one(kind, item, want_norms) for item in items]


@torch.no_grad()
def update(kind: UpdateKind, items: Sequence[UpdateItem]) -> None:
    counting = nonfinite_tally.active()
    for item in items:
        if counting and item.grad.device.type == "cpu":  # (other devices: the watch's own pass)
            nonfinite_tally.report(int(torch.isfinite(item.grad).logical_not().sum()))
        update_one(kind, item)
