"""The guarded training step: catch ``torch.OutOfMemoryError`` in forward, backward or
``optimizer.step()``, let the :class:`~pagedopt.paging.controller.MemoryController` recover
memory, and retry without losing or double-applying an update.

What makes a retry safe is a journal: every parameter whose update ran (a per-item chunk or
a prepared multi-tensor launch) is recorded and skipped when the step runs again, the step
counters and clipping histories of the others are restored, and torch's generators are
rewound so the retried batch draws the same dropout masks. Once an update is applied
outside the retried step (``optimizer.step()`` returned, or update-in-backward updated a
parameter), the body is never run again: the error propagates after the recovery.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch

# (``controller`` arguments are MemoryController instances; not imported here - the controller
# imports this module to build its guards, and the dependency runs one way only.)

class StepGuard:
    """One guarded training step (made by :meth:`MemoryController.guard`).

    While active, ``optimizer.step`` is wrapped: an OOM inside it is recovered and the step
    retried once for the parameters not yet updated. An OOM in the body before the step
    (forward, backward) is recovered, gradients are cleared, the exception suppressed and
    ``retry`` set: the caller runs the body again, on the same batch. An OOM in the body after
    the step has been applied (say, in a scheduler or a logging pass), or after
    update-in-backward updated a parameter, is recovered but propagates: running the body
    again would apply the update twice. Each parameter's update in a retried
    ``optimizer.step`` runs once whether it ran per item or in a prepared multi-tensor launch.

    In a job of several ranks (an initialized ``torch.distributed`` default group of more
    than one process) nothing is retried: memory is recovered and the error propagates. One
    rank running forward, backward or the optimizer's collectives again on its own would pair
    its collectives with the wrong ones of the other ranks (FSDP's all-gathers, DDP's bucket
    all-reduces, clipping norms), which hangs or aborts the job; stopping lets the launcher
    restart every rank from the last checkpoint, with the adaptive budget keeping headroom.

    Example:
        >>> import torch, pagedopt
        >>> opt = pagedopt.AdamW8bit([torch.nn.Parameter(torch.ones(2))])
        >>> with pagedopt.MemoryController(opt).guard() as g:
        ...     pass
        >>> g.retry, g.recovered
        (False, 0)
    """

    def __init__(self, controller: Any, retries: int = 1) -> None:
        self.controller = controller
        self.optimizer = controller.optimizer
        self.retries = retries
        self.retry = False
        self.recovered = 0
        self.stepped = False  # the guarded optimizer.step() has completed in this body
        self._saved_step: Any = None
        self._backward_updates_at_enter = 0
        self.world_size = _world_size()  # > 1: never retry (see the class docstring)

    def __enter__(self) -> "StepGuard":
        opt = self.optimizer
        self._saved_step = opt.__dict__.get("step")
        self._backward_updates_at_enter = getattr(opt, "backward_updates", 0)
        original = opt.step  # bound (or a previous instance wrapper)

        @functools.wraps(original)  # keeps markers such as the LR scheduler's step wrapper's
        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            return self._step(original, *args, **kwargs)

        opt.step = guarded_step
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        opt = self.optimizer
        if self._saved_step is None:
            opt.__dict__.pop("step", None)
        else:
            opt.step = self._saved_step
        if exc_type is None or not issubclass(exc_type, torch.OutOfMemoryError) or self.retries <= 0:
            return False
        no_retry = self._no_retry_reason()
        if no_retry is not None:  # recover memory, but no retry
            del exc, tb
            self.controller.recover(no_retry)
            self.recovered += 1
            return False
        del exc, tb
        self.optimizer.zero_grad(set_to_none=True)  # partial gradients of the failed pass
        self.controller.recover("forward/backward")
        self.recovered += 1
        self.retry = True
        return True

    def _no_retry_reason(self) -> str | None:
        """Why an OOM in the body must propagate (the phase the recovery logs), or None."""
        if self.stepped:
            return "after optimizer.step"  # (a retry would apply the update twice)
        if self._updated_in_backward():
            return "after an update in backward"
        if self.world_size > 1:
            return "multi-rank job (no retry)"  # (a metrics label: no rank count in it)
        return None

    def _updated_in_backward(self) -> bool:
        """Whether update-in-backward updated a parameter during this body: a retry of the
        body would run that update again (on parameters its first run already changed)."""
        return getattr(self.optimizer, "backward_updates", 0) != self._backward_updates_at_enter

    # -- the guarded optimizer step ----------------------------------------------------------

    def _step(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        opt = self.optimizer
        done: set[int] = set()  # parameters whose update ran in this step (any attempt)
        while True:
            hidden = [(p, p.grad) for g in opt.param_groups for p in g["params"] if id(p) in done]
            for p, _g in hidden:
                p.grad = None  # updated already: this attempt skips it
            snapshot = _snapshot(opt)
            try:
                result = self._journaled(original, done, *args, **kwargs)
                self.stepped = True
                return result
            except torch.OutOfMemoryError:
                _restore(opt, snapshot, done)
                if self.retries <= 0 or not self.controller.config.retry_oom or self.world_size > 1:
                    raise  # (recovered by __exit__ when the body is guarded too)
            finally:
                for p, g in hidden:
                    p.grad = g
            # outside the except block: the traceback's frames (and what they hold) are gone
            self.controller.recover("optimizer.step")
            self.recovered += 1
            self.retries -= 1

    def _journaled(self, original: Callable[..., Any], done: set[int], *args: Any, **kwargs: Any) -> Any:
        """Run ``original`` recording in ``done`` each parameter whose update ran: per-item
        chunks (``_update_chunk``) and prepared multi-tensor launches (``_run_launch``)."""
        opt = self.optimizer
        chunk, launch = opt._update_chunk, opt._run_launch

        def journaled_chunk(works: list[Any]) -> None:
            chunk(works)
            done.update(id(w.key) for w in works)  # the chunk's update ran: never again

        def journaled_launch(lg: Any, grads: list[Any]) -> bool:
            ran = launch(lg, grads)
            if ran:
                done.update(id(e.key) for e in lg.entries)  # the launch ran: never again
            return ran

        with _instance_override(opt, "_update_chunk", journaled_chunk), \
                _instance_override(opt, "_run_launch", journaled_launch):
            return original(*args, **kwargs)


@contextlib.contextmanager
def _instance_override(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name = value`` for the block; afterwards restore what the instance had (or
    drop the attribute so the class's method shows again)."""
    had_instance = name in obj.__dict__
    previous = obj.__dict__.get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had_instance:
            setattr(obj, name, previous)
        else:
            obj.__dict__.pop(name, None)


