"""Device values to the host without waiting for the device.

:class:`HostCopies` copies small device tensors into pinned host buffers with
``non_blocking=True``, records a CUDA event behind each copy and hands a copy back only once
its event has completed (``event.query()``, which never blocks). CPU tensors are already on
the host and come back at the next :meth:`HostCopies.poll`. :class:`StepTimer` times steps on
the device the same way (a pair of timing events per step).

The step therefore never synchronizes for telemetry: values arrive one or a few steps late,
in order. If the device falls more than ``slots`` copies behind, new copies are dropped (and
counted) rather than allocating without bound; callers keep device-side accumulators for
counters, so a dropped copy loses freshness, not counts.

Example:
    >>> import torch
    >>> from pagedopt.telemetry.host_copy import HostCopies
    >>> copies = HostCopies(slots=4)
    >>> copies.submit(("grad_norm", 1), torch.tensor([3.0, 4.0]))
    True
    >>> [(tag, values.tolist()) for tag, values in copies.poll()]
    [(('grad_norm', 1), [3.0, 4.0])]
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Hashable

import numpy as np
import torch


class _Slot:
    """One pinned buffer and the event behind the copy into it."""

    def __init__(self, numel: int, dtype: torch.dtype):
        self.buffer = torch.empty(numel, dtype=dtype, pin_memory=True)
        self.event = torch.cuda.Event()
        self.tag: Hashable = None
        self.length = 0


class HostCopies:
    """Asynchronous device-to-host copies of small 1-D tensors, returned in submission order.

    Args:
        slots: most copies in flight at once (per process); more are dropped and counted in
            :attr:`dropped`.

    Thread safety: :meth:`submit` and :meth:`poll` may be called from different threads.

    Example:
        >>> import torch
        >>> copies = HostCopies(slots=1)
        >>> copies.submit("a", torch.ones(2)), copies.submit("b", torch.ones(2))
        (True, False)
        >>> copies.dropped, [tag for tag, _ in copies.poll()]
        (1, ['a'])
    """

    def __init__(self, slots: int = 8):
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots={slots!r}: must be an integer >= 1")
        self.slots = slots
        self.dropped = 0
        self._lock = threading.Lock()
        self._in_flight: deque[tuple[Hashable, Any]] = deque()  # (tag, _Slot or host tensor)
        self._free: list[_Slot] = []

    def submit(self, tag: Hashable, values: torch.Tensor) -> bool:
        """Start copying ``values`` (1-D) to the host; False if dropped (too many in flight)."""
        values = values.detach().reshape(-1)
        with self._lock:
            if len(self._in_flight) >= self.slots:
                self.dropped += 1
                return False
            if values.device.type != "cuda":
                # Host tensors: a private copy, so later in-place changes cannot leak in.
                self._in_flight.append((tag, values.clone()))
                return True
            slot = self._take_slot(values)
            slot.buffer[: values.numel()].copy_(values, non_blocking=True)
            slot.event.record(torch.cuda.current_stream(values.device))
            slot.tag, slot.length = tag, values.numel()
            self._in_flight.append((tag, slot))
            return True

    def _take_slot(self, values: torch.Tensor) -> _Slot:
        for i, slot in enumerate(self._free):
            if slot.buffer.numel() >= values.numel() and slot.buffer.dtype == values.dtype:
                return self._free.pop(i)
        return _Slot(max(values.numel(), 64), values.dtype)

    def poll(self) -> list[tuple[Hashable, np.ndarray]]:
        """The copies that have completed, oldest first (each is returned once)."""
        done = []
        with self._lock:
            while self._in_flight:
                tag, held = self._in_flight[0]
                if isinstance(held, torch.Tensor):
                    done.append((tag, held.numpy().copy()))
                elif held.event.query():
                    done.append((tag, held.buffer[: held.length].numpy().copy()))
                    self._free.append(held)
                else:
                    break  # later copies are behind this one on the stream
                self._in_flight.popleft()
        return done

    def wait(self) -> list[tuple[Hashable, np.ndarray]]:
        """Block until every copy in flight has completed and return them (outside the step
        only: at the end of training)."""
        with self._lock:
            for _, held in self._in_flight:
                if not isinstance(held, torch.Tensor):
                    held.event.synchronize()
        return self.poll()


class StepTimer:
    """Device time of each step from a pair of CUDA timing events (host time on the CPU).

    :meth:`begin` at the start of the step, :meth:`end` after it; :meth:`poll` returns the
    durations (seconds) of steps whose end event has completed.

    Example:
        >>> from pagedopt.telemetry.host_copy import StepTimer
        >>> timer = StepTimer()
        >>> timer.begin(None); timer.end(None, host_seconds=0.25)
        >>> timer.poll()
        [0.25]
    """

    def __init__(self, max_pending: int = 64):
        self.max_pending = max_pending
        self.dropped = 0
        self._lock = threading.Lock()
        self._pending: deque[Any] = deque()
        self._start: Any = None

    def begin(self, device: torch.device | None) -> None:
        if device is not None and device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(device))
            self._start = start
        else:
            self._start = None

    def end(self, device: torch.device | None, host_seconds: float) -> None:
        with self._lock:
            if len(self._pending) >= self.max_pending:
                self.dropped += 1
                self._start = None
                return
            if self._start is not None and device is not None and device.type == "cuda":
                end = torch.cuda.Event(enable_timing=True)
                end.record(torch.cuda.current_stream(device))
                self._pending.append((self._start, end))
            else:
                self._pending.append(float(host_seconds))
            self._start = None

    def poll(self) -> list[float]:
        out = []
        with self._lock:
            while self._pending:
                head = self._pending[0]
                if isinstance(head, float):
                    out.append(head)
                elif head[1].query():
                    out.append(head[0].elapsed_time(head[1]) / 1000.0)
                else:
                    break
                self._pending.popleft()
        return out


class EventLatencies:
    """Latencies reported as ``(start_event, end_event)`` CUDA pairs or float seconds; read
    once the end event has completed (for the pager's prefetch latency).

    Example:
        >>> from pagedopt.telemetry.host_copy import EventLatencies
        >>> latencies = EventLatencies()
        >>> latencies.add(0.002); latencies.add(0.004)
        >>> latencies.poll()
        [0.002, 0.004]
    """

    def __init__(self, max_pending: int = 4096):
        self.max_pending = max_pending
        self.dropped = 0
        self._lock = threading.Lock()
        self._pending: deque[Any] = deque()

    def add(self, latency: float | tuple[Any, Any]) -> None:
        with self._lock:
            if len(self._pending) >= self.max_pending:
                self.dropped += 1
                return
            self._pending.append(latency)

    def poll(self) -> list[float]:
        out = []
        with self._lock:
            kept: deque[Any] = deque()
            while self._pending:
                item = self._pending.popleft()
                if isinstance(item, (int, float)):
                    out.append(float(item))
                elif item[1].query():
                    out.append(item[0].elapsed_time(item[1]) / 1000.0)
                else:
                    kept.append(item)  # prefetches on several streams may finish out of order
            self._pending = kept
        return out
