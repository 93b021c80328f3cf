"""Checking the pager's books against its buffers and the memory pools' real allocations.

Staged movers keep a host home for every buffer (also while it is on the device) and idle
staging slots on the device; the physical checks count both.

Example:
    >>> from pagedopt.paging import Pager, PagingConfig
    >>> from pagedopt.paging.accounting import verify
    >>> verify(Pager(PagingConfig(backend="simulated")), physical=True)  # raises AccountingError if wrong
"""

from __future__ import annotations

from typing import Any

from .buffers import AccountingError
from .staged import StagedMover


def verify(pager: Any, physical: bool = True) -> None:
    """Raise :class:`~pagedopt.paging.AccountingError` unless ``pager``'s books match its
    buffers (and, with ``physical``, the host-memory pools' real allocations)."""
    bufs = [b for d in pager._buffers.values() for b in d.values()]
    on_device = sum(b.nbytes for b in bufs if b.location == "device")
    on_host = sum(b.nbytes for b in bufs if b.location == "host")
    problems = []
    if on_device != pager.device_bytes:
        problems.append(f"device_bytes {pager.device_bytes} != buffers on device {on_device}")
    if on_host != pager._host_bytes:
        problems.append(f"host_bytes {pager._host_bytes} != buffers on host {on_host}")
    for mover in pager._device_movers():
        listed = sum(b.nbytes for b in mover.resident.values())
        if listed != mover.device_bytes:
            problems.append(f"{mover.kind}: LRU list holds {listed} bytes, books say {mover.device_bytes}")
    for b in bufs:
        if b.nbytes != b.tensor.numel() * b.tensor.element_size():
            problems.append(f"{b.key} of a {tuple(b.param.shape)} parameter: size changed")
    if physical:
        staged = [m for m in pager._device_movers() if isinstance(m, StagedMover)]
        idle = sum(m.idle_device_bytes for m in staged)  # staging slots the pool keeps
        homes = sum(m.home_bytes_of_resident() for m in staged)  # host copies of resident state
        on_host_pool = sum(
            b.nbytes for b in bufs if b.location == "host" and getattr(b.mover, "host", None) is pager.host_memory
        )
        if pager.simulated_device is not None:
            held = pager.simulated_device.used_bytes - pager.simulated_device.foreign_bytes
            if held != on_device + idle:
                problems.append(f"simulated device holds {held} bytes of state, buffers on device {on_device}"
                                + (f" + {idle} idle staging bytes" if idle else ""))
        if pager.host_memory.used_bytes != on_host_pool + homes:
            problems.append(f"host memory holds {pager.host_memory.used_bytes} bytes, buffers on host {on_host_pool}"
                            + (f" + {homes} bytes of homes of resident state" if homes else ""))
    if problems:
        raise AccountingError("; ".join(problems))