def _snapshot(opt: Any) -> dict[torch.Tensor, tuple[bool, Any, torch.Tensor | None]]:
    """What a step changes before its update runs, per parameter with a gradient: whether it
    had state, its step counter and its clipping history (100 floats)."""
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = opt.state.get(p)
            if not state:
                out[p] = (False, None, None)
                continue
            gnorm = state.get("gnorm_vec")
            out[p] = (True, state.get("step"), gnorm.clone() if isinstance(gnorm, torch.Tensor) else None)
    return out


def _restore(opt: Any, snapshot: dict, done: set[int]) -> None:
    """Undo the step's bookkeeping for the parameters whose update did not run."""
    for p, (had_state, step, gnorm) in snapshot.items():
        if id(p) in done:
            continue
        if not had_state:
            if p in opt.state:
                opt.state_store.forget(p)
                del opt.state[p]
            continue
        state = opt.state[p]
        state["step"] = step
        if gnorm is not None:
            state["gnorm_vec"].copy_(gnorm)


def attempts(controller: Any) -> Iterator[StepGuard]:
    """``for g in attempts(ctrl): with g: ...`` - at most two guarded attempts of one batch."""
    rng = RngState()
    first = StepGuard(controller)
    yield first
    if first.retry:
        rng.restore()
        yield StepGuard(controller, retries=0)


class RngState:
    """torch's default generators (CPU, and each initialized CUDA device) as they were at
    construction: a retried step replays the random draws of the attempt it replaces.

    Example:
        >>> import torch
        >>> rng = RngState()
        >>> a = torch.rand(2)
        >>> rng.restore()
        >>> torch.equal(a, torch.rand(2))
        True
    """

    def __init__(self) -> None:
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _world_size() -> int:
    """Processes in torch.distributed's default group (1 when there is none)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
