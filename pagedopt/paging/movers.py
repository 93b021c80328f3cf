"""Memory backends as "movers": how a state buffer is allocated and moved on one device.

The pager decides *what* moves and *when*; a mover knows *how*:

* :class:`HostMover` (``backend="host"``, CPU parameters): the state lives in accounted host
  memory and never moves; the update runs on it where it is.
* :class:`SimulatedMover` (``backend="simulated"``, CPU parameters): two real pools, a
  :class:`~pagedopt.paging.memory.SimulatedDevice` of fixed capacity and host memory. Paging
  in allocates on the device and copies; paging out allocates on the host and copies; the
  old copy is dropped, so an evicted buffer's device copy is really gone. Moves replace the
  tensor object (``swaps_tensors``): the pager swaps the optimizer's state-dict entry.
* :class:`ManagedMover` (``backend="managed"``, CUDA parameters): one CUDA managed
  allocation per buffer, never replaced; paging is ``cuMemPrefetchAsync`` on a side stream,
  ordered with CUDA events (the compute stream waits on the prefetch event before the
  update; a page-out waits on the event recorded after the buffer's last update).

Example:
    >>> import torch
    >>> from pagedopt.paging.movers import SimulatedMover
    >>> from pagedopt.paging.memory import HostMemory, SimulatedDevice
    >>> mover = SimulatedMover(SimulatedDevice(1 << 20), HostMemory())
    >>> t = mover.allocate((4,), torch.float32, "host", None)
    >>> mover.device.used_bytes, mover.host.used_bytes
    (0, 16)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

import torch

from . import managed
from .memory import HostMemory, SimulatedDevice


class Mover:
    """Base: the per-device bookkeeping the pager maintains, and no-op stream hooks.

    Example:
        >>> import torch
        >>> from pagedopt.paging.movers import Mover
        >>> Mover(torch.device("cpu")).free_bytes() is None
        True
    """

    kind = "host"
    has_device = False  # False: state never leaves the host (nothing to page)
    swaps_tensors = False  # True: a move replaces the tensor object
    hard_capacity = False  # True: free_bytes() is a hard limit (allocations beyond it fail)
    asynchronous = False  # True: moves are queued on streams (host time is not copy time)

    def __init__(self, device: torch.device) -> None:
        self.torch_device = device
        self.device_bytes = 0  # paged bytes resident on this device (kept by the pager)
        # The most paged bytes this device may hold (set by the pager: its device_budget_bytes,
        # or a per-device value from the memory controller); None: no budget.
        self.budget: int | None = None
        self.resident: OrderedDict[int, Any] = OrderedDict()  # serial -> buffer, LRU first

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, where: str, source: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def page_in(self, buf: Any) -> torch.Tensor | None:
        raise NotImplementedError

    def page_out(self, buf: Any) -> torch.Tensor | None:
        raise NotImplementedError

    def free_bytes(self) -> int | None:
        """Free device memory as the pager should see it now (``None``: unknown/unlimited)."""
        return None

    def begin_visit(self) -> None:
        """Called once at the start of every visit (sample slow-to-query values here)."""

    def wait(self, bufs: Iterable[Any]) -> None:
        """Make the compute stream wait until ``bufs`` have arrived (no host sync)."""

    def after_use(self, bufs: Iterable[Any]) -> None:
        """Record that ``bufs`` were just used by the compute stream."""

    def harvest_stall_seconds(self) -> float:
        """Stall time measured since the last call, from completed measurements only."""
        return 0.0

    def synchronize(self) -> None:
        """Wait (on the host) until every transfer issued so far has finished."""


def _fill(tensor: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    if source is None:
        return tensor.zero_()
    return tensor.copy_(source)


class HostMover(Mover):
    """State in plain host memory for CPU training (accounted; never paged).

    Example:
        >>> import torch
        >>> from pagedopt.paging.memory import HostMemory
        >>> from pagedopt.paging.movers import HostMover
        >>> host = HostMemory()
        >>> HostMover(host).allocate((3,), torch.float32, "host", None)
        tensor([0., 0., 0.])
        >>> host.used_bytes
        12
    """

    kind = "host"

    def __init__(self, host: HostMemory) -> None:
        super().__init__(torch.device("cpu"))
        self.host = host

    def allocate(self, shape, dtype, where, source):
        return _fill(self.host.allocate(shape, dtype), source)


class SimulatedMover(Mover):
    """A simulated device and host memory with real copies between them (see module docstring).

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> from pagedopt.paging.memory import HostMemory, SimulatedDevice
        >>> from pagedopt.paging.movers import SimulatedMover
        >>> mover = SimulatedMover(SimulatedDevice(1024), HostMemory())
        >>> buf = SimpleNamespace(tensor=mover.allocate((4,), torch.float32, "host", torch.ones(4)))
        >>> on_device = mover.page_in(buf)
        >>> on_device, mover.device.used_bytes
        (tensor([1., 1., 1., 1.]), 16)
    """

    kind = "simulated"
    has_device = True
    swaps_tensors = True
    hard_capacity = True

    def __init__(self, device: SimulatedDevice, host: HostMemory) -> None:
        super().__init__(torch.device("cpu"))
        self.device = device
        self.host = host

    def allocate(self, shape, dtype, where, source):
        pool = self.device if where == "device" else self.host
        return _fill(pool.allocate(shape, dtype), source)

    def page_in(self, buf: Any) -> torch.Tensor:
        return self.device.allocate(tuple(buf.tensor.shape), buf.tensor.dtype).copy_(buf.tensor)

    def page_out(self, buf: Any) -> torch.Tensor:
        return self.host.allocate(tuple(buf.tensor.shape), buf.tensor.dtype).copy_(buf.tensor)

    def free_bytes(self) -> int | None:
        return self.device.free_bytes


class ManagedMover(Mover):
    """CUDA managed memory on one GPU, prefetched on a side stream (see module docstring).

    Args:
        device: the CUDA device of the parameters.
        preferred: preferred location advice (``"host"``, ``"device"`` or ``None``).
        advise: apply cuMemAdvise hints at all.
        track_free: sample free device memory once per visit (for the pressure watermark).

    Example (needs a GPU with concurrent managed access):
        >>> import torch
        >>> from pagedopt.paging.movers import ManagedMover
        >>> if torch.cuda.is_available():  # doctest: +SKIP
        ...     mover = ManagedMover(torch.device("cuda", 0), "host", True, False)
        ...     t = mover.allocate((1024,), torch.float32, "host", None)
    """

    kind = "managed"
    has_device = True
    asynchronous = True

    def __init__(self, device: torch.device, preferred: str | None, advise: bool, track_free: bool) -> None:
        super().__init__(device)
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.preferred = preferred
        self.advise = advise
        self.track_free = track_free
        self.side = torch.cuda.Stream(device=self.index)
        self._free_sample: int | None = None
        self._free_delta = 0
        self._stalls: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _compute(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.index)

    def allocate(self, shape, dtype, where, source):
        tensor = managed.allocate(shape, dtype, self.index)
        compute = self._compute()
        with torch.cuda.device(self.index):
            if self.advise:
                managed.advise(tensor, self.preferred)
            # Populate the pages where they belong before filling them, and prefetch once more
            # after: a fill may fault pages over, and the last prefetch is what the driver reports.
            managed.prefetch(tensor, where, compute)
            _fill(tensor, source)
            if where != "device":
                managed.prefetch(tensor, where, compute)
        if where == "device":
            self._free_delta -= tensor.numel() * tensor.element_size()
        return tensor

    def _move(self, buf: Any, where: str) -> None:
        if buf.used is not None:
            self.side.wait_event(buf.used)
        timed = where == "device"
        start = torch.cuda.Event(enable_timing=True) if timed else None
        if start is not None:
            start.record(self.side)
        managed.prefetch(buf.tensor, where, self.side)
        event = torch.cuda.Event(enable_timing=timed)
        event.record(self.side)
        buf.ready = event if where == "device" else None
        buf.timing = (start, event) if timed else None  # prefetch latency, read by the pager's sink
        self._free_delta += buf.nbytes if where == "host" else -buf.nbytes

    def page_in(self, buf: Any) -> None:
        self._move(buf, "device")

    def page_out(self, buf: Any) -> None:
        self._move(buf, "host")

    def begin_visit(self) -> None:
        if self.track_free:
            free = managed.device_free_bytes(self.index)
            # Memory torch's caching allocator holds but does not use is free for activations.
            cached = torch.cuda.memory_reserved(self.index) - torch.cuda.memory_allocated(self.index)
            self._free_sample, self._free_delta = free + cached, 0

    def free_bytes(self) -> int | None:
        if self._free_sample is None:
            return None
        return self._free_sample + self._free_delta

    def wait(self, bufs: Iterable[Any]) -> None:
        bufs = [b for b in bufs if b.ready is not None]
        if not bufs:
            return
        compute = self._compute()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(compute)
        for b in bufs:
            compute.wait_event(b.ready)
            b.ready = None
        end.record(compute)
        self._stalls.append((start, end))

    def after_use(self, bufs: Iterable[Any]) -> None:
        event = torch.cuda.Event()
        event.record(self._compute())
        for b in bufs:
            b.used = event

    def harvest_stall_seconds(self) -> float:
        done, waiting, seconds = [], [], 0.0
        for start, end in self._stalls:
            (done if end.query() else waiting).append((start, end))
        for start, end in done:
            seconds += start.elapsed_time(end) / 1000.0
        self._stalls = waiting
        return seconds

    def synchronize(self) -> None:
        self.side.synchronize()
