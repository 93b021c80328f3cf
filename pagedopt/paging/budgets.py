"""Device budgets of the pager: one per device that holds paged state.

A mixin of :class:`~pagedopt.paging.Pager`. ``device_budget_bytes`` is the pager-wide
default; each device mover carries its own budget, so a model spread over two devices is
budgeted per device (the memory controller sets them from each device's own memory
readings, :mod:`pagedopt.paging.controller`).

Example:
    >>> from pagedopt.paging import Pager
    >>> from pagedopt.paging.budgets import BudgetMixin
    >>> issubclass(Pager, BudgetMixin)
    True
"""

from __future__ import annotations

import torch

from .movers import Mover
from .staged import StagedMover


class BudgetMixin:
    """Setting and reading the per-device budgets (see the module docstring).

    Example:
        >>> from pagedopt.paging import Pager, PagingConfig
        >>> Pager(PagingConfig(backend="simulated")).device_budgets()
        {}
    """

    def set_budget(self, budget: int | None, device: torch.device | str | None = None) -> None:
        """Change ``device_budget_bytes`` between steps (the memory controller does): state above
        the new budget leaves the device now (reason ``budget``), and the staging pool keeps no
        more than the budget reserved.

        ``device``: only the state of parameters on that device (``"cuda:1"``; ``"cpu"`` for
        the simulated device, which serves CPU parameters) gets the new budget - a model
        spread over two GPUs has one budget per GPU. ``None``: every device, and devices that
        get state later.

        Example:
            >>> import torch
            >>> from pagedopt.paging import Pager, PagingConfig
            >>> pager = Pager(PagingConfig(policy="budgeted", backend="simulated", device_budget_bytes=4096,
            ...                             min_paged_numel=1))
            >>> _ = pager.zeros(torch.zeros(2048), "state1", (2048,), torch.float32)
            >>> pager.set_budget(1024, device="cpu")
            >>> pager.budget, pager.device_budgets()
            (4096, {'cpu': 1024})
        """
        if budget is not None and budget < 0:
            raise ValueError(f"set_budget: budget must be >= 0 bytes or None, got {budget}")
        budget = None if budget is None else int(budget)
        if device is None:
            self.budget = budget
            movers = self._device_movers()
        else:
            device = torch.device(device)
            movers = [m for d, m in self.movers_by_device().items() if d == device]
            if not movers:
                known = sorted(str(m.torch_device) for m in self._device_movers())
                raise ValueError(f"set_budget: device {str(device)!r} holds no paged state of this pager "
                                 f"(its devices: {known})")
        for mover in movers:
            mover.budget = budget
            if isinstance(mover, StagedMover):
                mover.pool.limit = budget
                if budget is not None and mover.pool.reserved_bytes > budget:
                    mover.release_idle()
            if budget is not None:
                self._make_room(mover, 0)

    def movers_by_device(self) -> dict[torch.device, Mover]:
        """The mover of each parameter device whose paged state can be on a device (for the
        memory controller, which budgets each physical device on its own)."""
        movers = self._device_movers()
        return {d: m for d, m in self._movers.items() if m in movers}

    def paged_bytes_on(self, mover: Mover) -> int:
        """Bytes of all paged state ``mover`` serves, wherever it is now."""
        return sum(b.nbytes for bufs in self._buffers.values() for b in bufs.values() if b.mover is mover)

    def device_budgets(self) -> dict[str, int | None]:
        """The budget of each device that holds paged state (keyed by the parameters' device)."""
        return {str(d): m.budget for d, m in self.movers_by_device().items()}

    def _plan_budget(self) -> int | None:
        """The budget the stable resident set is planned against: the one device's budget
        (the usual case), else the pager-wide one."""
        movers = self._device_movers()
        return movers[0].budget if len(movers) == 1 else self.budget
