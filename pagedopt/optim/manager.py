"""GlobalOptimManager: bitsandbytes' per-parameter override API, without its leaks.

bitsandbytes keys overrides by ``id(param)`` and by (group, index) position in a process-wide
singleton, so an override can reach a different optimizer that happens to have a parameter at
the same position, survive the parameter (ids are reused after garbage collection) and keep
modules alive. Here an override belongs to the parameter object itself: it is stored against a
weak reference (dropped when the parameter dies), it applies to that parameter in whichever
optimizer updates it and nowhere else, and module overrides hold the module weakly.

Each optimizer resolves a parameter's overrides once, when it creates the parameter's state
(as bitsandbytes does at the first step), and caches the result.

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

import threading
import weakref
from typing import Any, Iterable

import torch


class GlobalOptimManager:
    """Process-wide registry of per-parameter optimizer overrides (see module docstring).

    Use :meth:`get_instance`; the constructor raises like bitsandbytes'.
    """

    _instance: "GlobalOptimManager | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        raise RuntimeError("Call GlobalOptimManager.get_instance() instead")

    def initialize(self) -> None:
        # id(param) -> (weakref to param, override dict). The weakref's callback deletes the
        # entry when the parameter dies, so a reused id never inherits an override.
        self._by_param: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}
        # (weakref to module, attribute name, override dict)
        self._module_overrides: list[tuple[weakref.ref, str, dict[str, Any]]] = []
        self.uses_config_override = False

    @classmethod
    def get_instance(cls) -> "GlobalOptimManager":
        with cls._lock:
            if cls._instance is None:
                inst = cls.__new__(cls)
                inst.initialize()
                cls._instance = inst
            return cls._instance

    # -- seed API ---------------------------------------------------------------------------

    def register_parameters(self, params: Iterable[Any]) -> None:
        """Accepted for compatibility. bitsandbytes needs it to map overrides to positions;
        pagedopt keys overrides by the parameter itself, so registering is optional."""
        for _ in params:
            pass

    def override_config(
        self,
        parameters: torch.Tensor | Iterable[torch.Tensor],
        key: str | None = None,
        value: Any = None,
        key_value_dict: dict[str, Any] | None = None,
    ) -> None:
        """Override optimizer settings (``optim_bits``, ``lr``, ``betas``, ...) for parameters."""
        if key is not None and key_value_dict is not None:
            raise ValueError("override_config: pass either key/value or key_value_dict, not both")
        if key is not None:
            key_value_dict = {key: value}
        if not key_value_dict:
            raise ValueError("override_config: nothing to override (key and key_value_dict are None)")
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        self.uses_config_override = True
        for p in parameters:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"override_config: expected tensors, got {type(p).__name__}")
            self._config_of(p).update(key_value_dict)

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: dict[str, Any]) -> None:
        """Override settings for ``getattr(module, param_name)`` (held weakly)."""
        if not hasattr(module, param_name):
            raise AttributeError(f"register_module_override: {type(module).__name__} has no attribute {param_name!r}")
        self.uses_config_override = True
        self._module_overrides.append((weakref.ref(module), param_name, dict(config)))

    # -- used by the optimizers ---------------------------------------------------------------

    def overrides_for(self, p: torch.Tensor) -> dict[str, Any]:
        """The merged overrides for parameter ``p`` (module overrides first, then direct ones)."""
        merged: dict[str, Any] = {}
        alive = []
        for entry in self._module_overrides:
            module = entry[0]()
            if module is None:
                continue
            alive.append(entry)
            if getattr(module, entry[1], None) is p:
                merged.update(entry[2])
        self._module_overrides = alive
        found = self._by_param.get(id(p))
        if found is not None and found[0]() is p:
            merged.update(found[1])
        return merged

    def clear(self) -> None:
        """Drop every override (useful between experiments in one process)."""
        self.initialize()

    def _config_of(self, p: torch.Tensor) -> dict[str, Any]:
        key = id(p)
        found = self._by_param.get(key)
        if found is not None and found[0]() is p:
            return found[1]
        by_param = self._by_param

        def _forget(_ref: weakref.ref, key: int = key) -> None:
            entry = by_param.get(key)
            if entry is not None and entry[0] is _ref:
                del by_param[key]

        ref = weakref.ref(p, _forget)
        by_param[key] = (ref, {})
        return by_param[key][1]
