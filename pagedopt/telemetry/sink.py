"""The telemetry sink protocol: what the optimizer core reports, with no exporter dependency.

The core calls :meth:`StatsSink.on_step` once per ``optimizer.step()``. Values that live on
the device (gradient norms, clip thresholds, scales, quantization errors) are handed over as
0-d tensors, never read on the host inside the step; a sink copies them asynchronously and
reads them later (see :mod:`pagedopt.telemetry.host_copy`).

Besides ``on_step`` a sink may implement optional hooks; the core and the pager look them
up with ``getattr`` so a minimal sink only needs ``on_step``. :class:`BaseSink` implements
all of them as no-ops:

* ``on_step_begin(optimizer)`` - called first thing in ``step()`` (a GPU sink records a CUDA
  event there to time the step on the device).
* ``quant_error_probe(optimizer, step) -> QuantErrorProbe | None`` - asked once per step;
  a probe returned here watches the 8-bit state of a few parameters through that step's
  update (see :mod:`pagedopt.telemetry.quant_error`). ``None`` (the usual answer) costs
  nothing.
* ``on_prefetch_latency(latency)`` - the pager reports one completed prefetch: seconds as a
  float, or ``(start_event, end_event)`` CUDA events recorded around the copy (the sink reads
  the elapsed time once ``end_event`` has completed, never blocking).

Sinks are attached with :func:`attach` (several sinks fan out through :class:`FanoutSink`).

Example:
    >>> import torch, pagedopt
    >>> from pagedopt.telemetry.sink import RecordingSink, attach
    >>> w = torch.nn.Parameter(torch.randn(4096))
    >>> opt = pagedopt.AdamW8bit([w], percentile_clipping=95)
    >>> sink = attach(opt, RecordingSink())
    >>> w.grad = torch.randn(4096); opt.step()
    >>> report = sink.reports[0]
    >>> report.step, report.params[0].precision, report.params[0].clip_threshold.shape
    (1, '8bit-blockwise', torch.Size([]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

# Transfer directions and reasons the pager reports in ``stats()`` (see
# :mod:`pagedopt.telemetry.sources`). Dashboards and alert rules rely on these spellings.
DIRECTIONS = ("in", "out")  # "in": host -> device (page in), "out": device -> host
REASONS = (
    "prefetch",  # in, planned: moved ahead of its update by the policy
    "demand",  # in, unplanned: needed now and not resident (the step waited)
    "offload",  # out, planned: back to the host after use (offload policy)
    "budget",  # out: evicted to stay under device_budget_bytes
    "pressure",  # out: free device memory fell below reserve_free_bytes
    "capacity",  # out: a device allocation failed and room was made
    "overdraft",  # out: a state larger than the room streamed through and left again
    "manual",  # out: pager.evict() called by the user
)


@dataclass
class ParamStepReport:
    """One parameter's part of a step (device tensors are 0-d, float32).

    ``param`` is the parameter object itself (the optimizer's state key): sinks that keep
    per-parameter tables look it up by identity, never by ``id()``.
    """

    name: str
    group: int
    numel: int
    precision: str
    grad_norm: torch.Tensor | None = None
    clip_threshold: torch.Tensor | None = None
    clip_scale: torch.Tensor | None = None
    update_scale: torch.Tensor | None = None
    param: torch.Tensor | None = None


@dataclass
class QuantErrorSample:
    """Quantization error of one state of one parameter, measured on a sample of its blocks.

    ``error_sq`` is the sum of squared differences between the stored (dequantized) 8-bit
    state after the step and the exact float32 state the same update produces without
    requantization; ``reference_sq`` the sum of squares of that exact state. Both are 0-d
    float64 tensors on the parameter's device; the relative RMS error is
    ``sqrt(error_sq / reference_sq)``.
    """

    name: str
    group: int
    state: str  # "state1" or "state2"
    elements: int
    error_sq: torch.Tensor
    reference_sq: torch.Tensor
    param: torch.Tensor | None = None


@dataclass
class StepReport:
    """What happened in one ``optimizer.step()``."""

    step: int
    duration_seconds: float
    params: list[ParamStepReport] = field(default_factory=list)
    quant_errors: list[QuantErrorSample] = field(default_factory=list)


class QuantErrorProbe(Protocol):
    """Watches the 8-bit state of some parameters through one step's update.

    The optimizer calls :meth:`before` with each chunk of the update pass just before the
    backend updates it (``entries`` are ``(name, group_index, param)`` per item) and
    :meth:`after` right after; :attr:`samples` is read once the step is done.
    """

    samples: list[QuantErrorSample]

    def before(self, kind: Any, entries: Sequence[tuple[str, int, torch.Tensor]], items: Sequence[Any]) -> None: ...

    def after(self) -> None: ...


class StatsSink(Protocol):
    """Receives reports from the optimizer core (and events from the pager)."""

    def on_step(self, optimizer: Any, report: StepReport) -> None: ...


class BaseSink:
    """A sink that ignores everything: subclass it and override the hooks you need.

    Example:
        >>> import torch, pagedopt
        >>> from pagedopt.telemetry.sink import BaseSink, attach
        >>> class StepCounter(BaseSink):
        ...     steps = 0
        ...     def on_step(self, optimizer, report):
        ...         self.steps += 1
        >>> w = torch.nn.Parameter(torch.ones(3)); opt = pagedopt.Lion([w])
        >>> counter = attach(opt, StepCounter())
        >>> w.grad = torch.ones(3); opt.step(); counter.steps
        1
    """

    def on_step_begin(self, optimizer: Any) -> None:
        return None

    def on_step(self, optimizer: Any, report: StepReport) -> None:
        return None

    def quant_error_probe(self, optimizer: Any, step: int) -> QuantErrorProbe | None:
        return None

    def on_prefetch_latency(self, latency: float | tuple[Any, Any]) -> None:
        return None


class NullSink(BaseSink):
    """Discards everything (the default)."""


class RecordingSink(BaseSink):
    """Keeps every report in memory (for tests and notebooks).

    ``quant_error_sampler`` (a :class:`~pagedopt.telemetry.quant_error.QuantErrorSampler`)
    makes the reports carry quantization-error samples.

    Example:
        >>> import torch, pagedopt
        >>> from pagedopt.telemetry.sink import RecordingSink, attach
        >>> w = torch.nn.Parameter(torch.ones(3)); opt = pagedopt.SGD([w], lr=0.1, momentum=0.9)
        >>> sink = attach(opt, RecordingSink())
        >>> w.grad = torch.ones(3); opt.step()
        >>> [(r.step, len(r.params)) for r in sink.reports]
        [(1, 1)]
    """

    def __init__(self, quant_error_sampler: Any = None) -> None:
        self.reports: list[StepReport] = []
        self.prefetch_latencies: list[float | tuple[Any, Any]] = []
        self.quant_error_sampler = quant_error_sampler

    def on_step(self, optimizer: Any, report: StepReport) -> None:
        self.reports.append(report)

    def quant_error_probe(self, optimizer: Any, step: int) -> QuantErrorProbe | None:
        if self.quant_error_sampler is None:
            return None
        return self.quant_error_sampler.probe(step)

    def on_prefetch_latency(self, latency: float | tuple[Any, Any]) -> None:
        self.prefetch_latencies.append(latency)


class _FanoutProbe:
    """Several sinks' probes behind one (each sees the same chunks)."""

    def __init__(self, probes: list[QuantErrorProbe]) -> None:
        self.probes = probes

    @property
    def samples(self) -> list[QuantErrorSample]:
        # Sinks asking for the same step share the samples of the first probe that has any.
        for probe in self.probes:
            if probe.samples:
                return probe.samples
        return []

    def before(self, kind: Any, entries: Sequence[tuple[str, int, torch.Tensor]], items: Sequence[Any]) -> None:
        for probe in self.probes:
            probe.before(kind, entries, items)

    def after(self) -> None:
        for probe in self.probes:
            probe.after()


class FanoutSink(BaseSink):
    """Forwards every hook to several sinks, in order (:func:`attach` builds one when a
    second sink is attached).

    Example:
        >>> from pagedopt.telemetry.sink import FanoutSink, RecordingSink
        >>> a, b = RecordingSink(), RecordingSink()
        >>> FanoutSink([a, b]).on_prefetch_latency(0.01)
        >>> a.prefetch_latencies, b.prefetch_latencies
        ([0.01], [0.01])
    """

    def __init__(self, sinks: Sequence[Any]) -> None:
        self.sinks = list(sinks)

    def _each(self, hook: str, *args: Any) -> list[Any]:
        results = []
        for sink in self.sinks:
            fn = getattr(sink, hook, None)
            if fn is not None:
                results.append(fn(*args))
        return results

    def on_step_begin(self, optimizer: Any) -> None:
        self._each("on_step_begin", optimizer)

    def on_step(self, optimizer: Any, report: StepReport) -> None:
        self._each("on_step", optimizer, report)

    def quant_error_probe(self, optimizer: Any, step: int) -> QuantErrorProbe | None:
        probes = [p for p in self._each("quant_error_probe", optimizer, step) if p is not None]
        if not probes:
            return None
        return probes[0] if len(probes) == 1 else _FanoutProbe(probes)

    def on_prefetch_latency(self, latency: float | tuple[Any, Any]) -> None:
        self._each("on_prefetch_latency", latency)


NULL_SINK = NullSink()


def _check_optimizer(optimizer: Any) -> None:
    if not hasattr(optimizer, "sink"):
        raise TypeError(
            f"optimizer: {type(optimizer).__name__} has no telemetry sink; pass a pagedopt optimizer "
            "(pagedopt.optim.Optimizer8bit and its subclasses)"
        )


def pager_of(optimizer: Any) -> Any:
    """The optimizer's pager: ``optimizer.pager``, else its state store if that keeps paging
    statistics (has ``stats()``), else ``None``."""
    pager = getattr(optimizer, "pager", None)
    if pager is None:
        store = getattr(optimizer, "state_store", None)
        pager = store if callable(getattr(store, "stats", None)) else None
    return pager


def _set_sink(optimizer: Any, sink: Any) -> None:
    optimizer.sink = sink
    # The pager reports prefetch latencies to the same sink when it has a ``sink`` attribute.
    pager = pager_of(optimizer)
    if pager is not None and hasattr(pager, "sink"):
        pager.sink = sink


def attach(optimizer: Any, sink: Any) -> Any:
    """Make ``optimizer`` report to ``sink`` (in addition to sinks already attached).

    Returns ``sink``. The optimizer's pager, if it has one with a ``sink`` attribute, reports
    to the same sink.
    """
    _check_optimizer(optimizer)
    current = optimizer.sink
    if current is NULL_SINK or current is None:
        _set_sink(optimizer, sink)
    elif isinstance(current, FanoutSink):
        if sink not in current.sinks:
            current.sinks.append(sink)
    elif current is not sink:
        _set_sink(optimizer, FanoutSink([current, sink]))
    return sink


def detach(optimizer: Any, sink: Any) -> None:
    """Stop ``optimizer`` reporting to ``sink`` (other attached sinks keep receiving)."""
    _check_optimizer(optimizer)
    current = optimizer.sink
    if current is sink:
        _set_sink(optimizer, NULL_SINK)
    elif isinstance(current, FanoutSink) and sink in current.sinks:
        current.sinks.remove(sink)
        if len(current.sinks) == 1:
            _set_sink(optimizer, current.sinks[0])
        elif not current.sinks:
            _set_sink(optimizer, NULL_SINK)
