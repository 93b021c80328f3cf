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
    """A pool could not provide memory (capacity exhausted, or an injected failure)."""


def nbytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of ``shape`` and ``dtype``."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _owned_tensor(nbytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """A CPU tensor whose storage is a fresh numpy buffer (the buffer's lifetime == the storage's)."""
    backing = np.empty(max(nbytes, 1), dtype=np.uint8)
    tensor = torch.from_numpy(backing)[:nbytes].view(dtype).view(shape)
    return tensor, backing


class _Pool:
    """Shared accounting of the two CPU pools."""

    kind = "host"

    def __init__(self, capacity_bytes: int | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.foreign_bytes = 0  # part of used_bytes taken by occupy() (not the pager's)
        self.peak_bytes = 0
        self.allocations = 0
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
        tensor, backing = _owned_tensor(nbytes, shape, dtype)
        self._charge(nbytes)
        weakref.finalize(backing, _Pool._release, weakref.ref(self), self.kind, nbytes).atexit = False
        return tensor

    def occupy(self, nbytes: int) -> torch.Tensor:
        """Foreign memory (activations, another process): a uint8 tensor of ``nbytes``,
        counted against the capacity until it is dropped. Never refused (a real device
        would OOM elsewhere); the pager sees the lower ``free_bytes``."""
        tensor, backing = _owned_tensor(nbytes, (nbytes,), torch.uint8)
        self.foreign_bytes += nbytes
        self._charge(nbytes)
        weakref.finalize(backing, _Pool._release, weakref.ref(self), self.kind, nbytes, True).atexit = False
        return tensor

    def fail_next_allocations(self, count: int = 1) -> None:
        """Fault injection: the next ``count`` calls of :meth:`allocate` raise."""
        self._fail_next = int(count)

    def add_observer(self, fn: Callable[["_Pool"], None]) -> None:
        """Call ``fn(pool)`` after every allocation and release."""
        self._observers.append(fn)

    def _charge(self, nbytes: int) -> None:
        self.used_bytes += nbytes
        self.allocations += 1
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        _count_live(self.kind, nbytes)
        self._notify()

    def _notify(self) -> None:
        for fn in self._observers:
            fn(self)

    @staticmethod
    def _release(pool_ref: "weakref.ref[_Pool]", kind: str, nbytes: int, foreign: bool = False) -> None:
        _count_live(kind, -nbytes)
        pool = pool_ref()
        if pool is not None:
            pool.used_bytes -= nbytes
            if foreign:
                pool.foreign_bytes -= nbytes
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
