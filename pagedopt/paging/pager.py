"""The pager: where each optimizer state buffer lives, and moving it around the step.

A :class:`Pager` is the :class:`~pagedopt.paging.store.StateStore` of paged optimizers. It
allocates state through a mover (:mod:`pagedopt.paging.movers`), accounts every byte, and
runs each pass of the step through :meth:`Pager.visit`:

1. walk the step's parameters in order; the longest run whose state is already on the
   device (or on its way there) updates in one call, like an unpaged optimizer;
2. a parameter whose state is not there is paged in on demand (the step waits), after
   making room: least recently used state is evicted for the budget, for the pressure
   watermark, or because the device is full;
3. while a run updates, the next ``lookahead`` parameters are prefetched (``pipelined``,
   ``offload``, ``budgeted``), never evicting the run itself;
4. after the update, ``offload`` (and any parameter that overdrew the budget) pages out.

Rules that hold at every transition (tests check them after each one):

* paged device bytes <= ``device_budget_bytes``, except while a single parameter whose
  state alone exceeds the room streams through: then everything else has been evicted, the
  device holds only that parameter's state, and it leaves right after its update (counted in
  ``budget_overdrafts_total`` / ``max_overdraft_bytes``);
* nothing is lost: a move copies before the old copy is dropped, and a failed move leaves
  the buffer where it was (if a simulated page-in cannot get device memory even after
  evicting everything else, the update runs on the host copy, with a
  :class:`PagingFallbackWarning`);
* the accounting is exact: ``stats()`` gauges equal the sums over the buffers, and for the
  pools in host memory the physical allocations too (:meth:`Pager.verify_accounting`).

Parameters with fewer than ``min_paged_numel`` elements keep unpaged state on their own
device (``unpaged_bytes``). On CUDA nothing in a visit synchronizes with the host: moves are
``cuMemPrefetchAsync`` calls on a side stream ordered by events, and the free-memory query
for the watermark (only when ``reserve_free_bytes > 0``) is one ``cudaMemGetInfo`` per visit.

Example:
    >>> import torch, pagedopt
    >>> from pagedopt.paging import PagingConfig
    >>> w = torch.nn.Parameter(torch.randn(512, 512))
    >>> cfg = PagingConfig(policy="budgeted", backend="simulated", device_budget_bytes="256KiB",
    ...                    min_paged_numel=1024)
    >>> opt = pagedopt.PagedAdamW8bit([w], paging=cfg)
    >>> w.grad = torch.randn(512, 512); opt.step()
    >>> opt.pager.stats()["device_bytes"] <= 256 * 1024
    True
    >>> opt.pager.residency(w, opt.state[w])
    'host'
"""

from __future__ import annotations

import itertools
import time
import warnings
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch

from .allocation import AllocationMixin
from .budgets import BudgetMixin
from .buffers import _UNPAGED, AccountingError, PagingFallbackWarning, _PagedBuffer
from .config import PagingConfig
from .eviction import stable_prefix
from .memory import HostMemory, SimulatedDevice
from .movers import Mover
from .policies import policy_for
from .staged import StagedMover
from .stats import PagerStats
from .store import PAGEABLE_KEYS
from .transitions import TransitionsMixin
from .victims import VictimIndex

__all__ = ["Pager", "PagingFallbackWarning", "AccountingError"]


def _forget_resident(movers: dict[torch.device, Any]) -> None:
    for mover in movers.values():
        resident = getattr(mover, "resident", None)
        if resident is not None:
            resident.clear()
    movers.clear()


