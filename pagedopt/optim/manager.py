"""GlobalOptimManager: bitsandbytes' per-parameter override API, without its leaks.

bitsandbytes 0.49 keeps overrides in a process-wide singleton keyed by ``id(param)`` and by
(group index, parameter index). The positional table is shared by every optimizer, so an
override reaches any other optimizer that has *some* parameter at that position; entries
outlive their parameter, so a new tensor that reuses the ``id()`` inherits them; and module
overrides hold their modules (and so the whole model) alive.

Here an override belongs to the parameter object itself:

* it is stored against a weak reference and dropped when the parameter dies, so a reused
  ``id()`` never inherits it;
* it applies to that parameter in whichever optimizer updates it, and to nothing else;
* ``register_module_override`` holds the module weakly and finds the parameter by attribute
  name when it is needed, so it also follows wrappers that replace parameter objects
  (FSDP2's ``fully_shard``);
* values are checked when they are set (unknown keys and bad values raise at the call).

``model.to()``, ``.cuda()`` and ``.half()`` keep parameter objects (torch's default), so an
override can be set before or after moving the model. Something that *replaces* parameter
objects (``torch.__future__.set_overwrite_module_params_on_conversion(True)``, FSDP2) needs the
override on the new parameter, a module override, or a config-file rule by parameter name.

**When overrides are read.** Each optimizer resolves a parameter's overrides once and caches
them; it re-resolves only after the manager changed (one integer comparison per step).
Settings that shape the state - ``optim_bits``, ``min_8bit_size``, ``block_wise``,
``percentile_clipping``, ``max_unorm``, ``initial_accumulator_value`` and ``paging`` - are
fixed once the optimizer has created that parameter's state: changing them later warns and
leaves that state as it is (they apply to state created afterwards, e.g. by a new
optimizer). Hyperparameters (``lr``, ``betas``, ``eps``, ``weight_decay``, ``alpha``, ...) take
effect from the next ``step()``, as in bitsandbytes, which reads them at every step.

**Precedence** (highest first): these overrides, then the parameter group's values (a config
file's ``overrides`` rules become parameter groups), then the optimizer's constructor
arguments. Module overrides apply before direct ones, in registration order.

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
    >>> mng = pagedopt.GlobalOptimManager.get_instance()
    >>> mng.register_parameters(model.parameters())
    >>> mng.override_config(model[0].weight, "optim_bits", 32)
    >>> mng.overrides_for(model[0].weight)
    {'optim_bits': 32}
    >>> mng.overrides_for(model[1].weight)
    {}
"""

from __future__ import annotations

import difflib
import threading
import weakref
from typing import Any, Iterable, Mapping

import torch

from ..paging.config import PagingConfig
from . import validation

# Every per-parameter setting of some pagedopt optimizer (the union of the optimizers'
# ``defaults`` keys) plus ``paging``. Which of them a given optimizer has is checked when it
# resolves the override.
KNOWN_SETTINGS = frozenset(
    {
        "lr", "betas", "eps", "weight_decay", "alpha", "t_alpha", "t_beta3",
        "optim_bits", "min_8bit_size", "percentile_clipping", "block_wise", "max_unorm", "skip_zeros",
        "nesterov", "lr_decay", "initial_accumulator_value", "bias_correction", "adam_w_mode",
        "paging",
    }
)

# Settings fixed when a parameter's state is created (they decide its dtype, shape, extra
# buffers or placement).
STATE_SHAPING_SETTINGS = (
    "optim_bits", "min_8bit_size", "block_wise", "percentile_clipping", "max_unorm",
    "initial_accumulator_value", "paging",
)


