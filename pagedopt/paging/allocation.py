"""The pager's allocation concern: which mover serves a device, and where new state goes.

A mixin of :class:`~pagedopt.paging.Pager` (it uses the pager's config, pools, books and
warnings); kept apart so the scheduling loop reads on its own.

Example:
    >>> from pagedopt.paging import Pager
    >>> from pagedopt.paging.allocation import AllocationMixin
    >>> issubclass(Pager, AllocationMixin)
    True
"""

from __future__ import annotations

from typing import Any

import torch

from ..shards import local_tensor as _local
from . import managed
from .buffers import _UNPAGED, _PagedBuffer
from .memory import AllocationError, nbytes_of
from .movers import HostMover, ManagedMover, Mover, SimulatedMover
from .staged import PinnedStagedMover, SimulatedStagedMover


class AllocationMixin:
    """Mover selection and state creation (see the module docstring).

    Example:
        >>> from pagedopt.paging import Pager, PagingConfig
        >>> Pager(PagingConfig(policy="offload", backend="simulated"))._staged()
        True
    """


    def _mover_for(self, param: torch.Tensor) -> Any:
        device = _local(param).device
        found = self._movers.get(device)
        if found is None:
            found = self._movers[device] = self._make_mover(device)
            if found is not _UNPAGED:
                found.budget = self.budget  # a device starts with the pager-wide budget
            self._device_mover_list = None
        return found

    def _make_mover(self, device: torch.device) -> Any:
        backend = self.config.backend
        if device.type == "cpu":
            if backend == "managed":
                raise ValueError(
                    "PagingConfig(backend='managed') pages CUDA state, but a parameter is on the CPU; "
                    "use backend='host', 'simulated' or 'auto'"
                )
            if backend == "simulated":
                assert self.simulated_device is not None
                if self._staged():
                    return SimulatedStagedMover(self.simulated_device, self.host_memory, self.budget,
                                                self.config.chunk_bytes)
                return SimulatedMover(self.simulated_device, self.host_memory)
            return HostMover(self.host_memory)
        if device.type == "cuda":
            if backend in ("host", "simulated"):
                raise ValueError(
                    f"PagingConfig(backend={backend!r}) keeps state in host memory for CPU parameters, "
                    f"but a parameter is on {device}; use backend='managed' or 'auto'"
                )
            index = device.index if device.index is not None else torch.cuda.current_device()
            if backend != "managed" and self._staged():
                return PinnedStagedMover(torch.device("cuda", index), self.budget, self.reserve > 0,
                                         self.config.chunk_bytes)
            ok, why = managed.availability(index)
            if ok:
                preferred = "host" if self.policy.name in ("offload", "budgeted") else None
                return ManagedMover(torch.device("cuda", index), preferred, self.config.managed_advise, self.reserve > 0)
            if backend == "managed":
                raise ValueError(f"PagingConfig(backend='managed') cannot page state on {device}: {why}")
            self._warn("unavailable", f"paging is unavailable on {device} ({why}); its optimizer state stays unpaged")
            return _UNPAGED
        self._warn(f"device:{device.type}", f"paging does not support {device.type} parameters; their state stays unpaged")
        return _UNPAGED

    def _staged(self) -> bool:
        """Whether state moves through a host home and a staging pool (see PagingConfig.transfer)."""
        if self.config.transfer == "auto":
            return self.policy.name in ("offload", "budgeted")
        return self.config.transfer == "staged"

    def _pages(self, param: torch.Tensor, mover: Any) -> bool:
        return mover is not _UNPAGED and param.numel() >= max(self.config.min_paged_numel, 1)

    def _create(
        self, param: torch.Tensor, key: str, shape: tuple[int, ...], dtype: torch.dtype, source: torch.Tensor | None
    ) -> torch.Tensor:
        mover = self._mover_for(param)
        old = self._buffers.get(param, {}).get(key)
        if old is not None:
            self._drop(old)
        if not self._pages(param, mover):
            return self._create_unpaged(param, key, shape, dtype, source)
        nbytes = nbytes_of(shape, dtype)
        where = self._placement(mover, nbytes) if source is None else "host"
        try:
            tensor = mover.allocate(shape, dtype, where, source)
        except (AllocationError, managed.ManagedMemoryError) as exc:
            self._stats.allocation_failures_total += 1
            self._stats.allocation_fallbacks_total += 1
            self._warn("alloc", f"could not allocate {nbytes} bytes of paged {key} ({exc}); keeping it unpaged")
            return self._create_unpaged(param, key, shape, dtype, source)
        buf = _PagedBuffer(next(self._serials), param, key, nbytes, mover, tensor, where)
        self._buffers.setdefault(param, {})[key] = buf
        self._account(buf, +1)
        self._notify("alloc")
        return tensor

    def _create_unpaged(self, param, key, shape, dtype, source) -> torch.Tensor:
        device = _local(param).device
        tensor = torch.zeros(shape, dtype=dtype, device=device) if source is None else source.to(device)
        self._record_unpaged(param, key, tensor)
        return tensor

    def _record_unpaged(self, param: torch.Tensor, key: str, tensor: torch.Tensor) -> None:
        entry = self._unpaged.setdefault(param, {})
        self._unpaged_bytes += tensor.numel() * tensor.element_size() - entry.get(key, 0)
        entry[key] = tensor.numel() * tensor.element_size()

    def _placement(self, mover: Mover, nbytes: int) -> str:
        """Where new state goes: the policy's home, if the device has room without evicting.

        State of movers that replace tensors starts on the host: until the first visit
        binds it to its state dict, the pager could not evict it, and state that cannot be
        evicted must never sit on the device.
        """
        if not mover.has_device or self.policy.home == "host" or mover.swaps_tensors:
            return "host"
        if self.budget is not None and mover.device_bytes + nbytes > self.budget:
            return "host"
        free = mover.free_bytes()
        if free is not None and free - nbytes < self.reserve:
            return "host"
        return "device"