class Pager(AllocationMixin, TransitionsMixin, BudgetMixin):
    """Paged optimizer state (see the module docstring for the rules).

    Args:
        config: the :class:`~pagedopt.PagingConfig`.

    Public beyond the :class:`~pagedopt.paging.store.StateStore` protocol:
    :meth:`stats`, :meth:`prefetch`, :meth:`evict`, :meth:`synchronize`,
    :meth:`verify_accounting`, :meth:`add_observer`, :meth:`location`, and
    ``simulated_device`` / ``host_memory`` (the pools, for tests and planning).

    Example:
        >>> import torch
        >>> from pagedopt.paging import Pager, PagingConfig
        >>> from types import SimpleNamespace
        >>> pager = Pager(PagingConfig(backend="simulated", min_paged_numel=1))
        >>> p = torch.zeros(1000)
        >>> state = {"state1": pager.zeros(p, "state1", (1000,), torch.float32)}
        >>> pager.visit([SimpleNamespace(key=p, state=state)], lambda works: state["state1"].add_(1))
        >>> pager.residency(p, state), pager.stats()["device_bytes"]
        ('device', 4000)
        >>> pager.evict(); pager.residency(p, state), float(state["state1"].sum())
        ('host', 1000.0)
    """

    def __init__(self, config: PagingConfig) -> None:
        self.config = config
        self.policy = policy_for(config)
        self.budget = config.device_budget_bytes
        self.reserve = config.reserve_free_bytes
        self.host_memory = HostMemory()
        self.simulated_device = (
            SimulatedDevice(config.simulated_capacity_bytes) if config.backend == "simulated" else None
        )
        self._stats = PagerStats()
        self._buffers: dict[torch.Tensor, dict[str, _PagedBuffer]] = {}
        self._unpaged: dict[torch.Tensor, dict[str, int]] = {}
        self._movers: dict[torch.device, Any] = {}
        # Movers list their resident buffers and each buffer names its mover (a cycle): when the
        # pager is freed, empty the lists so reference counting frees the state at once.
        weakref.finalize(self, _forget_resident, self._movers).atexit = False
        self._serials = itertools.count()
        self._host_bytes = 0
        self._unpaged_bytes = 0
        self._observers: list[Callable[["Pager", str], None]] = []
        self._warned: set[str] = set()
        self.last_moved: tuple[torch.Tensor, str] | None = None  # (param, key) of the latest move
        # Telemetry sink (set by pagedopt.telemetry.attach): told each page-in's latency.
        self.sink: Any = None
        self._visit_serial = 0  # which visit is running (next_use eviction reads the plan)
        self._cursor = -1  # the plan position being updated (-1: outside a visit)
        self._device_total = 0  # paged bytes on all devices (kept with the movers' device_bytes)
        self._device_mover_list: list[Mover] | None = None  # cache of _device_movers()
        self._stable = 0  # length of the plan's stable prefix (next_use eviction with a budget)
        self._victim_indexes: dict[int, VictimIndex] = {}  # id(mover) -> its index, during a visit

    # -- StateStore protocol -----------------------------------------------------------------

    def zeros(self, param: torch.Tensor, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Zeroed state for ``param``: paged when large enough, placed by the policy."""
        return self._create(param, key, tuple(shape), dtype, source=None)

    def adopt(self, param: torch.Tensor, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A pager-managed copy of ``tensor`` (loaded state goes back into paged memory).

        Adopted state starts in host memory and the next step pages it in: while
        ``load_state_dict`` runs, the old state is still alive, and two copies on the
        device at once could run it out of memory.
        """
        return self._create(param, key, tuple(tensor.shape), tensor.dtype, source=tensor)

    def visit(self, works: Sequence[Any], fn: Callable[[list[Any]], None]) -> None:
        """Run ``fn`` on chunks of ``works`` (in order) whose paged state is on the device."""
        works = list(works)
        if not works:
            return
        self._stats.visits_total += 1
        self._stats.note_step(works[0].key, works[0].state.get("step") if isinstance(works[0].state, dict) else None)
        plan = [self._sync_work(w) for w in works]
        self._visit_serial += 1
        for index, bufs in enumerate(plan):
            for b in bufs:
                b.plan_visit, b.plan_index = self._visit_serial, index
        if self.config.eviction == "next_use":
            self._stable = stable_prefix([sum(b.nbytes for b in bufs) for bufs in plan], self._plan_budget(),
                                         self.policy.lookahead)
        if not any(plan):
            self._stats.chunks_total += 1
            fn(works)
            return
        for mover in self._device_movers():
            mover.begin_visit()
            self._relieve_pressure(mover)
        if self.config.eviction == "next_use":  # (see pagedopt.paging.victims)
            self._victim_indexes = {id(m): VictimIndex(m, self._visit_serial, self._stable)
                                    for m in self._device_movers()}
        try:
            self._run_chunks(works, plan, fn)
        finally:
            self._cursor = -1
            self._victim_indexes = {}
        for mover in self._device_movers():
            self._relieve_pressure(mover)

    def _run_chunks(self, works: list[Any], plan: list[list[_PagedBuffer]], fn: Callable[[list[Any]], None]) -> None:
        """The scheduling loop of :meth:`visit` (see the module docstring)."""
        pos, n = 0, len(works)
        while pos < n:
            self._cursor = pos
            end = pos
            while end < n and all(b.location == "device" for b in plan[end]):
                end += 1
            streamed = False
            if end == pos:
                end = pos + 1
                streamed = self._demand(plan[pos])
            chunk = [b for bufs in plan[pos:end] for b in bufs]
            self._pin(chunk)
            try:
                self._prefetch_ahead(plan, end)
                for mover, bufs in self._by_mover(chunk):
                    mover.wait(bufs)
                self._stats.chunks_total += 1
                fn(works[pos:end])
            finally:
                self._unpin(chunk)
            self._after_use(chunk, "overdraft" if streamed else ("offload" if self.policy.evict_after_use else None))
            pos = end

    def residency(self, param: torch.Tensor, state: dict[str, Any]) -> str:
        """``"device"``, ``"host"``, ``"unpaged"`` (small state kept on the parameter's own
        device, or state whose paged allocation failed), or a mix such as
        ``"state1=device,state2=host"``."""
        bufs = self._buffers.get(param, {})
        for key, buf in bufs.items():  # bind, so that manual evict()/prefetch() can move it
            if state.get(key) is buf.tensor:
                buf.state = state
        where = {key: buf.location for key, buf in bufs.items()}
        where.update({key: "unpaged" for key in self._unpaged.get(param, {}) if key not in where})
        if not where:
            return "unpaged"
        if len(set(where.values())) == 1:
            return next(iter(where.values()))
        return ",".join(f"{key}={where[key]}" for key in sorted(where))

    def moves(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s state may move between steps, from the configuration alone:
        state below ``min_paged_numel`` stays where it was created, and state in plain host
        memory for CPU training (``backend="host"``) never moves, so the step plan may launch
        those directly (the pager still accounts their bytes). State whose paged allocation
        failed is unpaged but still counts as moving: the outcome may differ between FSDP
        ranks, and which path a parameter takes must not (other paths, other collectives)."""
        if param not in self._buffers and param not in self._unpaged:
            return False  # (not created yet, or forgotten)
        mover = self._mover_for(param)
        return mover is not _UNPAGED and mover.has_device and self._pages(param, mover)

    def forget(self, param: torch.Tensor) -> None:
        """Stop managing ``param``'s state (its tensors are freed when the optimizer drops them)."""
        for buf in list(self._buffers.get(param, {}).values()):
            self._drop(buf)
        for nbytes in self._unpaged.pop(param, {}).values():
            self._unpaged_bytes -= nbytes

    # -- public extras -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Gauges and counters (names are Prometheus-friendly; see :mod:`pagedopt.paging.stats`).

        Never synchronizes: CUDA stall times are collected from measurements that completed.
        """
        for mover in self._device_movers():
            self._stats.prefetch_stall_seconds += mover.harvest_stall_seconds()
        out = {
            "policy": self.policy.name,
            "backend": "+".join(sorted({m.kind for m in self._movers.values() if m is not _UNPAGED}))
            or self.config.backend,
            "device_bytes": self.device_bytes,
            "host_bytes": self._host_bytes,
            "unpaged_bytes": self._unpaged_bytes,
            "device_budget_bytes": self.budget,
            "reserve_free_bytes": self.reserve,
            "paged_buffers": sum(len(b) for b in self._buffers.values()),
        }
        out.update(self._stats.as_dict())
        staged = [m for m in self._device_movers() if isinstance(m, StagedMover)]
        out["transfer"] = "staged" if staged else "migrate"
        out["staging_pool_bytes"] = sum(m.pool.reserved_bytes for m in staged)
        out["staging_idle_bytes"] = sum(m.idle_device_bytes for m in staged)
        out["copy_pieces_total"] = sum(m.copy_pieces for m in staged)
        if self.budget is not None:
            out["device_headroom_bytes"] = max(0, self.budget - out["device_bytes"])
        budgets = self.device_budgets()
        if len(budgets) > 1 or any(b != self.budget for b in budgets.values()):
            out["device_budgets_bytes"] = budgets  # per device, where one differs from the pager's
            if all(b is not None for b in budgets.values()):
                out["device_headroom_bytes"] = sum(max(0, m.budget - m.device_bytes) for m in self._device_movers())
        out_bytes = self._stats.transfers.get("out", {})
        out["oom_avoidance_actions"] = {
            "pressure_eviction": out_bytes.get("pressure", 0),
            "capacity_eviction": out_bytes.get("capacity", 0),
            "overdraft": self._stats.budget_overdrafts_total + self._stats.pressure_overdrafts_total,
            "allocation_fallback": self._stats.allocation_fallbacks_total,
        }
        return out

    @property
    def device_bytes(self) -> int:
        """Paged state bytes resident on devices now."""
        return sum(m.device_bytes for m in self._device_movers())

    @property
    def host_bytes(self) -> int:
        """Paged state bytes in host memory now."""
        return self._host_bytes

    def location(self, param: torch.Tensor, key: str) -> str | None:
        """Where ``param``'s ``key`` state is (``None`` when not paged)."""
        buf = self._buffers.get(param, {}).get(key)
        return None if buf is None else buf.location

    def resident(self) -> list[tuple[torch.Tensor, str, int]]:
        """``(param, key, nbytes)`` of every paged buffer on a device, least recently used first."""
        return [(b.param, b.key, b.nbytes) for m in self._device_movers() for b in m.resident.values()]

    def paged_buffers(self) -> list[tuple[torch.Tensor, str, int]]:
        """``(param, key, nbytes)`` of every paged buffer, wherever it is."""
        return [(b.param, b.key, b.nbytes) for bufs in self._buffers.values() for b in bufs.values()]

    def prefetch(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Page in the state of ``params`` (all by default, in order) as far as the budget,
        the watermark and the device allow; stops at the first that does not fit."""
        keys = list(self._buffers) if params is None else [p for p in params if p in self._buffers]
        self._prefetch_groups(
            [b for b in self._buffers[p].values() if b.mover.has_device and b.movable] for p in keys
        )

    def evict(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Page out the state of ``params`` (all by default), e.g. before a memory-hungry eval."""
        for buf in self._select(params):
            if buf.location == "device" and buf.pins == 0 and buf.movable:
                self._page_out(buf, "manual")

    @property
    def idle_staging_bytes(self) -> int:
        """Device bytes the staging pools hold without state in them."""
        return sum(m.idle_device_bytes for m in self._device_movers() if isinstance(m, StagedMover))

    def release_idle(self) -> int:
        """Give idle staging slots back to the device; returns the bytes released."""
        return sum(m.release_idle() for m in self._device_movers() if isinstance(m, StagedMover))

    def synchronize(self) -> None:
        """Wait on the host until all transfers issued so far have completed (not for the step)."""
        for mover in self._device_movers():
            mover.synchronize()

    def add_observer(self, fn: Callable[["Pager", str], None]) -> None:
        """Call ``fn(pager, event)`` after every transition (``"alloc"``, ``"in"``, ``"out"``,
        ``"drop"``); tests check invariants there."""
        self._observers.append(fn)

    def verify_accounting(self, physical: bool = True) -> None:
        """Raise :class:`AccountingError` unless the books match the buffers (and, with
        ``physical``, the host-memory pools' real allocations)."""
        from .accounting import verify

        verify(self, physical)

    def __repr__(self) -> str:
        return (
            f"Pager(policy={self.policy.name!r}, backend={self.config.backend!r}, "
            f"device_bytes={self.device_bytes}, host_bytes={self._host_bytes}, budget={self.budget})"
        )

    # -- visiting ----------------------------------------------------------------------------

    def _sync_work(self, work: Any) -> list[_PagedBuffer]:
        """Bind ``work``'s state dict to its buffers; adopt tensors the pager does not know
        (state replaced or loaded without the pager); return the buffers that can move."""
        param, state = work.key, work.state
        bufs = self._buffers.get(param)
        out = []
        for key in PAGEABLE_KEYS:
            tensor = state.get(key)
            buf = bufs.get(key) if bufs else None
            if not isinstance(tensor, torch.Tensor):
                if buf is not None:
                    self._drop(buf)
                continue
            if buf is None or buf.tensor is not tensor:
                if buf is None and param in self._unpaged and key in self._unpaged[param]:
                    self._record_unpaged(param, key, tensor)
                    continue
                state[key] = self.adopt(param, key, tensor)
                buf = self._buffers.get(param, {}).get(key)
                if buf is None:
                    continue
            buf.state = state
            if buf.mover.has_device:
                out.append(buf)
        return out

    def _demand(self, bufs: list[_PagedBuffer]) -> bool:
        """Page in one parameter's state now. Returns True when it overdraws (streams through)."""
        missing = [b for b in bufs if b.location != "device"]
        if not missing:
            return False
        started = time.perf_counter()
        self._pin(bufs)
        try:
            need = sum(b.nbytes for b in missing)
            problem = self._make_room(missing[0].mover, need)
            overdraft = problem is not None
            if overdraft:
                # Everything else that could move has left: this parameter streams through alone.
                if problem == "budget":
                    self._stats.budget_overdrafts_total += 1
                else:
                    self._stats.pressure_overdrafts_total += 1
                self._stats.max_overdraft_bytes = max(self._stats.max_overdraft_bytes, sum(b.nbytes for b in bufs))
            for b in missing:
                if not self._page_in(b, "demand"):
                    self._warn(
                        "fallback-host",
                        f"no device memory for {b.nbytes} bytes of {b.key} even after evicting all other state; "
                        "updating it in host memory",
                    )
                    self._stats.allocation_fallbacks_total += 1
        finally:
            self._unpin(bufs)
        if not any(m.asynchronous for m in {b.mover for b in bufs}):
            # Host-side copies: the step really waited this long. (CUDA stalls are measured
            # on the GPU timeline by the mover.)
            self._stats.prefetch_stall_seconds += time.perf_counter() - started
        return overdraft

    def _prefetch_ahead(self, plan: list[list[_PagedBuffer]], start: int) -> None:
        """Prefetch up to ``lookahead`` parameters after ``start`` without evicting pinned state."""
        self._prefetch_groups(plan[start : start + self.policy.lookahead], first_index=start)

    def _prefetch_groups(self, groups: Iterable[list[_PagedBuffer]], first_index: int | None = None) -> None:
        """Page in each group of buffers (one parameter's state) in order, making room as
        needed; stops at the first group that does not fit. Groups already handled stay pinned
        until the end, so making room for a later one never evicts an earlier one."""
        pinned: list[_PagedBuffer] = []
        try:
            for offset, bufs in enumerate(groups):
                missing = [b for b in bufs if b.location != "device"]
                self._pin(bufs)
                pinned.extend(bufs)
                if not missing:
                    continue
                target = None if first_index is None else first_index + offset
                if self._make_room(missing[0].mover, sum(b.nbytes for b in missing), target) is not None:
                    return
                for b in missing:
                    if not self._page_in(b, "prefetch"):
                        return
        finally:
            self._unpin(pinned)

    def _after_use(self, chunk: list[_PagedBuffer], evict_reason: str | None) -> None:
        for mover, bufs in self._by_mover(chunk):
            mover.after_use(bufs)
            for b in bufs:
                if b.location == "device":
                    mover.resident.move_to_end(b.serial)
        if evict_reason is not None:
            for b in chunk:
                if b.location == "device":
                    self._page_out(b, evict_reason)

    # -- helpers -----------------------------------------------------------------------------

    def _device_movers(self) -> list[Mover]:
        if self._device_mover_list is None:
            self._device_mover_list = [m for m in self._movers.values() if m is not _UNPAGED and m.has_device]
        return self._device_mover_list

    @staticmethod
    def _by_mover(bufs: list[_PagedBuffer]) -> list[tuple[Mover, list[_PagedBuffer]]]:
        if not bufs:
            return []
        first = bufs[0].mover
        if all(b.mover is first for b in bufs):  # the usual case: one device
            return [(first, bufs)]
        groups: dict[int, tuple[Mover, list[_PagedBuffer]]] = {}
        for b in bufs:
            groups.setdefault(id(b.mover), (b.mover, []))[1].append(b)
        return list(groups.values())

    @staticmethod
    def _pin(bufs: Iterable[_PagedBuffer]) -> None:
        for b in bufs:
            b.pins += 1

    @staticmethod
    def _unpin(bufs: Iterable[_PagedBuffer]) -> None:
        for b in bufs:
            b.pins -= 1

    def _select(self, params: Iterable[torch.Tensor] | None) -> list[_PagedBuffer]:
        keys = list(self._buffers) if params is None else [p for p in params if p in self._buffers]
        return [b for p in keys for b in list(self._buffers[p].values())]

    def _notify(self, event: str) -> None:
        for fn in self._observers:
            fn(self, event)

    def _warn(self, what: str, message: str) -> None:
        if self.config.warn_on_fallback and what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, PagingFallbackWarning, stacklevel=3)