def check_paging_value(value: Any, where: str) -> PagingConfig | bool:
    """A per-parameter ``paging`` value: ``True`` (the optimizer's paging, or the default
    paging), ``False``/``None`` (not paged), a :class:`~pagedopt.PagingConfig` or a dict of its
    fields (missing fields take PagingConfig's defaults)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, PagingConfig):
        return value
    if isinstance(value, Mapping):
        try:
            return PagingConfig(**dict(value))
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"{where}: invalid paging {dict(value)!r}: {e}") from None
    raise ValueError(f"{where}: invalid paging {value!r} (expected True, False, a PagingConfig or a dict of its fields)")


def check_settings(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checks override keys and values that do not depend on the optimizer; returns a copy
    with ``betas`` as a tuple and ``paging`` as a PagingConfig or bool."""
    out = dict(settings)
    for key in out:
        if not isinstance(key, str) or key not in KNOWN_SETTINGS:
            close = difflib.get_close_matches(str(key), sorted(KNOWN_SETTINGS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known settings: {', '.join(sorted(KNOWN_SETTINGS))})"
            raise ValueError(f"{where}: unknown optimizer setting {key!r}{hint}")
    if "betas" in out:
        out["betas"] = validation.parse_betas(out["betas"])
    if "paging" in out:
        out["paging"] = check_paging_value(out["paging"], where)
    try:
        validation.check_hyperparameters({k: v for k, v in out.items() if k != "paging"})
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return out


class GlobalOptimManager:
    """Process-wide registry of per-parameter optimizer overrides (see the module docstring).

    Use :meth:`get_instance`; the constructor raises, as in bitsandbytes.

    Example:
        >>> import torch, pagedopt
        >>> emb, head = torch.nn.Embedding(100, 16), torch.nn.Linear(16, 100)
        >>> mng = pagedopt.GlobalOptimManager.get_instance()
        >>> mng.override_config([emb.weight, head.weight], key_value_dict={"optim_bits": 32, "lr": 1e-4})
        >>> mng.overrides_for(head.weight)
        {'optim_bits': 32, 'lr': 0.0001}
    """

    _instance: "GlobalOptimManager | None" = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        raise RuntimeError("Call GlobalOptimManager.get_instance() instead")

    def initialize(self) -> None:
        """Reset to no overrides (bitsandbytes' name; :meth:`clear` is the same)."""
        self._lock = threading.RLock()
        # id(param) -> (weakref to param, override dict). The weakref's callback deletes the
        # entry when the parameter dies, so a reused id never inherits an override.
        self._by_param: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}
        # (weakref to module, attribute name, override dict), in registration order.
        self._module_overrides: list[tuple[weakref.ref, str, dict[str, Any]]] = []
        self.uses_config_override = False
        # Bumped on every change; optimizers re-resolve their cached overrides when it moves.
        self.generation = getattr(self, "generation", 0) + 1

    @classmethod
    def get_instance(cls) -> "GlobalOptimManager":
        """The process-wide manager."""
        with cls._instance_lock:
            if cls._instance is None:
                inst = cls.__new__(cls)
                inst.initialize()
                cls._instance = inst
            return cls._instance

    # -- seed API ---------------------------------------------------------------------------

    def register_parameters(self, params: Iterable[Any]) -> None:
        """Accepted for compatibility (parameters or parameter-group dicts).

        bitsandbytes needs it to map overrides to (group, index) positions; pagedopt keys
        overrides by the parameter itself, so calling it is optional and changes nothing.
        """
        for item in params:
            tensors = item.get("params", ()) if isinstance(item, Mapping) else (item,)
            for t in tensors:
                if isinstance(t, tuple) and len(t) == 2:  # named parameters
                    t = t[1]
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"register_parameters: expected tensors or parameter groups, got {type(t).__name__}")

    def override_config(
        self,
        parameters: torch.Tensor | Iterable[torch.Tensor],
        key: str | None = None,
        value: Any = None,
        key_value_dict: Mapping[str, Any] | None = None,
    ) -> None:
        """Override optimizer settings for ``parameters`` (one tensor or an iterable).

        Pass ``key`` and ``value``, or ``key_value_dict``. Settings: ``lr``, ``betas``, ``eps``,
        ``weight_decay``, ``optim_bits``, ``min_8bit_size``, ``percentile_clipping``,
        ``block_wise``, ``max_unorm``, ``skip_zeros``, ``alpha``, ``t_alpha``, ``t_beta3``,
        ``nesterov``, ``lr_decay``, ``initial_accumulator_value``, ``bias_correction``,
        ``adam_w_mode`` and ``paging`` (``False``, ``True``, a PagingConfig or a dict of its
        fields). Repeated calls merge; the dict is copied, so changing it later does nothing.
        """
        if key is not None and key_value_dict is not None:
            raise ValueError("override_config: pass either key/value or key_value_dict, not both")
        if key is not None:
            key_value_dict = {key: value}
        if not key_value_dict:
            raise ValueError("override_config: nothing to override (pass key and value, or key_value_dict)")
        if isinstance(parameters, torch.nn.Module):
            raise TypeError("override_config: expected tensors, got a Module (pass module.parameters())")
        settings = check_settings(key_value_dict, "override_config")
        tensors = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        for p in tensors:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"override_config: expected tensors, got {type(p).__name__}")
        with self._lock:
            self.uses_config_override = True
            for p in tensors:
                self._config_of(p).update(settings)
            self.generation += 1

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: Mapping[str, Any]) -> None:
        """Override settings for the parameter ``getattr(module, param_name)``.

        The module is held weakly; the attribute is looked up when an optimizer resolves the
        parameter's settings, so the override follows a parameter that was replaced.
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"register_module_override: expected a Module, got {type(module).__name__}")
        if not hasattr(module, param_name):
            raise AttributeError(f"register_module_override: {type(module).__name__} has no attribute {param_name!r}")
        settings = check_settings(config, f"register_module_override({type(module).__name__}.{param_name})")
        with self._lock:
            self.uses_config_override = True
            self._module_overrides = [e for e in self._module_overrides if e[0]() is not None]
            self._module_overrides.append((weakref.ref(module), param_name, settings))
            self.generation += 1

    # -- used by the optimizers ---------------------------------------------------------------

    def overrides_for(self, p: torch.Tensor) -> dict[str, Any]:
        """The merged overrides of parameter ``p`` (module overrides first, then direct ones)."""
        merged: dict[str, Any] = {}
        with self._lock:
            for module_ref, attr, settings in self._module_overrides:
                module = module_ref()
                if module is not None and getattr(module, attr, None) is p:
                    merged.update(settings)
            found = self._by_param.get(id(p))
            if found is not None and found[0]() is p:
                merged.update(found[1])
        return merged

    def clear(self) -> None:
        """Drop every override (useful between experiments in one process)."""
        with self._lock:
            self.initialize()

    def _config_of(self, p: torch.Tensor) -> dict[str, Any]:
        key = id(p)
        found = self._by_param.get(key)
        if found is not None and found[0]() is p:
            return found[1]
        by_param = self._by_param

        def _forget(ref: weakref.ref, key: int = key) -> None:
            entry = by_param.get(key)
            if entry is not None and entry[0] is ref:
                del by_param[key]

        by_param[key] = (weakref.ref(p, _forget), {})
        return by_param[key][1]
