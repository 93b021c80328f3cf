"""The memory controller: hold a free-memory headroom per device, and recover from out-of-memory.

Above the pagers sits one :class:`MemoryController` per optimizer. Once per step (a step
post-hook, after the update kernels were issued) it samples each device it pages to - free
memory (``torch.cuda.mem_get_info``; memory torch's allocator caches but does not use counts
as free), allocator reserved and active bytes - and sets the paged state's resident budget so
that the free memory stays at ``target_free_bytes``: the budget shrinks by a deficit and grows
by a surplus, within ``[min_budget_bytes, max_budget_bytes]``. State above a lowered budget
leaves at once (between steps, never inside the kernels).

A guarded step catches ``torch.OutOfMemoryError``:

* raised inside ``optimizer.step()``: every paged buffer is evicted to the host, idle staging
  slots and the allocator's cache are released, the budget drops to ``oom_budget_factor`` of
  what was resident, and the step is retried once for the parameters whose update had not run
  (their step counter and clipping history are restored first; a parameter whose update ran
  is not updated again). Nothing is lost or applied twice - each chunk's update allocates
  before it writes, so an OOM leaves a chunk either done or untouched;
* raised in forward/backward (the body of :meth:`MemoryController.guard`): the same recovery,
  gradients are cleared, and ``guard.retry`` tells the caller to run the batch again;
  :meth:`MemoryController.run_step` (and :func:`guarded_step`) does that once.

Every recovery is logged (logger ``pagedopt.memory``) and counted (``oom_recoveries_total``,
exported as ``pagedopt_oom_recoveries_total``).

Example:
    >>> import torch, pagedopt
    >>> from pagedopt.paging import MemoryConfig, PagingConfig
    >>> w = torch.nn.Parameter(torch.randn(256, 256))
    >>> opt = pagedopt.PagedAdamW8bit([w], paging=PagingConfig(
    ...     policy="budgeted", backend="simulated", simulated_capacity_bytes="4MiB",
    ...     device_budget_bytes="1MiB", min_paged_numel=1024))
    >>> ctrl = pagedopt.MemoryController(opt, MemoryConfig(target_free_bytes="3MiB"))
    >>> def train_step():
    ...     opt.zero_grad(); (w * w).sum().backward(); opt.step()
    >>> ctrl.run_step(train_step)
    >>> s = ctrl.stats()
    >>> s["oom_recoveries_total"], s["devices"]["simulated"]["budget_bytes"] <= 1 << 20
    (0, True)
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .config import MemoryConfig
from .guard import RngState, StepGuard
from .pager import Pager

log = logging.getLogger("pagedopt.memory")


@dataclass
class MemorySample:
    """One reading of a device (bytes; ``None`` where unknown).

    Example:
        >>> MemorySample(free_bytes=1 << 30, total_bytes=8 << 30, reserved_bytes=0, active_bytes=0).free_bytes
        1073741824
    """

    free_bytes: int | None
    total_bytes: int | None
    reserved_bytes: int
    active_bytes: int


def pagers_of(optimizer: Any) -> list[Pager]:
    """Every :class:`Pager` behind ``optimizer`` (its store, or the stores a routing store holds)."""
    store = getattr(optimizer, "state_store", None)
    stores = getattr(store, "stores", None)
    candidates = list(stores) if stores is not None else [store]
    return [s for s in candidates if isinstance(s, Pager)]


@dataclass(frozen=True)
class DeviceShare:
    """The paged state one pager keeps on one physical device.

    Example:
        >>> import torch
        >>> from pagedopt.paging import Pager, PagingConfig
        >>> pager = Pager(PagingConfig(policy="offload", backend="simulated", min_paged_numel=1))
        >>> _ = pager.zeros(torch.zeros(8), "state1", (8,), torch.float32)
        >>> [(key, str(s.param_device)) for key, shares in device_shares([pager]).items() for s in shares]
        [('simulated', 'cpu')]
    """

    pager: Pager
    param_device: torch.device  # where the parameters are (the pager's key for the mover)
    mover: Any

    @property
    def resident_bytes(self) -> int:
        return self.mover.device_bytes

    @property
    def footprint_bytes(self) -> int:
        """Resident state plus idle staging slots: device memory the pager holds there."""
        return self.mover.device_bytes + getattr(self.mover, "idle_device_bytes", 0)


def device_shares(pagers: list[Pager]) -> dict[str, list[DeviceShare]]:
    """Paged state grouped by the physical device that holds it: ``"cuda:0"``, ``"cuda:1"``,
    ... and one key per simulated device (``"simulated"`` for the first the pagers use,
    ``"simulated:1"``, ``"simulated:2"`` for the others - every simulated pager has a device
    of its own). State that never leaves the host has no key. Each device gets a budget of
    its own: two GPUs never share one."""
    out: dict[str, list[DeviceShare]] = {}
    simulated: list[Any] = []
    for pager in pagers:
        for param_device, mover in pager.movers_by_device().items():
            sim = pager.simulated_device
            if sim is not None:
                index = next((i for i, d in enumerate(simulated) if d is sim), None)
                if index is None:
                    simulated.append(sim)
                    index = len(simulated) - 1
                key = "simulated" if index == 0 else f"simulated:{index}"
            else:
                key = str(mover.torch_device)
            out.setdefault(key, []).append(DeviceShare(pager, param_device, mover))
    return out


def _pagers(shares: list[DeviceShare]) -> list[Pager]:
    return list({id(s.pager): s.pager for s in shares}.values())


def sample_device(key: str, pagers: list[Pager]) -> MemorySample:
    """Read free/total/reserved/active bytes of device ``key`` (``"cuda:0"``, ``"simulated"``,
    ``"simulated:1"``; ``pagers``: the pagers with state there)."""
    if key.startswith("simulated"):
        dev = pagers[0].simulated_device
        assert dev is not None
        return MemorySample(dev.free_bytes, dev.capacity_bytes, dev.used_bytes, dev.used_bytes)
    if key.startswith("cuda"):
        index = torch.device(key).index or 0
        free, total = torch.cuda.mem_get_info(index)
        reserved = torch.cuda.memory_reserved(index)
        active = torch.cuda.memory_allocated(index)
        return MemorySample(free + reserved - active, total, reserved, active)
    return MemorySample(None, None, 0, 0)


class MemoryController:
    """Holds a free-memory headroom by moving the paged state's budget; recovers from OOM.

    Args:
        optimizer: a (paged) pagedopt optimizer; its pagers are found through its state store.
        config: a :class:`~pagedopt.paging.MemoryConfig` (or a dict of its fields).
        sampler: ``(device_key, pagers) -> MemorySample`` (tests inject one; default
            :func:`sample_device`).
        auto_update: register a step post-hook that calls :meth:`update` after every step.

    Public: :meth:`update`, :meth:`recover`, :meth:`guard`, :meth:`run_step`, :meth:`stats`,
    ``oom_recoveries_total``.

    Example:
        >>> import torch, pagedopt
        >>> from pagedopt.paging import MemoryConfig
        >>> opt = pagedopt.AdamW8bit([torch.nn.Parameter(torch.zeros(4))])
        >>> pagedopt.MemoryController(opt, MemoryConfig()).stats()["oom_recoveries_total"]
        0
    """

    def __init__(self, optimizer: Any, config: MemoryConfig | dict | None = None,
                 sampler: Callable[[str, list[Pager]], MemorySample] | None = None, auto_update: bool = True) -> None:
        self.optimizer = optimizer
        self.config = config if isinstance(config, MemoryConfig) else MemoryConfig(**(config or {}))
        self.sampler = sampler or sample_device
        self.oom_recoveries_total = 0
        self.recoveries: list[dict[str, Any]] = []  # phase, evicted bytes, new budget per recovery
        self.last: dict[str, dict[str, Any]] = {}
        optimizer.memory_controller = self  # telemetry reads it from here
        self._hook = optimizer.register_step_post_hook(lambda *_: self.update()) if auto_update else None

    def close(self) -> None:
        """Stop updating after each step."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- the headroom loop -------------------------------------------------------------------

    def _by_device(self) -> dict[str, list[DeviceShare]]:
        return device_shares(pagers_of(self.optimizer))

    def update(self) -> dict[str, dict[str, Any]]:
        """Sample each device once and set the budget of the state on it to hold its headroom
        (each device on its own: ``min_budget_bytes``/``max_budget_bytes`` bound each)."""
        cfg = self.config
        for key, shares in self._by_device().items():
            sample = self.sampler(key, _pagers(shares))
            target = cfg.target_for(sample.total_bytes)
            footprint = sum(s.footprint_bytes for s in shares)
            budgets = [s.mover.budget for s in shares]
            budget = sum(budgets) if all(b is not None for b in budgets) else None
            if target is not None and sample.free_bytes is not None:
                budget = footprint + sample.free_bytes - target
            if budget is not None:
                budget = max(cfg.min_budget_bytes, budget)
                if cfg.max_budget_bytes is not None:
                    budget = min(cfg.max_budget_bytes, budget)
                _split_budget(shares, budget)
            self.last[key] = {
                "free_bytes": sample.free_bytes, "total_bytes": sample.total_bytes,
                "reserved_bytes": sample.reserved_bytes, "active_bytes": sample.active_bytes,
                "target_free_bytes": target, "budget_bytes": budget,
                "resident_bytes": sum(s.resident_bytes for s in shares),
                "headroom_bytes": None if sample.free_bytes is None or target is None else sample.free_bytes - target,
            }
        return self.last

    # -- out-of-memory recovery --------------------------------------------------------------

    def recover(self, phase: str) -> None:
        """Evict all paged state, release cached memory, lower the budget; log and count."""
        evicted, budgets = 0, {}
        by_device = self._by_device()
        resident = {key: sum(s.resident_bytes for s in shares) for key, shares in by_device.items()}
        for pager in _pagers([s for shares in by_device.values() for s in shares]):
            pager.evict()
            pager.release_idle()
            if pager.simulated_device is not None:
                pager.simulated_device.empty_cache()
                pager.host_memory.empty_cache()
        for key, shares in by_device.items():
            new = max(self.config.min_budget_bytes, int(_recovery_base(shares, resident[key]) * self.config.oom_budget_factor))
            if self.config.max_budget_bytes is not None:
                new = min(new, self.config.max_budget_bytes)
            _split_budget(shares, new)
            evicted += resident[key]
            budgets[key] = new
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        self.oom_recoveries_total += 1
        record = {"phase": phase, "evicted_bytes": evicted, "budgets": budgets}
        self.recoveries.append(record)
        log.warning("out of memory in %s: evicted %d bytes of optimizer state to the host, budget now %s "
                    "(recovery %d)", phase, evicted, budgets, self.oom_recoveries_total)

    def guard(self) -> StepGuard:
        """A context manager for one training step (see the module docstring).

        Example:
            >>> import torch, pagedopt
            >>> w = torch.nn.Parameter(torch.ones(3))
            >>> opt = pagedopt.AdamW8bit([w])
            >>> ctrl = pagedopt.MemoryController(opt)
            >>> with ctrl.guard() as g:
            ...     (w * 2).sum().backward(); opt.step()
            >>> g.retry
            False
        """
        return StepGuard(self)

    def run_step(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (forward, backward, ``optimizer.step()``) under a guard; after an OOM in
        forward/backward, run it once more (a second OOM propagates)."""
        rng = RngState()
        with self.guard() as g:
            result = fn()
        if not g.retry:
            return result
        if not self.config.retry_oom:
            raise torch.OutOfMemoryError("out of memory in forward/backward (retry_oom is off; memory was recovered)")
        rng.restore()  # the retry draws the same dropout masks as the failed attempt
        g2 = StepGuard(self, retries=0)
        with g2:
            return fn()

    def stats(self) -> dict[str, Any]:
        """``oom_recoveries_total`` and the last reading per device."""
        return {"oom_recoveries_total": self.oom_recoveries_total, "devices": dict(self.last)}


def _recovery_base(shares: list[DeviceShare], resident: int) -> int:
    """What an OOM recovery lowers one device's budget from: the state that was resident, or,
    when none was (the OOM came from activations while the state sat on the host), the
    budget in force - lowering from 0 would page every byte in and out on every later step."""
    if resident > 0:
        return resident
    budgets = [s.mover.budget for s in shares]
    if all(b is not None for b in budgets):
        return sum(budgets)
    return sum(s.pager.paged_bytes_on(s.mover) for s in shares)


def _split_budget(shares: list[DeviceShare], budget: int) -> None:
    """Share one device's ``budget`` among the pagers with state there, in proportion to their
    paged state on it. A pager whose state is all on this device gets a pager-wide budget; one
    spread over several devices gets a budget for this device only."""
    sizes = [max(1, s.pager.paged_bytes_on(s.mover)) for s in shares]
    total = sum(sizes)
    for share, size in zip(shares, sizes):
        part = budget if len(shares) == 1 else budget * size // total
        if len(share.pager.movers_by_device()) == 1:
            share.pager.set_budget(part)
        else:
            share.pager.set_budget(part, device=share.param_device)


def guarded_step(optimizer: Any, fn: Callable[[], Any], config: MemoryConfig | dict | None = None) -> Any:
    """Run one training step ``fn`` under ``optimizer``'s memory controller (created with
    ``config`` on first use): see :class:`MemoryController`.

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = pagedopt.AdamW8bit([w])
        >>> def step():
        ...     opt.zero_grad(); (w * w).sum().backward(); opt.step()
        >>> pagedopt.guarded_step(opt, step)
        >>> opt.memory_controller.oom_recoveries_total
        0
    """
    controller = getattr(optimizer, "memory_controller", None)
    if controller is None:
        controller = MemoryController(optimizer, config)
    return controller.run_step(fn)
