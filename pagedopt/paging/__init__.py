"""Paging of optimizer state between device and host memory.

Paged optimizers (``PagedAdamW8bit`` & co., or any optimizer given ``paging=``) get a
:class:`Pager` as their state store: it allocates state from a memory backend (CUDA managed
memory, host memory, or a simulated device), moves it under a policy (``on_demand``,
``pipelined``, ``offload``, ``budgeted``) and accounts every byte (``optimizer.pager.stats()``).

Example:
    >>> import torch, pagedopt
    >>> from pagedopt.paging import PagingConfig
    >>> model = torch.nn.Linear(512, 512)
    >>> opt = pagedopt.PagedAdamW8bit(model.parameters(), paging=PagingConfig(
    ...     policy="offload", backend="simulated", simulated_capacity_bytes="1MiB", min_paged_numel=4096))
    >>> model(torch.randn(4, 512)).sum().backward(); opt.step()
    >>> s = opt.pager.stats()
    >>> s["device_bytes"], s["host_bytes"], s["page_in_bytes"] == s["page_out_bytes"] > 0
    (0, 524288, True)
"""

from __future__ import annotations

from .config import MemoryConfig, PagingConfig, parse_bytes
from .controller import MemoryController, MemorySample, guarded_step
from .guard import StepGuard
from .memory import AllocationError, HostMemory, SimulatedDevice, live_bytes
from .pager import AccountingError, Pager, PagingFallbackWarning
from .store import DeviceStateStore, StateStore


def make_state_store(config: PagingConfig) -> StateStore:
    """The state store of a paged optimizer: a :class:`Pager` for ``config``."""
    return Pager(config)


__all__ = [
    "MemoryConfig", "MemoryController", "MemorySample", "StepGuard", "guarded_step",
    "PagingConfig", "StateStore", "DeviceStateStore", "Pager", "PagingFallbackWarning", "AccountingError",
    "AllocationError", "HostMemory", "SimulatedDevice", "live_bytes", "make_state_store", "parse_bytes",
]
