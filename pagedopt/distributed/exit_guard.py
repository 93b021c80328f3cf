"""A rank that finished its work must not abort while Python exits (a torch/gloo race).

Every ``backward()`` stashes a Python object (its ``contextvars`` context) in torch's
thread-local state, and a collective started during backward (FSDP2's reduce-scatter, DDP's
bucket all-reduce) copies that state. The gloo worker thread that ran the collective may drop
the last reference to it a little after the rank has moved on; freeing it needs the
interpreter lock. If Python is already finalizing by then, the thread is ended inside the
destructor and the whole rank aborts with "terminate called without an active exception"
(core dump: ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllreduceWork`` -> ``~ThreadLocalState``
-> ``take_gil`` -> ``PyThread_exit_thread``) - after its last line of output, so the launcher
reports a failed job that had in fact finished. ``destroy_process_group`` does not join those
threads, so the remedy from Python is to release the lock for a moment before the
interpreter finalizes: :func:`settle_collective_threads`.

Where it runs: :meth:`pagedopt.distributed.DistributedRun.close` (so ``init_distributed``'s
``with`` block and ``pagedopt train``) after destroying the group, and at interpreter exit in
every process whose pagedopt optimizer planned a step while a process group was initialized
(:func:`settle_at_exit`, registered once; ``atexit`` callbacks run before Python starts
finalizing). A script that uses only torch's optimizers calls the function itself. See
docs/distributed.md, "Exiting".

Example:
    >>> from pagedopt.distributed.exit_guard import settle_collective_threads
    >>> settle_collective_threads(0.0)
"""

from __future__ import annotations

import atexit
import time

import torch

# Long enough for a worker thread that is waiting for the interpreter lock to get it, free one
# finished collective and give the lock back; short against any job's exit.
SETTLE_SECONDS = 0.05

_registered = False


def settle_collective_threads(seconds: float = SETTLE_SECONDS) -> None:
    """Release the interpreter lock for ``seconds`` so that collective worker threads can
    free what they hold before Python shuts down (see the module docstring).

    Example:
        >>> settle_collective_threads(0.0)
    """
    time.sleep(seconds)


def settle_at_exit() -> bool:
    """Run :func:`settle_collective_threads` at interpreter exit if a process group is
    initialized now; registers it once per process. Returns whether it is registered.

    Example:
        >>> registered = settle_at_exit()  # False in a process that never initialized a group
    """
    global _registered
    if _registered:
        return True
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    atexit.register(settle_collective_threads)
    _registered = True
    return True
