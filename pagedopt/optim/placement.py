"""Per-parameter paging: one optimizer whose parameters' state lives under different paging
configs (or none).

A paged optimizer has one :class:`~pagedopt.paging.store.StateStore` built from its
``paging`` config. When a parameter group or a :class:`~pagedopt.GlobalOptimManager`
override carries its own ``paging`` value, the optimizer swaps its store for a
:class:`RoutingStateStore`: the original store stays the *base* store, and each distinct
paging config gets one store of its own (``make_state_store(config)``), shared by every
parameter with that config. Each store keeps its own budget - a rule
``{min_numel: 1000000, set: {paging: {policy: budgeted, device_budget_bytes: 1GiB}}}`` puts
the matching parameters in one 1 GiB pool. ``paging: False`` keeps a parameter's state on its
device, unpaged.

``paging`` values: absent (the base store), ``True`` (the optimizer's paging config, or
PagingConfig's defaults when the optimizer is not paged), ``False``/``None`` (unpaged), a
:class:`~pagedopt.PagingConfig`, or a dict of its fields.

Example:
    >>> import torch, pagedopt
    >>> big, small = torch.nn.Parameter(torch.randn(4096)), torch.nn.Parameter(torch.randn(8))
    >>> opt = pagedopt.AdamW8bit([{"params": [big], "paging": {"policy": "offload", "backend": "host"}},
    ...                          {"params": [small]}])
    >>> big.grad, small.grad = torch.randn(4096), torch.randn(8); opt.step()
    >>> type(opt.state_store).__name__, len(opt.state_store.stores)
    ('RoutingStateStore', 2)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..paging.config import PagingConfig
from ..paging.store import DeviceStateStore, StateStore
from .manager import check_paging_value

# Stands for "no per-parameter paging value": the parameter uses the base store.
BASE = object()


class RoutingStateStore:
    """A :class:`~pagedopt.paging.store.StateStore` that routes each parameter to the store of
    its paging config (see the module docstring).

    Args:
        base: the optimizer's own store (for parameters without a paging value).
        base_paging: the optimizer's paging config (``None`` when it is not paged).
        make_store: builds the store for a paging config (default:
            :func:`pagedopt.paging.make_state_store`).

    Example:
        >>> import torch
        >>> from pagedopt.paging.store import DeviceStateStore
        >>> store = RoutingStateStore(DeviceStateStore(), None)
        >>> p = torch.zeros(3)
        >>> store.place(p, False)
        >>> store.zeros(p, "state1", (3,), torch.float32)
        tensor([0., 0., 0.])
    """

    def __init__(
        self,
        base: StateStore,
        base_paging: PagingConfig | None,
        make_store: Callable[[PagingConfig], StateStore] | None = None,
    ) -> None:
        self.base = base
        self.base_paging = base_paging
        self._make_store = make_store or _default_make_store
        self._unpaged: StateStore | None = None
        self._by_config: dict[PagingConfig, StateStore] = {}
        # Placement by parameter identity; dropped in forget().
        self._placed: dict[int, tuple[torch.Tensor, StateStore]] = {}

    @property
    def stores(self) -> list[StateStore]:
        """Every store in use: the base store first, then the others in creation order."""
        extra = [self._unpaged] if self._unpaged is not None else []
        return [self.base, *extra, *self._by_config.values()]

    def store_for(self, paging: Any) -> StateStore:
        """The store for a per-parameter ``paging`` value (see the module docstring)."""
        if paging is BASE:
            return self.base
        value = check_paging_value(paging, "paging")
        if value is True:
            value = self.base_paging if self.base_paging is not None else PagingConfig()
        if value is False:
            if self.base_paging is None:
                return self.base
            if self._unpaged is None:
                self._unpaged = DeviceStateStore()
            return self._unpaged
        if value == self.base_paging:
            return self.base
        if value not in self._by_config:
            self._by_config[value] = self._make_store(value)
        return self._by_config[value]

    def place(self, param: torch.Tensor, paging: Any) -> None:
        """Route ``param``'s state to the store for ``paging`` (before its state is created)."""
        self._placed[id(param)] = (param, self.store_for(paging))

    def _route(self, param: torch.Tensor) -> StateStore:
        found = self._placed.get(id(param))
        return found[1] if found is not None and found[0] is param else self.base

    # -- StateStore protocol ----------------------------------------------------------------

    def zeros(self, param: torch.Tensor, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._route(param).zeros(param, key, shape, dtype)

    def adopt(self, param: torch.Tensor, key: str, tensor: torch.Tensor) -> torch.Tensor:
        return self._route(param).adopt(param, key, tensor)

    def visit(self, works: Sequence[Any], fn: Callable[[list[Any]], None]) -> None:
        # Each parameter's update is independent, so every store visits its own parameters.
        by_store: dict[int, tuple[StateStore, list[Any]]] = {}
        for w in works:
            store = self._route(w.key)
            by_store.setdefault(id(store), (store, []))[1].append(w)
        for store, part in by_store.values():
            store.visit(part, fn)

    def residency(self, param: torch.Tensor, state: dict[str, Any]) -> str:
        return self._route(param).residency(param, state)

    def moves(self, param: torch.Tensor) -> bool:
        return self._route(param).moves(param)

    def forget(self, param: torch.Tensor) -> None:
        self._route(param).forget(param)
        self._placed.pop(id(param), None)

    # -- pager extras (``opt.pager.stats()``, telemetry) ------------------------------------

    def synchronize(self) -> None:
        """Wait until every store's transfers have completed (before the host reads state)."""
        for store in self.stores:
            sync = getattr(store, "synchronize", None)
            if callable(sync):
                sync()

    def stats(self) -> dict[str, Any]:
        """The pagers' statistics added up (counters and gauges summed, nested counters merged;
        peaks are summed too, an upper bound of the combined peak)."""
        total: dict[str, Any] = {}
        for store in self.stores:
            stats = getattr(store, "stats", None)
            if callable(stats):
                _accumulate(total, stats())
        return total

    @property
    def sink(self) -> Any:
        return next((getattr(s, "sink") for s in self.stores if hasattr(s, "sink")), None)

    @sink.setter
    def sink(self, value: Any) -> None:
        for store in self.stores:
            if hasattr(store, "sink"):
                store.sink = value


def _accumulate(total: dict[str, Any], stats: dict[str, Any]) -> None:
    for key, value in stats.items():
        if isinstance(value, dict):
            _accumulate(total.setdefault(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
        elif value is not None:
            total.setdefault(key, value)


def _default_make_store(config: PagingConfig) -> StateStore:
    from ..paging import make_state_store

    return make_state_store(config)
