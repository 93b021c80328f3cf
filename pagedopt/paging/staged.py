"""Staged movers: state that leaves the device moves through a host home and a device staging pool.

For ``offload`` and ``budgeted`` the device copy of a buffer is temporary and the host copy
is its *home*: a buffer gets one host allocation (pinned memory on CUDA) the first time it
leaves the device and keeps it for its life, and device copies come from a
:class:`StagingPool` of device slots reused by exact size. In the steady state a step
allocates nothing: a page-in is one copy home -> slot, a page-out one copy slot -> home.
This is the transfer floor the issue asks for: managed-memory migration (12-17 GB/s on an
H200) is replaced by explicit copies at link speed (~55 GB/s pinned).

* :class:`SimulatedStagedMover` (``backend="simulated"``): the slots are allocations of the
  :class:`~pagedopt.paging.memory.SimulatedDevice` (they count against its capacity while the
  pool holds them, in use or idle), homes come from host memory; copies are synchronous.
* :class:`PinnedStagedMover` (CUDA parameters): slots are ordinary device memory from torch's
  allocator, homes are pinned host tensors; page-ins run on a dedicated host-to-device stream
  and page-outs on a dedicated device-to-host stream, ordered by CUDA events (the compute
  stream waits for a page-in before the update; a page-out waits for the update; a reused
  slot waits for the copy that last read it). No host synchronization in the step.

Large buffers are copied in pieces of at most ``chunk_bytes`` (each piece one copy), so a
single 1-GB state does not occupy a copy engine as one indivisible transfer. The update itself
still runs per parameter (see docs/paging.md, "Limits").

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from pagedopt.paging.memory import HostMemory, SimulatedDevice
    >>> from pagedopt.paging.staged import SimulatedStagedMover
    >>> mover = SimulatedStagedMover(SimulatedDevice(1 << 20), HostMemory(), budget=None)
    >>> buf = SimpleNamespace(tensor=mover.allocate((4,), torch.float32, "host", torch.ones(4)),
    ...                       home=None, slot=None, nbytes=16, used=None, ready=None)
    >>> on_device = mover.page_in(buf)
    >>> back = mover.page_out(buf)
    >>> back is buf.home, mover.pool.idle_bytes, mover.pool.reserved_bytes
    (True, 16, 16)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .memory import AllocationError, HostMemory, SimulatedDevice
from .movers import Mover, _fill

DEFAULT_CHUNK_BYTES = 64 << 20


def _view(slot: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The slot's bytes as a tensor of ``shape`` and ``dtype``."""
    t = slot if dtype == torch.uint8 else slot.view(dtype)
    return t.view(shape)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def copy_chunked(dst: torch.Tensor, src: torch.Tensor, chunk_bytes: int, non_blocking: bool = False) -> int:
    """Copy ``src`` into ``dst`` (same size, contiguous) in pieces of at most ``chunk_bytes``.
    Returns the number of pieces."""
    if dst.numel() * dst.element_size() <= chunk_bytes:
        dst.copy_(src, non_blocking=non_blocking)
        return 1
    d, s = _flat_bytes(dst), _flat_bytes(src)
    n = d.numel()
    pieces = 0
    for start in range(0, n, chunk_bytes):
        end = min(n, start + chunk_bytes)
        d[start:end].copy_(s[start:end], non_blocking=non_blocking)
        pieces += 1
    return pieces


