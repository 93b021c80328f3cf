"""The non-finite gradient elements a step's CPU updates skipped, as the updates report them.

The native CPU kernels count NaN/Inf gradient elements while they read the gradients
(``po_update``'s count), so the non-finite watch (:mod:`pagedopt.optim.nonfinite`) needs no
pass of its own over CPU gradients: a step opens a tally (:func:`counting`) and the CPU update
paths - the native backend, its prepared launches, and the reference for CPU tensors - add to
it with :func:`report`. Outside a tally a report is dropped (the functional API counts nothing).
A context variable holds the tally, so optimizers stepping in different threads keep theirs apart.

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
from typing import Iterator


class Tally:
    """Non-finite gradient elements skipped by the updates run while it was open."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


_current: ContextVar[Tally | None] = ContextVar("pagedopt_nonfinite_tally", default=None)


@contextmanager
def counting() -> Iterator[Tally]:
    """Open a tally for the updates run inside the ``with`` block."""
    tally = Tally()
    token = _current.set(tally)
    try:
        yield tally
    finally:
        _current.reset(token)


def active() -> bool:
    """Whether a tally is open (the reference counts only then: its count costs a pass)."""
    return _current.get() is not None


def report(count: int) -> None:
    """Add ``count`` skipped elements to the open tally, if any."""
    if count:
        tally = _current.get()
        if tally is not None:
            tally.count += count
