"""Per-step scalars of an update, computed once on the host in float64 and rounded to float32.

Every backend receives the same :class:`StepScalars` (the native kernels as a C struct of the
same field order, see ``native/include/pagedopt/common.h``), so no backend derives its own
``1 - beta1`` or bias correction and results agree bit for bit. The bias corrections arrive
as reciprocals, ``inv_bias_correction1 = f32(1 / (1 - beta1**t))`` and
``inv_bias_correction2_sqrt = f32(1 / sqrt(1 - beta2**t))`` (float64 on the host, rounded
once), so the per-element math multiplies instead of dividing. The step count lives on the
host (as in bitsandbytes), so computing these never syncs the device.

Example:
    >>> from pagedopt.functional.kinds import kind_for
    >>> from pagedopt.functional.scalars import step_scalars
    >>> s = step_scalars(kind_for("adamw"), {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
    ...                  "weight_decay": 0.01}, step=1)
    >>> round(s.inv_bias_correction1, 5), s.weight_decay, round(s.decay_factor, 6)
    (10.0, 0.0, 0.99999)
"""

from __future__ import annotations

import math
import struct
from dataclasses import astuple, dataclass, fields
from typing import Any, Mapping

import torch

from .kinds import Algorithm, UpdateKind


def f32(x: float) -> float:
    """Round a Python float to the nearest float32 value (returned as a Python float)."""
    return struct.unpack("f", struct.pack("f", float(x)))[0]


@dataclass(frozen=True)
class StepScalars:
    """float32-exact scalars for one parameter's update at one step (field order = C ABI)."""

    beta1: float
    beta2: float
    beta3: float
    one_minus_beta1: float
    one_minus_beta2: float
    one_minus_beta3: float
    alpha: float
    eps: float
    lr: float
    inv_bias_correction1: float  # f32(1 / (1 - beta1**t)); exactly 1 without bias correction
    inv_bias_correction2_sqrt: float  # f32(1 / sqrt(1 - beta2**t)); exactly 1 without
    weight_decay: float  # L2 term added to the gradient; 0 when decay is decoupled
    decay_factor: float  # decoupled decay p *= decay_factor; exactly 1 when coupled
    dampening_factor: float  # SGD/LARS: 1 - dampening
    first_step: int  # SGD/LARS: the momentum buffer starts as the gradient
    nesterov: int
    skip_zeros: int

    def astuple(self) -> tuple:
        return astuple(self)


FLOAT_FIELDS = tuple(f.name for f in fields(StepScalars) if f.type == "float")
INT_FIELDS = tuple(f.name for f in fields(StepScalars) if f.type == "int")


def ademamix_schedules(
    step: int, alpha: float, beta1: float, beta3: float, t_alpha: int | None, t_beta3: int | None
) -> tuple[float, float]:
    """AdEMAMix warm-up of ``alpha`` and ``beta3`` (Pagliardini et al. 2024, eqs. for
    ``alpha_t`` and ``beta3_t``): returns ``(alpha_t, beta3_t)``."""
    alpha_t = min(step * alpha / t_alpha, alpha) if t_alpha else alpha
    if t_beta3 and beta1 > 0.0 and beta3 > 0.0:
        ln_b1, ln_b3 = math.log(beta1), math.log(beta3)
        s = step / t_beta3
        beta3_t = min(math.exp(ln_b1 * ln_b3 / ((1.0 - s) * ln_b3 + s * ln_b1)), beta3)
    else:
        beta3_t = beta3
    return alpha_t, beta3_t


# The hyperparameters step_scalars reads; with kind, step and skip_zeros they determine it.
_HP_KEYS = ("lr", "betas", "weight_decay", "eps", "alpha", "adam_w_mode", "bias_correction",
            "t_alpha", "t_beta3", "nesterov", "lr_decay")
_CACHE_LIMIT = 4096
_cache: dict[tuple, StepScalars] = {}


