"""The non-finite gradient elements a step's updates skipped, as the updates report them.

The update kernels count NaN/Inf gradient elements while they read the gradients, so the
non-finite watch (:mod:`pagedopt.optim.nonfinite`) needs no pass of its own over them: a step
opens a tally (:func:`counting`), and

* the CPU update paths - the native backend (``po_update``'s count), its prepared launches, and
  the reference for CPU tensors - add host counts with :func:`report`;
* the CUDA kernels add theirs on the device, atomically, to the watch's running count: the
  backend asks for it with :func:`device_counter` (prepared launches get it when the plan is
  built), so nothing is read on the host.

Outside a tally a report is dropped and no device counter is handed out (the functional API
counts nothing). A context variable holds the tally, so optimizers stepping in different
threads keep theirs apart.

Example:
    >>> from pagedopt.functional import nonfinite_tally
    >>> with nonfinite_tally.counting() as tally:
    ...     nonfinite_tally.report(3)
    ...     nonfinite_tally.report(0)
    >>> tally.count
    3
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch

DeviceCounter = Callable[[torch.device], "torch.Tensor | None"]


class Tally:
    """Non-finite gradient elements skipped by the updates run while it was open: ``count``
    (host reports) and ``device_counter`` (device -> 0-d int64 tensor the kernels add to)."""

    __slots__ = ("count", "device_counter")

    def __init__(self, device_counter: DeviceCounter | None = None) -> None:
        self.count = 0
        self.device_counter = device_counter


_current: ContextVar[Tally | None] = ContextVar("pagedopt_nonfinite_tally", default=None)


@contextmanager
def counting(device_counter: DeviceCounter | None = None) -> Iterator[Tally]:
    """Open a tally for the updates run inside the ``with`` block."""
    tally = Tally(device_counter)
    token = _current.set(tally)
    try:
        yield tally
    finally:
        _current.reset(token)


def active() -> bool:
    """Whether a tally is open (the reference counts only then: its count costs a pass)."""
    return _current.get() is not None


def device_counter(device: torch.device) -> torch.Tensor | None:
    """The 0-d int64 tensor on ``device`` that kernels add their counts to, or None (no tally,
    or the watch does not count on the device this way)."""
    tally = _current.get()
    if tally is None or tally.device_counter is None:
        return None
    return tally.device_counter(device)


def report(count: int) -> None:
    """Add ``count`` skipped elements to the open tally, if any."""
    if count:
        tally = _current.get()
        if tally is not None:
            tally.count += count
