"""Accounted memory pools: host memory and a simulated device of fixed capacity.

Every allocation is a tensor whose storage is owned by a numpy array; a finalizer on that
array returns its bytes to the pool when the storage is really freed (after the last view
or state-dict reference is gone), so a pool's ``used_bytes`` is physical truth, not
bookkeeping. The pager keeps its own logical accounting; tests compare the two.

:class:`SimulatedDevice` stands in for a GPU in tests and memory planning: it refuses
allocations beyond its capacity, can be told to fail allocations (fault injection), can be
filled with foreign allocations (activations, for pressure tests), and calls observers
after every change so a test can check a budget at every transition.

Example:
    >>> import torch
    >>> from pagedopt.paging.memory import SimulatedDevice
    >>> dev = SimulatedDevice(capacity_bytes=1024)
    >>> t = dev.allocate((64,), torch.float32)
    >>> dev.used_bytes, dev.free_bytes
    (256, 768)
    >>> del t
    >>> dev.used_bytes
    0
"""

from __future__ import annotations

import math
import weakref
from typing import Callable

import numpy as np
import torch

# Physical bytes alive in every pool of a kind, process-wide ("host", "simulated", "managed"):
# the leak tests check these return to their baseline after an optimizer is deleted.
_LIVE_BYTES: dict[str, int] = {"host": 0, "simulated": 0, "managed": 0}


def live_bytes(kind: str | None = None) -> int | dict[str, int]:
    """Bytes currently allocated by all pools of ``kind`` (all kinds as a dict when ``None``)."""
    return dict(_LIVE_BYTES) if kind is None else _LIVE_BYTES[kind]


def _count_live(kind: str, delta: int) -> None:
    _LIVE_BYTES[kind] += delta


class AllocationError(RuntimeError):
    """A pool could not provide memory (capacity exhausted, or an injected failure).

    Example:
        >>> import torch
        >>> from pagedopt.paging.memory import AllocationError, SimulatedDevice
        >>> dev = SimulatedDevice(capacity_bytes=8)
        >>> dev.fail_next_allocations(1)
        >>> try:
        ...     dev.allocate((1,), torch.uint8)
        ... except AllocationError as e:
        ...     print(e)
        simulated: injected allocation failure (1 bytes)
    """


def nbytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of ``shape`` and ``dtype``."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _tensor_on(block: np.ndarray, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """A CPU tensor over ``block`` through a fresh numpy view: the view lives exactly as long
    as the tensor's storage, so a finalizer on it sees the storage being freed."""
    view = block[:]
    tensor = torch.from_numpy(view)
    if tensor.numel() != nbytes:
        tensor = tensor[:nbytes]
    if dtype != torch.uint8:
        tensor = tensor.view(dtype)
    if tuple(tensor.shape) != shape:
        tensor = tensor.view(shape)
    return tensor, view


class _Pool:
    """Shared accounting of the two CPU pools, with a caching allocator.

    Like torch's allocators, freed blocks are kept (per exact size, at most the pool's
    high-water mark in total) and reused: the pager moves the same buffers back and forth,
    and fresh host memory would cost page faults on every move. Cached blocks are not
    "used" (they count neither against the capacity nor in :func:`live_bytes`).
    """

    kind = "host"

    def __init__(self, capacity_bytes: int | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.foreign_bytes = 0  # part of used_bytes taken by occupy() (not the pager's)
        self.peak_bytes = 0
        self.cached_bytes = 0
        self.allocations = 0
        self._cache: dict[int, list[np.ndarray]] = {}
        self._fail_next = 0
        self._observers: list[Callable[["_Pool"], None]] = []

    @property
    def free_bytes(self) -> int | None:
        """Capacity minus used bytes (``None`` when the capacity is unlimited)."""
        return None if self.capacity_bytes is None else self.capacity_bytes - self.used_bytes

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor; raises :class:`AllocationError` when it does not fit."""
        shape = tuple(int(s) for s in shape)
        nbytes = nbytes_of(shape, dtype)
        if self._fail_next:
            self._fail_next -= 1
            raise AllocationError(f"{self.kind}: injected allocation failure ({nbytes} bytes)")
        if self.capacity_bytes is not None and self.used_bytes + nbytes > self.capacity_bytes:
            raise AllocationError(
                f"{self.kind}: out of memory allocating {nbytes} bytes "
                f"({self.used_bytes} of {self.capacity_bytes} in use)"
            )
        return self._new(nbytes, shape, dtype, foreign=False)

    def occupy(self, nbytes: int) -> torch.Tensor:
        """Foreign memory (activations, another process): a uint8 tensor of ``nbytes``,
        counted against the capacity until it is dropped. Never refused (a real device
        would OOM elsewhere); the pager sees the lower ``free_bytes``."""
        return self._new(nbytes, (nbytes,), torch.uint8, foreign=True)

    def empty_cache(self) -> None:
        """Release cached free blocks to the system."""
        self._cache.clear()
        self.cached_bytes = 0

    def fail_next_allocations(self, count: int = 1) -> None:
        """Fault injection: the next ``count`` calls of :meth:`allocate` raise."""
        self._fail_next = int(count)

    def add_observer(self, fn: Callable[["_Pool"], None]) -> None:
        """Call ``fn(pool)`` after every allocation and release."""
        self._observers.append(fn)

    def _new(self, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype, foreign: bool) -> torch.Tensor:
        size = max(nbytes, 1)
        cached = self._cache.get(size)
        if cached:
            block = cached.pop()
            self.cached_bytes -= size
        else:
            block = np.empty(size, dtype=np.uint8)
        tensor, view = _tensor_on(block, nbytes, shape, dtype)
        if foreign:
            self.foreign_bytes += nbytes
        self.used_bytes += nbytes
        self.allocations += 1
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        _count_live(self.kind, nbytes)
        finalizer = weakref.finalize(view, _Pool._release, weakref.ref(self), self.kind, nbytes, foreign, block)
        finalizer.atexit = False
        self._notify()
        return tensor

    def _notify(self) -> None:
        for fn in self._observers:
            fn(self)

    @staticmethod
    def _release(pool_ref: "weakref.ref[_Pool]", kind: str, nbytes: int, foreign: bool, block: np.ndarray) -> None:
        _count_live(kind, -nbytes)
        pool = pool_ref()
        if pool is None:
            return
        pool.used_bytes -= nbytes
        if foreign:
            pool.foreign_bytes -= nbytes
        elif pool.cached_bytes + block.nbytes <= pool.peak_bytes:
            pool._cache.setdefault(block.nbytes, []).append(block)
            pool.cached_bytes += block.nbytes
        pool._notify()


class HostMemory(_Pool):
    """Plain host memory, accounted (unlimited unless ``capacity_bytes`` is given).

    Example:
        >>> import torch
        >>> from pagedopt.paging.memory import HostMemory
        >>> host = HostMemory()
        >>> host.allocate((2, 3), torch.uint8).shape
        torch.Size([2, 3])
    """

    kind = "host"


class SimulatedDevice(_Pool):
    """Host memory standing in for a device with a fixed capacity (see the module docstring).

    Args:
        capacity_bytes: the device's memory; ``None`` for unlimited (planning).

    Example:
        >>> import torch
        >>> from pagedopt.paging.memory import SimulatedDevice, AllocationError
        >>> dev = SimulatedDevice(capacity_bytes=100)
        >>> try:
        ...     dev.allocate((200,), torch.uint8)
        ... except AllocationError as e:
        ...     print("refused")
        refused
    """

    kind = "simulated"