class StagingPool:
    """Device slots (flat uint8 tensors) reused by exact byte size.

    ``take`` returns an idle slot of the size or allocates one; ``give`` returns it. Idle
    slots stay reserved (no allocation in the steady state) while the pool's reserved bytes
    are within ``limit`` (without one: the most bytes ever in use at once); beyond it, or when a new slot does not fit, idle slots of other
    sizes are released first. Each idle slot remembers the event after which it may be
    overwritten (CUDA: the page-out copy that read it).

    Args:
        allocate: ``nbytes -> flat uint8 tensor`` on the device (raises when it cannot).
        limit: most bytes the pool keeps reserved (``None``: its high-water mark).

    Example:
        >>> import torch
        >>> from pagedopt.paging.staged import StagingPool
        >>> pool = StagingPool(lambda n: torch.empty(n, dtype=torch.uint8), limit=None)
        >>> a, _ = pool.take(100); pool.give(a, None)
        >>> b, _ = pool.take(100); b is a, pool.allocations
        (True, 1)
    """

    def __init__(self, allocate: Callable[[int], torch.Tensor], limit: int | None) -> None:
        self._allocate = allocate
        self.limit = limit
        self._idle: dict[int, list[tuple[torch.Tensor, Any]]] = {}
        self.idle_bytes = 0
        self.in_use_bytes = 0
        self.peak_in_use_bytes = 0
        self.allocations = 0
        self.allocated_bytes_total = 0  # bytes ever allocated (CUDA: free-memory estimate)
        self.on_release: Callable[[], None] | None = None  # CUDA: order frees after copies

    def _cap(self, need: int) -> int:
        """Most bytes to keep reserved: the limit, or without one the peak in-flight bytes."""
        if self.limit is not None:
            return self.limit
        return max(self.peak_in_use_bytes, need)

    @property
    def reserved_bytes(self) -> int:
        return self.idle_bytes + self.in_use_bytes

    def take(self, nbytes: int) -> tuple[torch.Tensor, Any]:
        """``(slot, event)``: the slot and the event a writer must wait for (or ``None``)."""
        idle = self._idle.get(nbytes)
        if idle:
            slot, event = idle.pop()
            self.idle_bytes -= nbytes
            self.in_use_bytes += nbytes
            return slot, event
        if self.reserved_bytes + nbytes > self._cap(self.in_use_bytes + nbytes):
            self.release_idle()
        try:
            slot = self._allocate(nbytes)
        except (AllocationError, torch.OutOfMemoryError):
            if not self.idle_bytes:
                raise
            self.release_idle()
            slot = self._allocate(nbytes)
        self.allocations += 1
        self.allocated_bytes_total += nbytes
        self.in_use_bytes += nbytes
        self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
        return slot, None

    def give(self, slot: torch.Tensor, event: Any) -> None:
        nbytes = slot.numel()
        self.in_use_bytes -= nbytes
        if self.reserved_bytes + nbytes > self._cap(0):
            if self.on_release is not None:
                self.on_release()  # CUDA: the free must come after the copies still reading it
            return  # over the limit: let it go (freed with its last reference)
        self._idle.setdefault(nbytes, []).append((slot, event))
        self.idle_bytes += nbytes

    def release_idle(self) -> int:
        """Free every idle slot; returns the bytes released."""
        released = self.idle_bytes
        if released and self.on_release is not None:
            self.on_release()
        self._idle.clear()
        self.idle_bytes = 0
        return released


