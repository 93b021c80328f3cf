"""Visible skips: non-finite gradient elements are counted, warned about, or refused.

pagedopt's update skips a gradient element that is NaN or infinite (the parameter element
and its state stay as they were, see the README). Skipping silently hides a diverging run,
so every pagedopt optimizer carries a :class:`NonfiniteGradWatch` (``optimizer.nonfinite``),
installed as a torch.optim step pre-hook:

- ``"skip"`` (default): count the skipped elements on the device, in a running 0-d tensor;
  nothing is read on the host inside the step. The update kernels count them while they read
  the gradients (:mod:`pagedopt.functional.nonfinite_tally`; the CUDA kernels add to the
  running count on the device, inside a captured graph too), so the watch makes no pass of
  its own. The count is read when metrics are collected
  (Prometheus ``pagedopt_nonfinite_grad_elements_total``) or by :meth:`~NonfiniteGradWatch.total`,
  and at most every :data:`CHECK_EVERY_STEPS` steps the watch looks at a copy of it made
  asynchronously at an earlier step (a CUDA event tells whether the copy is done; no
  waiting) and warns - at most once a minute - when it grew (:class:`NonfiniteGradWarning`).
- ``"raise"``: raise :class:`NonfiniteGradError` before the update when a gradient has a
  non-finite element. This reads the count on the host every step (one device sync).
- ``"off"``: no counting at all.

The mode comes from ``PAGEDOPT_NONFINITE`` (``skip``, ``raise``, ``off``) when the optimizer
is built, or ``optimizer.nonfinite.mode = "raise"`` at any time. Cost in ``"skip"`` mode: none
(counted inside the update kernels; an atomic add only for a tile of gradient elements that
has one), except where no pagedopt kernel runs - gradients on a CUDA device without the CUDA
backend (the reference updates them) and bitsandbytes-style subclasses that override the
update hooks - where the watch reads each gradient once more before the step, queued on the
device (no sync). ``"raise"`` must look before the update: on the CPU one fused L2-norm pass
over the gradients (``torch._foreach_norm``), elements counted only in gradients it flags; on
CUDA one extra read of each gradient and a host read of the counts. Update in backward
(:mod:`pagedopt.optim.backward_update`) counts the same way as the step.

Example:
    >>> import torch, pagedopt
    >>> w = torch.nn.Parameter(torch.ones(8))
    >>> opt = pagedopt.AdamW8bit([w])
    >>> w.grad = torch.tensor([1.0, float("nan"), 1.0, float("inf"), 1, 1, 1, 1])
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     opt.step()
    >>> opt.nonfinite.total()
    2
    >>> opt.nonfinite.mode = "raise"
    >>> opt.step()
    Traceback (most recent call last):
    ...
    pagedopt.optim.nonfinite.NonfiniteGradError: 2 non-finite gradient elements (NaN/Inf) in 1 parameter(s), first: group0.param0; nonfinite mode 'raise' refuses the step (PAGEDOPT_NONFINITE=skip skips them)
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from contextlib import contextmanager
from operator import attrgetter
from typing import Any, Iterator

import torch

from ..functional import dispatch, nonfinite_tally
from ..shards import local_tensor as _local

MODES = ("skip", "raise", "off")
ENV_VAR = "PAGEDOPT_NONFINITE"
CHECK_EVERY_STEPS = 50
WARN_INTERVAL_SECONDS = 60.0


class NonfiniteGradWarning(RuntimeWarning):
    """Gradient elements were NaN/Inf and their updates were skipped.

    Example:
        >>> import warnings
        >>> warnings.simplefilter("error", NonfiniteGradWarning)  # turn skips into errors in a test
        >>> warnings.resetwarnings()
    """


class NonfiniteGradError(FloatingPointError):
    """``nonfinite="raise"``: a gradient had NaN/Inf elements; the step was not applied.

    Example:
        >>> issubclass(NonfiniteGradError, FloatingPointError)
        True
    """


def mode_from_environment() -> str:
    """``PAGEDOPT_NONFINITE`` (default ``"skip"``); an unknown value is an error naming it."""
    value = os.environ.get(ENV_VAR, "skip").strip().lower() or "skip"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(MODES)}")
    return value


_device = attrgetter("device")


def _kernels_count_on(device: torch.device) -> bool:
    """Whether the updates of gradients on ``device`` count non-finite elements themselves:
    every CPU path does (native kernels, the reference), and the CUDA kernels do; the
    reference on a CUDA device does not (no CUDA backend loaded), so the watch looks there."""
    return device.type == "cpu" or dispatch.backend_for(device).name == "cuda"


class NonfiniteGradWatch:
    """Counts non-finite gradient elements of one optimizer (see the module docstring).

    It holds no reference to the optimizer (the hook receives it), so it creates no cycle.

    Example:
        >>> watch = NonfiniteGradWatch("off")
        >>> watch.total(), watch.mode
        (0, 'off')
    """

    def __init__(self, mode: str | None = None) -> None:
        self.mode = mode_from_environment() if mode is None else mode
        if self.mode not in MODES:
            raise ValueError(f"nonfinite mode {self.mode!r}: expected one of {', '.join(MODES)}")
        self._counts: dict[torch.device, torch.Tensor] = {}
        self._steps = 0
        self._pending: list[tuple[Any, torch.Tensor]] = []  # (event or None, host copy)
        self._seen = 0  # the count as last read on the host
        self._warned = 0
        self._last_warning = -float("inf")

    @classmethod
    def attach(cls, optimizer: torch.optim.Optimizer, mode: str | None = None) -> NonfiniteGradWatch:
        """A watch registered as ``optimizer``'s step pre-hook."""
        watch = cls(mode)
        optimizer.register_step_pre_hook(_before_step)
        return watch

    def observe(self, optimizer: Any) -> None:
        """Count this step's non-finite gradient elements (on the device)."""
        if self.mode == "off":
            return
        present = [g for group in optimizer.param_groups for p in group["params"] if (g := p.grad) is not None]
        kernels_count = self.kernels_count(optimizer)  # (see tallied())
        if kernels_count and all(map(_kernels_count_on, set(map(_device, present)))):
            # Nothing to look at: the update kernels count (a C-level scan, no per-parameter Python)
            self._after_observe()
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for grad in present:
            g = _local(grad)
            # sparse gradients are the step's to refuse (with the parameter's name)
            if g.layout is torch.strided and g.numel() and g.is_floating_point():
                if kernels_count and _kernels_count_on(g.device):
                    continue
                by_device.setdefault(g.device, []).append(g)
        step_counts = []
        for device, grads in by_device.items():
            if device.type == "cpu":
                # One fused L2-norm pass (NaN/Inf propagate); elements are counted only in the
                # gradients it flags. Reading a CPU value waits for nothing.
                maxima = torch.stack(torch._foreach_norm(grads))
                flagged = (~torch.isfinite(maxima)).nonzero().flatten().tolist()
                if not flagged:
                    if self.mode != "raise":
                        continue
                    step_counts.append((grads, torch.zeros(len(grads), dtype=torch.int64)))
                    continue
                count = torch.zeros(len(grads), dtype=torch.int64)
                for i in flagged:
                    count[i] = torch.isfinite(grads[i]).logical_not().sum()
            else:  # CUDA: count on the device, never read here (one extra read of each gradient)
                count = torch.stack([torch.isfinite(g).logical_not().sum() for g in grads])
            if self.mode == "raise":
                step_counts.append((grads, count))
            total = count.sum()
            if device not in self._counts:
                self._counts[device] = torch.zeros((), dtype=torch.int64, device=device)
            self._counts[device].add_(total)
        if self.mode == "raise":
            self._steps += 1
            self._raise_if_any(optimizer, step_counts)
        else:
            self._after_observe()

    def _after_observe(self) -> None:
        self._steps += 1
        if self._steps % CHECK_EVERY_STEPS == 1 or CHECK_EVERY_STEPS == 1:
            self._poll()

    @contextmanager
    def tallied(self, optimizer: Any) -> Iterator[None]:
        """Around a step's updates (and each update in backward): in ``"skip"`` mode the updates
        inside count the NaN/Inf gradient elements they skip - CPU updates report them and they
        are added when the block ends (also when it raises: those updates were applied), CUDA
        kernels add theirs to :meth:`kernel_counter` on the device."""
        if not self.kernels_count(optimizer):
            yield
            return
        with nonfinite_tally.counting(self.kernel_counter) as tally:
            try:
                yield
            finally:
                self._add_cpu_count(tally.count)

    def kernels_count(self, optimizer: Any) -> bool:
        """Whether this step's update kernels count (``"skip"`` mode), so that the watch needs
        no pass of its own. Not for bitsandbytes-style subclasses that override the update
        hooks: their updates may not run pagedopt's kernels, so the watch looks itself."""
        if self.mode != "skip":
            return False
        hook_path = getattr(optimizer, "_uses_hook_path", None)
        return not (callable(hook_path) and hook_path())

    def kernel_counter(self, device: torch.device) -> torch.Tensor | None:
        """The running count on a CUDA-served ``device`` that the update kernels add to
        atomically (``"skip"`` mode; None otherwise, and for other devices). The tensor is
        created once per device and never replaced, so prepared launches and captured CUDA
        graphs may hold its address."""
        if self.mode != "skip" or dispatch.backend_for(device).name != "cuda":
            return None
        count = self._counts.get(device)
        if count is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # Created inside a user's graph capture, the tensor's zero-fill would be part of
                # the graph and reset the count on every replay: steps captured before any
                # eager step are not counted (warm-up steps, which capture needs anyway, are).
                return None
            count = self._counts[device] = torch.zeros((), dtype=torch.int64, device=device)
        return count

    def _add_cpu_count(self, count: int) -> None:
        if not count:
            return
        cpu = torch.device("cpu")
        if cpu not in self._counts:
            self._counts[cpu] = torch.zeros((), dtype=torch.int64)
        self._counts[cpu].add_(count)
        self._seen = max(self._seen, sum(int(c) for d, c in self._counts.items() if d.type != "cuda"))
        self._maybe_warn()  # a CPU count is known at once: no need to wait for a poll

    def _raise_if_any(self, optimizer: Any, step_counts: list[tuple[list[torch.Tensor], torch.Tensor]]) -> None:
        bad = 0
        params = 0
        for _, counts in step_counts:
            values = counts.tolist()  # host read: the price of "raise"
            bad += sum(values)
            params += sum(1 for v in values if v)
        if bad:
            first = self._first_bad_name(optimizer)
            raise NonfiniteGradError(
                f"{bad} non-finite gradient elements (NaN/Inf) in {params} parameter(s), first: {first}; "
                f"nonfinite mode 'raise' refuses the step ({ENV_VAR}=skip skips them)")

    @staticmethod
    def _first_bad_name(optimizer: Any) -> str:
        for gindex, group in enumerate(optimizer.param_groups):
            names = group.get("param_names") or []
            for pindex, p in enumerate(group["params"]):
                if p.grad is not None and not bool(torch.isfinite(_local(p.grad)).all()):
                    return str(names[pindex]) if pindex < len(names) else f"group{gindex}.param{pindex}"
        return "?"

    def _poll(self) -> None:
        """Harvest finished asynchronous copies, start a new one, warn if the count grew."""
        still = []
        for event, host in self._pending:
            if event is None or event.query():
                self._seen = max(self._seen, int(host.sum()))
            else:
                still.append((event, host))
        self._pending = still
        if not self._pending:
            parts = []
            event = None
            for device, count in self._counts.items():
                if device.type == "cuda":
                    host = torch.empty((), dtype=torch.int64, pin_memory=True)
                    host.copy_(count, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    parts.append(host)
                else:  # a CPU value is read without waiting for anything
                    self._seen = max(self._seen, sum(int(c) for d, c in self._counts.items() if d.type != "cuda"))
            if parts:
                self._pending.append((event, torch.stack(parts)))
        self._maybe_warn()

    def _maybe_warn(self) -> None:
        now = time.monotonic()
        if self._seen > self._warned and now - self._last_warning >= WARN_INTERVAL_SECONDS:
            warnings.warn(
                f"pagedopt: {self._seen - self._warned} non-finite gradient elements (NaN/Inf) were skipped since the "
                f"last report ({self._seen} in all); their parameters and states were left unchanged. "
                f"Set {ENV_VAR}=raise to stop at the first one.", NonfiniteGradWarning, stacklevel=_caller_stacklevel())
            self._warned, self._last_warning = self._seen, now

    def total(self) -> int:
        """Non-finite gradient elements counted so far (reads the device: call it at
        telemetry time, not inside a step)."""
        value = sum(int(c) for c in self._counts.values())
        self._seen = max(self._seen, value)
        self._maybe_warn()
        return value


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel (called from :meth:`NonfiniteGradWatch._maybe_warn`) that
    points at the first frame outside pagedopt, torch and contextlib: the user's ``step()`` or
    ``backward()`` call, however deep inside the step the count became known."""
    level, frame = 1, sys._getframe(2)  # level 1 = _maybe_warn; this frame = its caller
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _INTERNAL_MODULES:
        level += 1
        frame = frame.f_back
    return level + 1


_INTERNAL_MODULES = frozenset({"pagedopt", "torch", "contextlib"})


def _before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    watch = getattr(optimizer, "nonfinite", None)
    if isinstance(watch, NonfiniteGradWatch):
        watch.observe(optimizer)
