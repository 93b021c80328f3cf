"""``load_state_dict`` checks everything before it changes anything.

:func:`prepare_load` runs at the top of :meth:`pagedopt.optim.Optimizer8bit.load_state_dict`:
it calls torch.optim's load-state-dict pre-hooks
(:meth:`torch.optim.Optimizer.register_load_state_dict_pre_hook`), converts a
``torch.optim.Adam``/``AdamW`` state dict into pagedopt's layout (:func:`convert_torch_state`),
and validates the result (:func:`validate_state_dict`) the way the constructor validates its
arguments. Only then does the optimizer replace its state; :func:`finish_load` calls the
post-hooks.

What is checked, per parameter group and per parameter:

- the number of groups and of parameters in each group;
- hyperparameters in range (the constructor's checks: ``lr >= 0``, ``0 <= beta < 1``,
  finite ``eps``, ...);
- the state layout of this optimizer class: ``state1`` (and ``state2`` for two-state
  optimizers such as Adam, none for one-state ones such as Lion or SGD), no foreign tensors;
- an integer, non-negative ``step``;
- state shapes against the parameter (moments x parameter shape), dtypes (``uint8`` codes
  with their ``absmax``, or floating point), finite values;
- ``absmax``: finite, non-negative, one per block or one per tensor;
- ``qmap``: 256 finite values, strictly increasing, within [-1, 1]. pagedopt's own maps are
  accepted as they are; any other valid map (bitsandbytes' signed map for a non-negative
  state, a custom map) is accepted and the codes are re-encoded into pagedopt's map on load.
  An unsorted or out-of-range map cannot decode to anything meaningful and is refused.
- percentile-clipping history (``gnorm_vec``) and trust-ratio norms (``unorm_vec``): finite
  and non-negative.

Errors are :class:`StateDictError` (a ``ValueError``) naming the group index, the position in
the group, the parameter's name when the optimizer knows names, and the key.

Example:
    >>> import torch, pagedopt
    >>> w = torch.nn.Parameter(torch.randn(64, 64))
    >>> opt = pagedopt.AdamW8bit([w], min_8bit_size=0)
    >>> w.grad = torch.randn(64, 64); opt.step()
    >>> sd = opt.state_dict()
    >>> sd["param_groups"][0]["lr"] = -1.0
    >>> opt.load_state_dict(sd)
    Traceback (most recent call last):
    ...
    pagedopt.optim.state_checks.StateDictError: load_state_dict: param group 0: Invalid lr: -1.0 (must be a finite number >= 0)
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import torch

from ..functional.qmap import is_canonical_map
from ..functional.quantization import num_blocks
from ..shards import local_tensor as _local
from . import validation

QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"  # the nested bitsandbytes >= 0.49 layout
# torch.optim.Adam/AdamW group keys with no pagedopt counterpart (dropped when converting).
TORCH_ONLY_GROUP_KEYS = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
                         "decoupled_weight_decay")
TORCH_ADAM_STATE_KEYS = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
QMAP_SIZE = 256
GNORM_HISTORY = 100


class StateDictError(ValueError):
    """A state dict that ``load_state_dict`` refuses; ``where`` names group, position,
    parameter and key.

    Example:
        >>> str(StateDictError("param group 0, position 1 ('fc.weight'), key 'absmax1'", "contains NaN"))
        "load_state_dict: param group 0, position 1 ('fc.weight'), key 'absmax1': contains NaN"
    """

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"load_state_dict: {where + ': ' if where else ''}{problem}")


# -- hooks -------------------------------------------------------------------------------------------


def prepare_load(optimizer: Any, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Pre-hooks, torch.optim conversion and validation; returns the state dict to load.
    Raises :class:`StateDictError` before the optimizer has changed."""
    if not isinstance(state_dict, Mapping):
        raise StateDictError("", f"expected a state dict (a mapping), got {type(state_dict).__name__}")
    state_dict = dict(state_dict)  # as torch: hooks may replace it, never the caller's dict
    for hook in getattr(optimizer, "_optimizer_load_state_dict_pre_hooks", {}).values():
        result = hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    state_dict = convert_torch_state(optimizer, state_dict)
    validate_state_dict(optimizer, state_dict)
    return state_dict