class StagedMover(Mover):
    """Shared logic of the staged movers (see the module docstring).

    Subclasses provide ``_alloc_home(shape, dtype)``, ``_copy_in(buf, dst, home, slot_event)``
    (returns the ready event or ``None``) and ``_copy_out(buf, home, src)`` (returns the
    event after which the slot is free, or ``None``).

    Example:
        >>> from pagedopt.paging.staged import StagedMover, SimulatedStagedMover
        >>> issubclass(SimulatedStagedMover, StagedMover)
        True
    """

    has_device = True
    swaps_tensors = True
    transfer = "staged"

    def __init__(self, device: torch.device, pool: StagingPool, chunk_bytes: int) -> None:
        super().__init__(device)
        self.pool = pool
        self.chunk_bytes = max(1, int(chunk_bytes))
        self.copy_pieces = 0  # copies issued (a buffer above chunk_bytes takes several)

    # -- allocation --------------------------------------------------------------------------

    def allocate(self, shape, dtype, where, source):
        if where == "device":
            slot, _event = self.pool.take(_nbytes(shape, dtype))
            return _fill(_view(slot, shape, dtype), source)
        return _fill(self._alloc_home(shape, dtype), source)

    def page_in(self, buf: Any) -> torch.Tensor:
        home = buf.tensor if buf.home is None else buf.home
        slot, slot_event = self.pool.take(buf.nbytes)
        dst = _view(slot, tuple(home.shape), home.dtype)
        try:
            buf.ready = self._copy_in(buf, dst, home, slot_event)
        except BaseException:
            self.pool.give(slot, slot_event)
            raise
        buf.home, buf.slot = home, slot
        return dst

    def page_out(self, buf: Any) -> torch.Tensor:
        home = buf.home if buf.home is not None else self._alloc_home(tuple(buf.tensor.shape), buf.tensor.dtype)
        slot = buf.slot if buf.slot is not None else _flat_bytes(buf.tensor)
        free_after = self._copy_out(buf, home, buf.tensor)
        buf.home, buf.slot, buf.ready = home, None, None
        self.pool.give(slot, free_after)
        return home

    def discard(self, buf: Any) -> None:
        """The pager dropped ``buf`` (state forgotten or replaced): return its slot."""
        if buf.location == "device":
            slot = buf.slot if buf.slot is not None else _flat_bytes(buf.tensor)
            self.pool.give(slot, getattr(buf, "used", None))
        buf.slot = None
        buf.home = None

    def release_idle(self) -> int:
        """Give idle staging slots back to the device (pressure, a lower budget, OOM)."""
        return self.pool.release_idle()

    @property
    def idle_device_bytes(self) -> int:
        return self.pool.idle_bytes

    def home_bytes_of_resident(self) -> int:
        """Host bytes held as homes of buffers that are on the device now."""
        return sum(b.nbytes for b in self.resident.values() if b.home is not None)

    def _alloc_home(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def _copy_in(self, buf: Any, dst: torch.Tensor, home: torch.Tensor, slot_event: Any) -> Any:
        raise NotImplementedError

    def _copy_out(self, buf: Any, home: torch.Tensor, src: torch.Tensor) -> Any:
        raise NotImplementedError


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class SimulatedStagedMover(StagedMover):
    """Staged paging on the simulated device (CPU parameters; synchronous copies).

    Args:
        device: the simulated device (slots are its allocations).
        host: host memory (homes).
        budget: the pager's device budget (the pool keeps at most this much reserved).
        chunk_bytes: largest single copy.

    Example:
        >>> import torch
        >>> from pagedopt.paging.memory import HostMemory, SimulatedDevice
        >>> from pagedopt.paging.staged import SimulatedStagedMover
        >>> mover = SimulatedStagedMover(SimulatedDevice(1024), HostMemory(), budget=512)
        >>> mover.allocate((8,), torch.float32, "device", None).sum().item(), mover.pool.in_use_bytes
        (0.0, 32)
    """

    kind = "simulated"
    hard_capacity = True

    def __init__(self, device: SimulatedDevice, host: HostMemory, budget: int | None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        pool = StagingPool(lambda n: device.allocate((n,), torch.uint8), limit=budget)
        super().__init__(torch.device("cpu"), pool, chunk_bytes)
        self.device = device
        self.host = host

    def _alloc_home(self, shape, dtype):
        return self.host.allocate(shape, dtype)

    def _copy_in(self, buf, dst, home, slot_event):
        self.copy_pieces += copy_chunked(dst, home, self.chunk_bytes)
        return None

    def _copy_out(self, buf, home, src):
        self.copy_pieces += copy_chunked(home, src, self.chunk_bytes)
        return None

    def free_bytes(self) -> int | None:
        # Idle slots are device memory the pager can use for state without allocating.
        free = self.device.free_bytes
        return None if free is None else free + self.pool.idle_bytes


class PinnedStagedMover(StagedMover):
    """Staged paging on one GPU: pinned host homes, device slots, two copy streams.

    Args:
        device: the CUDA device of the parameters.
        budget: the pager's device budget (most bytes the staging pool keeps reserved).
        track_free: sample free device memory once per visit (pressure watermark).
        chunk_bytes: largest single copy.

    Example (needs a GPU):
        >>> import torch
        >>> from pagedopt.paging.staged import PinnedStagedMover
        >>> if torch.cuda.is_available():  # doctest: +SKIP
        ...     mover = PinnedStagedMover(torch.device("cuda", 0), budget=None, track_free=False)
    """

    kind = "pinned"
    asynchronous = True

    def __init__(self, device: torch.device, budget: int | None, track_free: bool,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.index = index
        pool = StagingPool(lambda n: torch.empty(n, dtype=torch.uint8, device=torch.device("cuda", index)), limit=budget)
        super().__init__(torch.device("cuda", index), pool, chunk_bytes)
        self.h2d = torch.cuda.Stream(device=index)
        self.d2h = torch.cuda.Stream(device=index)
        pool.on_release = self._before_release
        self.track_free = track_free
        self._free_sample: int | None = None
        self._allocated_at_sample = 0

    def _compute(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.index)

    def _before_release(self) -> None:
        # Slots were allocated on the compute stream; freeing them lets the allocator hand
        # the memory to later compute work, so that work must come after every copy.
        compute = self._compute()
        compute.wait_stream(self.h2d)
        compute.wait_stream(self.d2h)

    def _alloc_home(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def _copy_in(self, buf, dst, home, slot_event):
        stream = self.h2d
        if slot_event is not None:
            stream.wait_event(slot_event)  # the slot's previous page-out has read it
        out_event = getattr(buf, "out_event", None)
        if out_event is not None:
            stream.wait_event(out_event)  # the home holds the last page-out's bytes
        else:
            stream.wait_stream(self._compute())  # freshly created/filled on the compute stream
        with torch.cuda.stream(stream):
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            self.copy_pieces += copy_chunked(dst, home, self.chunk_bytes, non_blocking=True)
            ready = torch.cuda.Event(enable_timing=True)
            ready.record(stream)
        buf.timing = (start, ready)  # page-in latency on the GPU timeline, read by the pager's sink
        return ready

    def _copy_out(self, buf, home, src):
        stream = self.d2h
        if buf.used is not None:
            stream.wait_event(buf.used)  # the update that last wrote the slot
        else:
            stream.wait_stream(self._compute())
        if buf.ready is not None:
            stream.wait_event(buf.ready)
        with torch.cuda.stream(stream):
            self.copy_pieces += copy_chunked(home, src, self.chunk_bytes, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        buf.out_event = done
        return done

    def begin_visit(self) -> None:
        if self.track_free:
            free, _total = torch.cuda.mem_get_info(self.index)
            cached = torch.cuda.memory_reserved(self.index) - torch.cuda.memory_allocated(self.index)
            self._free_sample = free + cached
            self._allocated_at_sample = self.pool.allocated_bytes_total

    def free_bytes(self) -> int | None:
        if self._free_sample is None:
            return None
        grown = self.pool.allocated_bytes_total - self._allocated_at_sample
        return self._free_sample - grown + self.pool.idle_bytes

    def wait(self, bufs: Iterable[Any]) -> None:
        compute = self._compute()
        for b in bufs:
            if b.ready is not None:
                compute.wait_event(b.ready)
                b.ready = None

    def after_use(self, bufs: Iterable[Any]) -> None:
        event = torch.cuda.Event()
        event.record(self._compute())
        for b in bufs:
            b.used = event

    def synchronize(self) -> None:
        self.h2d.synchronize()
        self.d2h.synchronize()