def step_scalars(
    kind: UpdateKind, hp: Mapping[str, Any], step: int, *, skip_zeros: bool = False
) -> StepScalars:
    """Scalars for ``kind`` with hyperparameters ``hp`` (a param group merged with overrides)
    at 1-based ``step``.

    Every parameter of a group at the same step gets the same scalars, so results are
    memoized by value: building them costs ~10 us per parameter, which on a GPU step over a
    GPT-2-sized parameter list was more host time than the kernels took. Values that are
    not plain hashable scalars (a tensor ``lr`` that a scheduler changes in place) bypass
    the cache.
    """
    values = tuple(map(hp.get, _HP_KEYS))
    key = (kind, int(step), bool(skip_zeros), values)
    try:
        hit = _cache.get(key)
    except TypeError:  # an unhashable value type in hp
        return _compute_step_scalars(kind, hp, step, skip_zeros)
    if hit is not None:
        return hit
    # (Checked on a miss only: keys holding such values are never stored, so never hit.)
    if any(isinstance(v, (torch.Tensor, list, dict)) for v in values):
        return _compute_step_scalars(kind, hp, step, skip_zeros)
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    result = _cache[key] = _compute_step_scalars(kind, hp, step, skip_zeros)
    return result


def _compute_step_scalars(kind: UpdateKind, hp: Mapping[str, Any], step: int, skip_zeros: bool) -> StepScalars:
    lr = float(hp["lr"])
    betas = tuple(float(b) for b in hp.get("betas", (0.0, 0.0)))
    beta1 = betas[0] if len(betas) > 0 else 0.0
    beta2 = betas[1] if len(betas) > 1 else 0.0
    beta3 = betas[2] if len(betas) > 2 else 0.0
    wd = float(hp.get("weight_decay", 0.0))
    eps = float(hp.get("eps", 0.0))
    alpha = float(hp.get("alpha", 0.0) or 0.0)
    algo = kind.algorithm

    decoupled = kind.decoupled_weight_decay
    if kind.name == "lamb" and not hp.get("adam_w_mode", True):
        decoupled = False

    bc1, bc2_sqrt = 1.0, 1.0
    if algo in (Algorithm.ADAM, Algorithm.ADEMAMIX) and hp.get("bias_correction", True):
        bc1 = 1.0 - beta1**step
        bc2_sqrt = math.sqrt(1.0 - beta2**step)

    if algo == Algorithm.ADEMAMIX:
        alpha, beta3 = ademamix_schedules(
            step, alpha, beta1, beta3, hp.get("t_alpha"), hp.get("t_beta3")
        )

    dampening_factor = 1.0
    if algo == Algorithm.MOMENTUM:
        # bitsandbytes packs SGD/LARS as betas=(momentum, dampening)
        dampening_factor = 1.0 - beta2
        beta2 = 0.0
    if algo == Algorithm.ADAGRAD:
        lr = lr / (1.0 + (step - 1) * float(hp.get("lr_decay", 0.0)))

    return StepScalars(
        beta1=f32(beta1),
        beta2=f32(beta2),
        beta3=f32(beta3),
        one_minus_beta1=f32(1.0 - beta1),
        one_minus_beta2=f32(1.0 - beta2),
        one_minus_beta3=f32(1.0 - beta3),
        alpha=f32(alpha),
        eps=f32(eps),
        lr=f32(lr),
        inv_bias_correction1=f32(1.0 / bc1),
        inv_bias_correction2_sqrt=f32(1.0 / bc2_sqrt),
        weight_decay=0.0 if decoupled else f32(wd),
        decay_factor=f32(1.0 - lr * wd) if decoupled else 1.0,
        dampening_factor=f32(dampening_factor),
        first_step=int(step == 1),
        nesterov=int(bool(hp.get("nesterov", False))),
        skip_zeros=int(bool(skip_zeros)),
    )