def finish_load(optimizer: Any) -> None:
    """torch.optim's load-state-dict post-hooks, after the state was replaced."""
    for hook in getattr(optimizer, "_optimizer_load_state_dict_post_hooks", {}).values():
        hook(optimizer)


# -- torch.optim state dicts -----------------------------------------------------------------------


def _is_torch_layout(state_dict: Mapping[str, Any]) -> bool:
    states = state_dict.get("state")
    return isinstance(states, Mapping) and any(
        isinstance(v, Mapping) and TORCH_ADAM_STATE_KEYS & set(v) for v in states.values())


def convert_torch_state(optimizer: Any, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A ``torch.optim.Adam``/``AdamW`` state dict in pagedopt's layout (``exp_avg`` ->
    ``state1``, ``exp_avg_sq`` -> ``state2``, float32; ``load_state_dict`` then quantizes them
    for 8-bit optimizers), or ``state_dict`` unchanged when it is not one.

    Only Adam-family targets can take it (other algorithms keep different moments), and
    ``amsgrad``/``maximize`` runs cannot be continued (pagedopt has neither): both raise
    :class:`StateDictError`.

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.randn(4096))
        >>> ref = torch.optim.AdamW([w], lr=1e-3); w.grad = torch.randn(4096); ref.step()
        >>> opt = pagedopt.AdamW8bit([w]); opt.load_state_dict(ref.state_dict())
        >>> opt.state[w]["state1"].dtype, opt.state[w]["step"]
        (torch.uint8, 1)
    """
    if not _is_torch_layout(state_dict):
        return dict(state_dict)
    kind = getattr(optimizer, "kind", None)
    target = type(optimizer).__name__
    if kind is None or kind.name not in ("adam", "adamw"):
        raise StateDictError("", f"this is a torch.optim Adam/AdamW state dict (keys exp_avg, exp_avg_sq); {target} "
                                 "keeps other moments, so it cannot continue from it (load it into an Adam/AdamW "
                                 "pagedopt optimizer, or start the optimizer afresh)")
    groups = []
    for gindex, group in enumerate(state_dict.get("param_groups", [])):
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise StateDictError(f"param group {gindex}", f"{flag}=True: pagedopt optimizers have no {flag}, "
                                                              "so this torch.optim run cannot be continued exactly")
        groups.append({k: v for k, v in group.items() if k not in TORCH_ONLY_GROUP_KEYS})
    states: dict[Any, Any] = {}
    for key, value in state_dict["state"].items():
        if not isinstance(value, Mapping) or not TORCH_ADAM_STATE_KEYS & set(value):
            states[key] = value
            continue
        converted = {k: v for k, v in value.items() if k not in TORCH_ADAM_STATE_KEYS}
        for old, new in (("exp_avg", "state1"), ("exp_avg_sq", "state2")):
            if isinstance(value.get(old), torch.Tensor):
                converted[new] = value[old].detach().float()
        step = value.get("step")
        if isinstance(step, torch.Tensor) and step.numel() == 1 and float(step) == math.floor(float(step)):
            converted["step"] = int(step)
        states[key] = converted
    return {**state_dict, "state": states, "param_groups": groups}


# -- validation --------------------------------------------------------------------------------------


def _where(gindex: int, pindex: int, name: str | None, key: str | None = None) -> str:
    text = f"param group {gindex}, position {pindex}"
    if name:
        text += f" ({name!r})"
    if key:
        text += f", key {key!r}"
    return text


def _names(group: Mapping[str, Any], saved: Mapping[str, Any]) -> list[Any]:
    for source in (group, saved):
        names = source.get("param_names")
        if isinstance(names, (list, tuple)):
            return list(names)
    return []


def validate_state_dict(optimizer: Any, state_dict: Mapping[str, Any]) -> None:
    """Raise :class:`StateDictError` if ``state_dict`` cannot be loaded into ``optimizer``."""
    if "state" not in state_dict or "param_groups" not in state_dict:
        missing = [k for k in ("state", "param_groups") if k not in state_dict]
        raise StateDictError("", f"missing {', '.join(map(repr, missing))} (keys: {sorted(map(str, state_dict))})")
    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(state_dict["state"], Mapping):
        raise StateDictError("", "'param_groups' must be a list and 'state' a mapping")
    if len(groups) != len(saved_groups):
        raise StateDictError("", f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has "
                                 f"{len(groups)}")
    located: dict[Any, tuple[int, int, torch.Tensor, str | None, Mapping[str, Any]]] = {}
    for gindex, (group, saved) in enumerate(zip(groups, saved_groups)):
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise StateDictError(f"param group {gindex}", "must be a mapping with a 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise StateDictError("", f"loaded state dict's parameter group {gindex} has {len(saved['params'])} "
                                     f"parameters, the optimizer's has {len(group['params'])}")
        merged = optimizer._merge_loaded_group(group, saved)
        try:
            validation.check_hyperparameters({k: v for k, v in merged.items() if k != "params"},
                                             getattr(optimizer, "betas_len", None))
        except ValueError as exc:
            raise StateDictError(f"param group {gindex}", str(exc)) from None
        optimizer._check_group(merged)
        names = _names(group, saved)
        for pindex, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
            located[saved_id] = (gindex, pindex, p, names[pindex] if pindex < len(names) else None, merged)
    for saved_id, value in state_dict["state"].items():
        if saved_id in located:
            gindex, pindex, p, name, merged = located[saved_id]
            settings = {**merged, **optimizer._overrides_for(p)}
            _check_param_state(optimizer, value, p, settings, gindex, pindex, name)


def _check_param_state(optimizer: Any, value: Any, p: torch.Tensor, settings: Mapping[str, Any],
                       gindex: int, pindex: int, name: str | None) -> None:
    def fail(key: str | None, problem: str) -> StateDictError:
        return StateDictError(_where(gindex, pindex, name, key), problem)

    if not isinstance(value, Mapping):
        raise fail(None, f"the parameter's state must be a mapping, got {type(value).__name__}")
    flat = dict(value)
    nested = flat.pop(QUANT_STATE_KEY, None)
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise fail(QUANT_STATE_KEY, f"must be a mapping, got {type(nested).__name__}")
        flat.update(nested)
    for old, new in (("max1", "absmax1"), ("max2", "absmax2")):
        if old in flat and new not in flat:
            flat[new] = flat.pop(old)
        flat.pop(f"new_{old}", None)
    if not flat:
        return  # no state yet: created at the first step
    kind = optimizer.kind
    states = kind.num_states
    allowed = {"step", "gnorm_vec", "unorm_vec"} | {f"{k}{i}" for k in ("state", "absmax", "qmap")
                                                      for i in range(1, states + 1)}
    cls = type(optimizer).__name__
    for key in flat:
        if key in allowed:
            continue
        if key == "state2" and states == 1:
            raise fail(key, f"a second state: saved by a two-state optimizer (Adam-like); {cls} keeps one state")
        if isinstance(flat[key], torch.Tensor):
            raise fail(key, f"not part of {cls}'s state (expected {', '.join(sorted(allowed))}); was this state dict "
                            "saved by another optimizer class?")
    for index in range(1, states + 1):
        if f"state{index}" not in flat:
            other = "one-state (Lion, SGD, ...)" if states == 2 else "different"
            raise fail(f"state{index}", f"missing: {cls} keeps {states} state tensor(s); this state dict has keys "
                                        f"{sorted(flat)} (saved by a {other} optimizer?)")
    _check_step(flat.get("step"), fail)
    sharded = _is_sharded(p)
    for index in range(1, states + 1):
        moments = kind.state1_moments if index == 1 else 1
        _check_state_tensor(flat, index, moments, p, sharded, settings, fail)
    for key, length in (("gnorm_vec", GNORM_HISTORY), ("unorm_vec", 1)):
        if key in flat:
            t = _tensor(flat[key], key, fail)
            _check_float(t, key, fail, nonnegative=True)
            if t.numel() != length:
                raise fail(key, f"{t.numel()} elements, expected {length}")


def _is_sharded(p: torch.Tensor) -> bool:
    from ..distributed import sharding

    return sharding.is_sharded(p)


def _tensor(value: Any, key: str, fail) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise fail(key, f"must be a tensor, got {type(value).__name__}")
    return _local(value)


def _check_step(step: Any, fail) -> None:
    if step is None:
        raise fail("step", "missing (the number of updates this state has seen)")
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            raise fail("step", f"must be a single number, got a tensor of shape {tuple(step.shape)}")
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, numbers.Real) or not math.isfinite(step) \
            or step != math.floor(step) or step < 0:
        raise fail("step", f"must be a non-negative integer, got {step!r}")


def _check_float(t: torch.Tensor, key: str, fail, nonnegative: bool = False) -> None:
    if not t.is_floating_point():
        raise fail(key, f"dtype {t.dtype}, expected a floating-point tensor")
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise fail(key, f"{bad} of {t.numel()} values are NaN or infinite")
    if nonnegative and t.numel() and bool((t < 0).any()):
        raise fail(key, f"{int((t < 0).sum())} negative values (must be >= 0)")


def _check_state_tensor(flat: Mapping[str, Any], index: int, moments: int, p: torch.Tensor, sharded: bool,
                        settings: Mapping[str, Any], fail) -> None:
    key = f"state{index}"
    t = _tensor(flat[key], key, fail)
    if not sharded:
        expected = (moments, *p.shape) if moments > 1 else tuple(p.shape)
        if tuple(t.shape) != expected:
            what = "the same number of elements" if t.numel() == math.prod(expected) else f"{t.numel()} elements"
            raise fail(key, f"shape {tuple(t.shape)} ({what}) does not fit the parameter of shape {tuple(p.shape)}: "
                            f"expected {expected}; the state belongs to another parameter or optimizer")
    if t.dtype == torch.uint8:
        absmax_key = f"absmax{index}"
        if absmax_key not in flat:
            raise fail(absmax_key, f"missing: 8-bit {key} needs its per-block scales")
        absmax = _tensor(flat[absmax_key], absmax_key, fail)
        _check_float(absmax, absmax_key, fail, nonnegative=True)
        if not sharded:
            per_moment = p.numel()
            allowed = {1, num_blocks(per_moment, True)}
            if p.dim() >= 2 and p.shape[0]:  # rows-of-blocks layout of a gathered FSDP2 state
                allowed.add(p.shape[0] * num_blocks(per_moment // p.shape[0], True))
            if absmax.numel() % moments or absmax.numel() // moments not in allowed:
                raise fail(absmax_key, f"{absmax.numel()} scales do not fit {moments} x {per_moment} elements "
                                       f"(expected {moments} x one of {sorted(allowed)})")
        qmap_key = f"qmap{index}"
        if qmap_key in flat and flat[qmap_key] is not None:
            _check_qmap(_tensor(flat[qmap_key], qmap_key, fail), qmap_key, fail)
    elif t.is_floating_point():
        _check_float(t, key, fail)
    else:
        raise fail(key, f"dtype {t.dtype}: expected uint8 codes or a floating-point tensor")


def _check_qmap(qmap: torch.Tensor, key: str, fail) -> None:
    if is_canonical_map(qmap, True) or is_canonical_map(qmap, False):
        return
    if not qmap.is_floating_point() or qmap.numel() != QMAP_SIZE:
        raise fail(key, f"a quantization map has {QMAP_SIZE} floating-point values, got {qmap.numel()} of {qmap.dtype}")
    values = qmap.detach().double().reshape(-1)
    if not bool(torch.isfinite(values).all()):
        raise fail(key, "the quantization map has NaN or infinite values")
    if bool((values.abs() > 1.0 + 1e-6).any()):
        raise fail(key, "the quantization map has values outside [-1, 1]")
    if not bool((values[1:] > values[:-1]).all()):
        raise fail(key, "the quantization map is not strictly increasing (codes could not be decoded or searched)")
