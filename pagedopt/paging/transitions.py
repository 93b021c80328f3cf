"""The pager's transitions: making room, paging in and out, and the books of every move.

A mixin of :class:`~pagedopt.paging.Pager`: every change of where a buffer lives goes
through :meth:`TransitionsMixin._page_in` / :meth:`TransitionsMixin._page_out`, which keep
the accounting exact and tell the observers.

Example:
    >>> from pagedopt.paging import Pager
    >>> from pagedopt.paging.transitions import TransitionsMixin
    >>> issubclass(Pager, TransitionsMixin)
    True
"""

from __future__ import annotations

import time

import torch

from . import managed
from .buffers import _PagedBuffer
from .eviction import pick_victim
from .memory import AllocationError
from .movers import Mover
from .staged import StagedMover


class TransitionsMixin:
    """Room, page-in, page-out and accounting (see the module docstring).

    Example:
        >>> from pagedopt.paging import Pager, PagingConfig
        >>> Pager(PagingConfig(backend="simulated"))._room_problem.__name__
        '_room_problem'
    """


    def _room_problem(self, mover: Mover, need: int) -> str | None:
        """Why ``need`` more bytes cannot go on ``mover``'s device now (``None``: they can)."""
        if mover.budget is not None and mover.device_bytes + need > mover.budget:
            return "budget"
        free = mover.free_bytes()
        if free is not None:
            if self.reserve and free - need < self.reserve:
                return "pressure"
            if mover.hard_capacity and free - need < 0:
                return "capacity"
        return None

    def _make_room(self, mover: Mover, need: int, target_index: int | None = None) -> str | None:
        """Evict unpinned state until ``need`` bytes fit. Returns ``None`` when they do, else
        what still stands in the way (``"budget"``, ``"pressure"``, ``"capacity"``).
        ``target_index``: making room for a prefetch of that plan position."""
        counted_pressure = False
        while (problem := self._room_problem(mover, need)) is not None:
            if problem == "pressure" and not counted_pressure:
                self._stats.pressure_events_total += 1
                counted_pressure = True
            victim = self._lru_victim(mover, target_index)
            if victim is None or not self._page_out(victim, problem):
                return problem
        return None

    def _relieve_pressure(self, mover: Mover) -> None:
        """Evict until free device memory is back above the watermark (when it is known)."""
        if not self.reserve:
            return
        self._make_room(mover, 0)
        if isinstance(mover, StagedMover) and mover.idle_device_bytes:
            free = mover.free_bytes()  # counts idle staging slots as free for state...
            if free is not None and free - mover.idle_device_bytes < self.reserve:
                mover.release_idle()  # ...but activations need them given back

    def _lru_victim(self, mover: Mover, target_index: int | None = None) -> _PagedBuffer | None:
        """The buffer to evict (see :mod:`pagedopt.paging.eviction`): unpinned and movable.
        ``target_index``: the plan position a prefetch makes room for. Buffers whose
        state-dict entry was replaced behind the pager's back are orphans: dropped, not moved.
        During a visit, ``next_use`` eviction asks the mover's :class:`VictimIndex` (no scan)."""
        index = self._victim_indexes.get(id(mover)) if self._cursor >= 0 else None
        if index is not None:
            return index.pick(self._cursor, target_index, self._movable_or_drop)
        if self.config.eviction == "lru" or self._cursor < 0:  # the least recently used: the first one
            while True:  # (no copy of the list: the first unpinned buffer is usually near its head)
                for buf in mover.resident.values():
                    if buf.pins:
                        continue
                    if buf.movable:
                        return buf
                    if buf.state is not None:
                        break  # an orphan: drop it (outside the iteration) and look again
                else:
                    return None
                self._drop(buf)
        candidates = []
        for buf in list(mover.resident.values()):
            if buf.pins:
                continue
            if buf.movable:
                candidates.append(buf)
            elif buf.state is not None:
                self._drop(buf)
        return pick_victim(candidates, self.config.eviction, self._visit_serial, self._cursor, target_index,
                           self._stable)

    def _movable_or_drop(self, buf: _PagedBuffer) -> bool:
        """Whether ``buf`` may move; an orphan (its state-dict entry replaced) is dropped."""
        if buf.movable:
            return True
        if buf.state is not None:
            self._drop(buf)
        return False

    def _page_in(self, buf: _PagedBuffer, reason: str) -> bool:
        """Move ``buf`` to the device; on an allocation failure evict and retry. False: it stayed."""
        mover = buf.mover
        while True:
            try:
                started = time.perf_counter()
                new = mover.page_in(buf)
                seconds = time.perf_counter() - started
                self._report_latency(buf, seconds)
                if not mover.asynchronous:
                    self._stats.copy_seconds["in"] += seconds
                break
            except AllocationError:
                self._stats.allocation_failures_total += 1
                victim = self._lru_victim(mover)
                if victim is None or not self._page_out(victim, "capacity"):
                    return False
            except managed.ManagedMemoryError as exc:
                self._warn("prefetch", f"prefetch failed ({exc}); the update reads managed memory where it is")
                return False
        self._move(buf, new, "device")
        buf.arrived_visit = self._visit_serial
        mover.resident[buf.serial] = buf
        self._stats.count_transfer("in", reason, buf.nbytes)
        self._stats.count_step_page_in(buf)
        self.last_moved = (buf.param, buf.key)
        self._notify("in")
        return True

    def _report_latency(self, buf: _PagedBuffer, host_seconds: float) -> None:
        """Tell the sink how long the page-in took: CUDA movers hand over their (start, ready)
        events, resolved by the sink once they completed (no sync here); host and simulated
        movers copy synchronously, so the wall time is the latency."""
        report = getattr(self.sink, "on_prefetch_latency", None)
        if report is None:
            return
        timing = getattr(buf, "timing", None)
        buf.timing = None
        report(timing if timing is not None else host_seconds)

    def _page_out(self, buf: _PagedBuffer, reason: str) -> bool:
        mover = buf.mover
        try:
            started = time.perf_counter()
            new = mover.page_out(buf)
            if not mover.asynchronous:
                self._stats.copy_seconds["out"] += time.perf_counter() - started
        except (AllocationError, managed.ManagedMemoryError) as exc:
            self._stats.allocation_failures_total += 1
            self._warn("page-out", f"could not page {buf.key} out ({exc}); it stays on the device")
            return False
        mover.resident.pop(buf.serial, None)
        self._move(buf, new, "host")
        self._stats.count_transfer("out", reason, buf.nbytes)
        self.last_moved = (buf.param, buf.key)
        self._notify("out")
        return True

    def _move(self, buf: _PagedBuffer, new: torch.Tensor | None, location: str) -> None:
        """Book ``buf`` at ``location``; swap the state-dict entry when the tensor changed."""
        self._account(buf, -1)
        if new is not None:
            old, buf.tensor = buf.tensor, new
            if buf.state is not None and buf.state.get(buf.key) is old:
                buf.state[buf.key] = new
            del old
        buf.location = location
        self._account(buf, +1)

    def _account(self, buf: _PagedBuffer, sign: int) -> None:
        if buf.location == "device":
            buf.mover.device_bytes += sign * buf.nbytes
            self._device_total += sign * buf.nbytes
            if sign > 0:
                buf.mover.resident[buf.serial] = buf
                index = self._victim_indexes.get(id(buf.mover))
                if index is not None:
                    index.add(buf)
                if self._device_total > self._stats.peak_device_bytes:
                    self._stats.peak_device_bytes = self._device_total
            else:
                buf.mover.resident.pop(buf.serial, None)
        else:
            self._host_bytes += sign * buf.nbytes

    def _drop(self, buf: _PagedBuffer) -> None:
        discard = getattr(buf.mover, "discard", None)
        if discard is not None:
            discard(buf)
        self._account(buf, -1)
        bufs = self._buffers.get(buf.param)
        if bufs is not None and bufs.get(buf.key) is buf:
            del bufs[buf.key]
            if not bufs:
                del self._buffers[buf.param]
        buf.state = None
        self._notify("drop")
