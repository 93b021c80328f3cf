"""Argument checks shared by every optimizer: each error names the argument and the value.

Example:
    >>> from pagedopt.optim.validation import check_hyperparameters
    >>> check_hyperparameters({"lr": -1.0})
    Traceback (most recent call last):
    ...
    ValueError: Invalid lr: -1.0 (must be a finite number >= 0)
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import torch

SUPPORTED_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Static (per parameter, fixed once its state exists) settings and their checks.
STATIC_KEYS = (
    "optim_bits",
    "min_8bit_size",
    "percentile_clipping",
    "block_wise",
    "max_unorm",
    "skip_zeros",
)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _nonneg(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) < 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 0)")


def parse_betas(value: Any) -> tuple[float, ...]:
    """Betas as a tuple of floats; accepts bitsandbytes' string form ``"(0.9, 0.999)"``."""
    if isinstance(value, str):
        parts = value.replace("(", "").replace(")", "").split(",")
        try:
            return tuple(float(x) for x in parts if x.strip())
        except ValueError:
            raise ValueError(f"Invalid betas: {value!r} (expected numbers like '(0.9, 0.999)')") from None
    try:
        return tuple(float(b) for b in value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid betas: {value!r} (expected a tuple of numbers)") from None


def check_betas(betas: tuple[float, ...], expected_len: int | None = None) -> None:
    if expected_len is not None and len(betas) < expected_len:
        raise ValueError(f"Invalid betas: {betas!r} (expected {expected_len} values)")
    for i, b in enumerate(betas):
        if not math.isfinite(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r} (betas must be in [0, 1))")


def check_static(cfg: Mapping[str, Any]) -> None:
    """Checks the 8-bit settings: optim_bits, min_8bit_size, percentile_clipping, ..."""
    if "optim_bits" in cfg and cfg["optim_bits"] not in (8, 32):
        raise ValueError(f"Invalid optim_bits: {cfg['optim_bits']!r} (must be 8 or 32)")
    if "min_8bit_size" in cfg:
        v = cfg["min_8bit_size"]
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
            raise ValueError(f"Invalid min_8bit_size: {v!r} (must be an integer >= 0)")
    if "percentile_clipping" in cfg:
        v = cfg["percentile_clipping"]
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not 1 <= v <= 100:
            raise ValueError(
                f"Invalid percentile_clipping: {v!r} (must be an integer in 1..100; 100 disables it)"
            )
    if "max_unorm" in cfg:
        _nonneg("max_unorm", cfg["max_unorm"])
    for key in ("block_wise", "skip_zeros"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise ValueError(f"Invalid {key}: {cfg[key]!r} (must be True or False)")


def check_hyperparameters(hp: Mapping[str, Any], betas_len: int | None = None) -> None:
    """Checks lr, eps, weight_decay, betas, alpha, t_alpha, t_beta3 and the static settings."""
    for key in ("lr", "eps", "weight_decay", "alpha", "lr_decay", "initial_accumulator_value"):
        if key in hp and hp[key] is not None:
            _nonneg(key, hp[key])
    if "betas" in hp:
        check_betas(tuple(hp["betas"]), betas_len)
    for key in ("t_alpha", "t_beta3"):
        v = hp.get(key)
        if v is not None and (not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"Invalid {key}: {v!r} (must be None or a positive integer)")
    check_static(hp)


def check_param(p: Any, where: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where}: optimizer can only optimize Tensors, got {type(p).__name__}")
    if p.dtype not in SUPPORTED_PARAM_DTYPES:
        raise TypeError(
            f"{where}: parameter dtype {p.dtype} is not supported "
            f"(use float32, float16 or bfloat16)"
        )


def check_grad(p: torch.Tensor, grad: torch.Tensor, name: str) -> None:
    """Raises a clear error for gradients the kernels cannot take."""
    if grad.is_sparse or grad.layout != torch.strided:
        raise RuntimeError(
            f"{name}: sparse gradients are not supported (layout {grad.layout}); "
            "use torch.optim.SparseAdam or a dense embedding"
        )
    if grad.shape != p.shape:
        raise RuntimeError(f"{name}: gradient shape {tuple(grad.shape)} != parameter shape {tuple(p.shape)}")
    if grad.dtype != p.dtype:
        raise RuntimeError(f"{name}: gradient dtype {grad.dtype} != parameter dtype {p.dtype}")
    if grad.device != p.device:
        raise RuntimeError(f"{name}: gradient device {grad.device} != parameter device {p.device}")


def check_state_shape(param: torch.Tensor, state: dict, moments: int, name: str) -> None:
    """Raise when ``param`` (its local shard under FSDP2) no longer has the shape its state
    was created for (``p.data = p.data.reshape(...)`` keeps the element count but changes
    which elements share a quantization block); torch.optim and bitsandbytes raise too."""
    state1 = state.get("state1")
    if not isinstance(state1, torch.Tensor):
        return
    expected = (moments, *param.shape) if moments > 1 else tuple(param.shape)
    if tuple(state1.shape) != expected:
        raise RuntimeError(
            f"{name}: the parameter has shape {tuple(param.shape)} but its optimizer state was created for "
            f"shape {tuple(state1.shape[1:] if moments > 1 else state1.shape)}; reshaping a parameter under its "
            "state is not supported (re-create the optimizer, or load a state dict for the new shape)"
        )
