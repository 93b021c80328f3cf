"""Preemption: a signal asks the run to stop after the current step, never inside it.

SIGTERM (Kubernetes, Slurm at the end of a job, torchrun stopping its workers), SIGINT
(Ctrl-C) and SIGUSR1 (Slurm's ``--signal=USR1@SECONDS`` warning before a time limit) only set
a flag. The training loop looks at the flag between steps, so the optimizer state is never
torn: the step that was running finishes, a checkpoint is written, and the run ends.

- A second signal while the checkpoint is being written is ignored until it is done.
- A second SIGINT at any other time aborts at once (:class:`TrainingAborted`, a
  ``KeyboardInterrupt``): nothing is written, the previous checkpoints stay as they were.

Handlers can only be installed in the main thread; elsewhere the guard is inert (``active``
is false) and the run cannot be preempted by signals.

Example:
    >>> import os, signal
    >>> from pagedopt.train.preemption import PreemptionGuard
    >>> with PreemptionGuard() as guard:
    ...     os.kill(os.getpid(), signal.SIGUSR1)
    ...     guard.requested, guard.signal_name
    (True, 'SIGUSR1')
"""

from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Any, Iterator

PREEMPTION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class TrainingAborted(KeyboardInterrupt):
    """A second Ctrl-C outside a checkpoint save: the run stops at once and writes nothing.

    Example:
        >>> isinstance(TrainingAborted("second interrupt"), KeyboardInterrupt)
        True
    """


class PreemptionGuard:
    """Turns preemption signals into a flag for the duration of a ``with`` block.

    ``requested`` is set by the first signal; ``signal_name`` says which. Use
    :meth:`saving` around the checkpoint write to hold off a second signal.

    Example:
        >>> guard = PreemptionGuard()
        >>> with guard:
        ...     with guard.saving():
        ...         guard._handle(signal.SIGINT, None); guard._handle(signal.SIGINT, None)
        >>> guard.requested, guard.ignored
        (True, 1)
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self.ignored = 0  # signals received after the first one, while saving
        self.active = False
        self._saving = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self.active = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            return
        if self._saving:
            self.ignored += 1
            return
        if signum == signal.SIGINT:
            raise TrainingAborted(f"second interrupt ({signal.Signals(signum).name}): aborting without a checkpoint")

    def request(self, reason: str = "requested") -> None:
        """Ask for a stop as a signal would (e.g. another rank was signalled)."""
        if not self.requested:
            self.requested = True
            self.signal_name = reason

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """While the body runs (a checkpoint write), further signals are counted, not acted on."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False
