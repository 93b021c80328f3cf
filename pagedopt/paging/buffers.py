"""Shared types of the pager: one paged buffer's record, and the pager's warning and error.

Example:
    >>> from pagedopt.paging.buffers import PagingFallbackWarning, AccountingError
    >>> issubclass(PagingFallbackWarning, RuntimeWarning), issubclass(AccountingError, AssertionError)
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .movers import Mover


class PagingFallbackWarning(RuntimeWarning):
    """The pager could not do what the policy asked (allocation failed, paging unavailable)
    and fell back to something slower that keeps every value intact. Each kind of fallback
    warns once per pager; ``stats()`` counts every occurrence.

    Example:
        >>> import warnings
        >>> from pagedopt.paging import PagingFallbackWarning
        >>> warnings.simplefilter("error", PagingFallbackWarning)  # make fallbacks fatal in CI
        >>> warnings.resetwarnings()
    """


class AccountingError(AssertionError):
    """:meth:`Pager.verify_accounting` found a difference between the books and the buffers.

    Example:
        >>> from pagedopt.paging import AccountingError, Pager, PagingConfig
        >>> Pager(PagingConfig(backend="simulated")).verify_accounting()  # raises AccountingError if wrong
    """


@dataclass(eq=False)
class _PagedBuffer:
    """One paged state tensor (``state1`` or ``state2`` of one parameter): internal."""

    serial: int
    param: torch.Tensor
    key: str
    nbytes: int
    mover: Mover
    tensor: torch.Tensor  # the tensor the optimizer's state dict holds
    location: str  # "device" or "host"
    state: dict[str, Any] | None = None  # the optimizer's state dict of ``param`` (bound on visit)
    pins: int = 0
    plan_visit: int = -1  # the visit whose plan lists this buffer (next_use eviction)
    plan_index: int = 0  # its position in that plan
    ready: Any = None  # CUDA: event the update must wait for (a page-in in flight)
    used: Any = None  # CUDA: event after the last update that used the buffer
    timing: Any = None  # CUDA: (start, ready) events of the last page-in, for the latency metric
    home: Any = None  # staged movers: the host copy this buffer keeps for its life
    slot: Any = None  # staged movers: the staging-pool slot it occupies on the device
    out_event: Any = None  # staged CUDA mover: event after its last page-out copy
    arrived_visit: int = -1  # the visit in which it was last paged in
    step_in: int = -1  # the step (pager's count) of its last page-in: thrashing detection

    @property
    def bound(self) -> bool:
        """The optimizer's state dict still holds this buffer's tensor (safe to swap)."""
        return self.state is not None and self.state.get(self.key) is self.tensor

    @property
    def movable(self) -> bool:
        """Whether a move can keep the optimizer's state dict right: movers that replace the
        tensor need the buffer bound to its state dict (it is after the first visit)."""
        return self.bound or not self.mover.swaps_tensors


_UNPAGED = object()  # mover slot for devices whose state stays unpaged
