"""Prometheus telemetry sink: the optimizer's step reports as Prometheus metrics.

:class:`PrometheusSink` turns step reports, pager and controller counters, kernel statistics
and device memory into the metrics of :mod:`pagedopt.telemetry.metrics`. Serving them over
HTTP (one endpoint per process or per node) is :mod:`pagedopt.telemetry.exporter`'s job
(:func:`~pagedopt.telemetry.exporter.start_exporter`).

Telemetry never synchronizes the device inside the step: device values travel through
:mod:`pagedopt.telemetry.host_copy` and reach the metrics one or a few steps later. State
bytes are measured in the training thread (at the first step, then at step ends after a
scrape, at most once a second, or every ``state_refresh_seconds``); pager, kernel and device
memory counters are read when Prometheus scrapes.

Example:
    >>> import torch, pagedopt
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> from pagedopt.telemetry import attach
    >>> from pagedopt.telemetry.prometheus import PrometheusSink
    >>> opt = pagedopt.AdamW8bit([torch.nn.Parameter(torch.zeros(10))])
    >>> registry = CollectorRegistry()
    >>> sink = attach(opt, PrometheusSink(opt, registry=registry, run="demo"))
    >>> opt.param_groups[0]["params"][0].grad = torch.ones(10); opt.step()
    >>> b'pagedopt_steps_total{rank="0",run="demo"} 1.0' in generate_latest(registry)
    True
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from datetime import datetime
from typing import Any, Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import values as prometheus_values

from ..functional import dispatch
from .aggregate import QuantValues, StepAggregator, StepValues
from .host_copy import EventLatencies, HostCopies, StepTimer
from .layout import ParamTable, StateBytes
from .metrics import COMMON_LABELS, METRICS, MetricSpec
from .quant_error import QuantErrorSampler
from .sink import DIRECTIONS, REASONS, BaseSink, QuantErrorProbe, StepReport
from .sources import (
    ControllerStats, PagerStats, build_labels, device_budget, device_labels, device_memory, optimizer_device,
    read_controller_stats, read_kernel_stats, read_pager_stats,
)

log = logging.getLogger("pagedopt.telemetry")



def default_run_id() -> str:
    """``PAGEDOPT_RUN``, else torchrun's run id (shared by all ranks), else host and start time."""
    for var in ("PAGEDOPT_RUN", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var, "")
        if value and value != "none":
            return value
    return f"{socket.gethostname()}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return _env_int("RANK", 0)


def multiprocess_enabled() -> bool:
    """Whether prometheus-client writes values to ``PROMETHEUS_MULTIPROC_DIR`` (decided when
    prometheus-client was first imported)."""
    return prometheus_values.ValueClass is not prometheus_values.MutexValue


class _Metrics:
    """The prometheus-client objects of one sink, with ``run``/``rank`` filled in."""

    def __init__(self, registry: CollectorRegistry | None, run: str, rank: str):
        self._common = {"run": run, "rank": rank}
        self._children: dict[tuple, Any] = {}
        self._objects: dict[str, Any] = {}
        for spec in METRICS:
            self._objects[spec.name] = self._make(spec, registry)

    @staticmethod
    def _make(spec: MetricSpec, registry: CollectorRegistry | None) -> Any:
        labels = COMMON_LABELS + spec.labels
        if spec.type == "counter":
            return Counter(spec.name.removesuffix("_total"), spec.help, labels, registry=registry)
        if spec.type == "histogram":
            return Histogram(spec.name, spec.help, labels, registry=registry, buckets=spec.buckets)
        # "mostrecent": in multiprocess mode the newest value of each series wins (series of
        # different ranks differ by their rank label, so nothing is mixed).
        return Gauge(spec.name, spec.help, labels, registry=registry, multiprocess_mode="mostrecent")

    def __call__(self, name: str, **labels: Any) -> Any:
        # Children are cached: prometheus-client's labels() validates and sorts on every call,
        # and the step path sets dozens of series.
        key = (name, *labels.items())
        child = self._children.get(key)
        if child is None:
            child = self._objects[name].labels(**self._common, **{k: str(v) for k, v in labels.items()})
            self._children[key] = child
        return child


class _CounterFeed:
    """Feeds cumulative totals read from elsewhere into a Counter (which only increments)."""

    def __init__(self) -> None:
        self._last: dict[tuple, float] = {}

    def feed(self, child: Any, key: tuple, total: float) -> None:
        previous = self._last.get(key, 0.0)
        # A total that went down means its source restarted (e.g. a new pager): count anew.
        delta = total - previous if total >= previous else total
        if delta > 0:
            child.inc(delta)
        self._last[key] = total


class PrometheusSink(BaseSink):
    """Turns the optimizer's reports into Prometheus metrics (see the module docstring).

    Args:
        optimizer: a pagedopt optimizer (its parameters are labelled once, here).
        model: names the parameters when the optimizer was given ``model.parameters()``.
        registry: where the metrics live (a fresh ``CollectorRegistry`` if omitted; ``None``
            values are written to the multiprocess directory instead when ``multiprocess``).
        top_k: parameters with their own ``param`` series (by state bytes; the rest fold into
            ``__other__``).
        run, rank, local_rank, world_size: identity labels (default: environment).
        quant_error_every: sample ``pagedopt_quant_error_ratio`` every this many steps (0: off).
        quant_error_params, quant_error_blocks: how much one sample measures.
        compute_grad_norms: measure gradient norms of parameters without percentile clipping
            (clipped parameters' norms come with clipping, every step).
        grad_norm_refresh_seconds: the unclipped parameters' norms cost one more read of
            their gradients, so they are measured only when they will be seen: at the first
            step, at the first step after each scrape, and at least this often (0: every
            step). In between, the norm gauges keep their last values.
        state_refresh_seconds: longest interval between state-bytes measurements while training.
        multiprocess: write values for a node-wide endpoint (prometheus-client multiprocess).

    Example:
        >>> import torch, pagedopt
        >>> from pagedopt.telemetry.prometheus import PrometheusSink
        >>> from pagedopt.telemetry.sink import attach
        >>> w = torch.nn.Parameter(torch.randn(5000))
        >>> opt = pagedopt.AdamW8bit([w])
        >>> sink = attach(opt, PrometheusSink(opt, run="doc"))
        >>> w.grad = torch.ones(5000); opt.step(); sink.finish()
        >>> sink.registry.get_sample_value("pagedopt_steps_total", {"run": "doc", "rank": "0"})
        1.0
    """

    def __init__(
        self,
        optimizer: Any,
        *,
        model: torch.nn.Module | None = None,
        registry: CollectorRegistry | None = None,
        top_k: int = 20,
        run: str | None = None,
        rank: int | None = None,
        local_rank: int | None = None,
        world_size: int | None = None,
        quant_error_every: int = 50,
        quant_error_params: int = 16,
        quant_error_blocks: int = 8,
        compute_grad_norms: bool = True,
        grad_norm_refresh_seconds: float = 5.0,
        state_refresh_seconds: float = 10.0,
        multiprocess: bool = False,
    ):
        if not hasattr(optimizer, "sink"):
            raise TypeError(f"optimizer: {type(optimizer).__name__} is not a pagedopt optimizer (no telemetry sink)")
        self.optimizer = optimizer
        self.multiprocess = multiprocess
        self.registry = registry if registry is not None or multiprocess else _RefreshingRegistry()
        if isinstance(self.registry, _RefreshingRegistry):
            self.registry.before_collect.append(self.before_scrape)
        self.run = run or default_run_id()
        self.rank = _rank() if rank is None else rank
        self.local_rank = _env_int("LOCAL_RANK", 0) if local_rank is None else local_rank
        self.world_size = _world_size() if world_size is None else world_size
        self.device = optimizer_device(optimizer)
        self.table = ParamTable(optimizer, model=model, top_k=top_k)
        self.copies = HostCopies()
        self.aggregator = StepAggregator(self.table, self.copies, compute_grad_norms=compute_grad_norms)
        self.sampler = QuantErrorSampler(quant_error_every, quant_error_params, quant_error_blocks)
        self.timer = StepTimer()
        self.latencies = EventLatencies()
        self.state_refresh_seconds = state_refresh_seconds
        if not grad_norm_refresh_seconds >= 0:
            raise ValueError(f"grad_norm_refresh_seconds={grad_norm_refresh_seconds!r}: must be >= 0")
        self.grad_norm_refresh_seconds = float(grad_norm_refresh_seconds)
        self._norms_at = -math.inf
        self._norms_wanted = False
        self.errors = 0
        self.m = _Metrics(self.registry, self.run, str(self.rank))
        self._lock = threading.RLock()
        self._counters = _CounterFeed()
        self._state_keys: dict[str, set[tuple]] = {"group": set(), "param": set()}
        self._last_state: StateBytes | None = None
        self._state_at = -math.inf
        self._state_wanted = False
        self._sources_at = -math.inf
        self._peak_device_state = 0
        self._kernel_seen = (0, 0.0)  # (compiles, compile seconds) already observed
        self._steps = 0
        self._publish_identity()

    # -- identity and zero series ----------------------------------------------------------------

    def _publish_identity(self) -> None:
        m = self.m
        m("pagedopt_build_info", **build_labels()).set(1)
        paging = getattr(self.optimizer, "paging", None)
        m("pagedopt_run_info", optimizer=type(self.optimizer).__name__, backend=self._backend_name(),
          paging_policy=getattr(paging, "policy", "none") if paging is not None else "none",
          world_size=self.world_size, local_rank=self.local_rank).set(1)
        m("pagedopt_device_info", local_rank=self.local_rank, **device_labels(self.device)).set(1)
        m("pagedopt_training_active").set(1)
        # Counters start at 0 so rate() has a baseline from the first scrape.
        m("pagedopt_steps_total")
        m("pagedopt_prefetch_stall_seconds_total")
        m("pagedopt_kernel_cache_hits_total")
        m("pagedopt_telemetry_errors_total")
        m("pagedopt_prefetch_latency_seconds")
        m("pagedopt_step_duration_seconds")
        m("pagedopt_kernel_compile_seconds")
        for direction in DIRECTIONS:
            for reason in REASONS:
                m("pagedopt_page_transfers_total", direction=direction, reason=reason)
                m("pagedopt_page_transfer_bytes_total", direction=direction, reason=reason)
        for label in self.table.group_labels:
            m("pagedopt_clipped_updates_total", group=label)
            m("pagedopt_clip_evaluations_total", group=label)
        for what in ("step_values", "step_timings", "prefetch_latencies"):
            m("pagedopt_telemetry_dropped_total", what=what)

    def _backend_name(self) -> str:
        try:
            return dispatch.backend_for(self.device).name
        except Exception as e:  # noqa: BLE001 - a backend that fails to load is reported, not fatal here
            log.warning("pagedopt telemetry: cannot resolve the backend for %s: %s", self.device, e)
            return "unknown"

    # -- sink hooks (training thread) -------------------------------------------------------------

    def on_step_begin(self, optimizer: Any) -> None:
        self._guard(self.timer.begin, self.device)

    def on_step(self, optimizer: Any, report: StepReport) -> None:
        self._guard(self._on_step, report)

    def quant_error_probe(self, optimizer: Any, step: int) -> QuantErrorProbe | None:
        probe = self.sampler.probe(step)
        return _GuardedProbe(probe, self._guard) if probe is not None else None

    def on_prefetch_latency(self, latency: float | tuple[Any, Any]) -> None:
        self.latencies.add(latency)

    def _guard(self, fn: Callable[..., None], *args: Any) -> bool:
        """Telemetry must never stop training: an error is logged (first time with its
        traceback) and counted in ``pagedopt_telemetry_errors_total``. True if ``fn`` ran."""
        try:
            fn(*args)
            return True
        except Exception:  # noqa: BLE001 - see the docstring
            self.errors += 1
            self.m("pagedopt_telemetry_errors_total").inc()
            if self.errors == 1:
                log.exception("pagedopt telemetry: error in the metrics sink (training continues)")
            return False

    def _on_step(self, report: StepReport) -> None:
        m = self.m
        with self._lock:
            self._steps += 1
            self.timer.end(self.device, report.duration_seconds)
            m("pagedopt_steps_total").inc()
            m("pagedopt_last_step_timestamp_seconds").set(time.time())
            now = time.monotonic()
            for label, count in self.aggregator.submit(report, self._measure_norms(now)).items():
                m("pagedopt_clip_evaluations_total", group=label).inc(count)
            self._apply_device_values()
            if self._steps == 1 or now - self._state_at >= self.state_refresh_seconds or (
                    self._state_wanted and now - self._state_at >= 1.0):
                self._refresh_state()
            if self.multiprocess and now - self._sources_at >= 1.0:
                self._refresh_sources()

    def _measure_norms(self, now: float) -> bool:
        """Whether this step measures the unclipped parameters' gradient norms (see
        ``grad_norm_refresh_seconds``)."""
        if (self._steps == 1 or self._norms_wanted or self.grad_norm_refresh_seconds == 0
                or now - self._norms_at >= self.grad_norm_refresh_seconds):
            self._norms_at, self._norms_wanted = now, False
            return True
        return False

    # -- applying values ------------------------------------------------------------------------

    def _apply_device_values(self, wait: bool = False) -> None:
        m = self.m
        for v in self.aggregator.poll(wait=wait):
            if isinstance(v, StepValues):
                self._apply_step(v)
            elif isinstance(v, QuantValues):
                for (group, state), ratio in v.ratio.items():
                    m("pagedopt_quant_error_ratio", group=group, state=state).set(ratio)
        for seconds in self.timer.poll():
            m("pagedopt_step_duration_seconds").observe(seconds)
        for seconds in self.latencies.poll():
            m("pagedopt_prefetch_latency_seconds").observe(seconds)
        for what, total in (("step_values", self.copies.dropped), ("step_timings", self.timer.dropped),
                            ("prefetch_latencies", self.latencies.dropped)):
            self._counters.feed(m("pagedopt_telemetry_dropped_total", what=what), ("dropped", what), total)

    def _apply_step(self, v: StepValues) -> None:
        m = self.m
        if v.grad_norm is not None:
            m("pagedopt_grad_norm").set(v.grad_norm)
        for group, value in v.group_grad_norm.items():
            m("pagedopt_group_grad_norm", group=group).set(value)
        for group, value in v.clip_threshold.items():
            m("pagedopt_clip_threshold", group=group).set(value)
        for group, value in v.clip_scale_ratio.items():
            m("pagedopt_clip_scale_ratio", group=group).set(value)
        for group, total in v.clipped_updates.items():
            self._counters.feed(m("pagedopt_clipped_updates_total", group=group), ("clipped", group), total)
        for name, value in v.param_grad_norm.items():
            m("pagedopt_param_grad_norm", param=name).set(value)
        for name, value in v.param_clip_threshold.items():
            m("pagedopt_param_clip_threshold", param=name).set(value)

    def _refresh_state(self) -> None:
        """Measure the state's bytes (training thread only: it walks ``optimizer.state``)."""
        snapshot = self.table.state_bytes()
        self._last_state = snapshot
        self._state_at = time.monotonic()
        self._state_wanted = False
        self._peak_device_state = max(self._peak_device_state, snapshot.device_bytes)
        self._set_all("group", "pagedopt_state_bytes", ("group", "state", "precision", "residency"), snapshot.by_group)
        self._set_all("param", "pagedopt_param_state_bytes", ("param", "residency"), snapshot.by_param)

    def _set_all(self, kind: str, name: str, labels: tuple[str, ...], values: dict[tuple, int]) -> None:
        for key, value in values.items():
            self.m(name, **dict(zip(labels, key))).set(value)
        for gone in self._state_keys[kind] - set(values):  # e.g. state moved from device to host
            self.m(name, **dict(zip(labels, gone))).set(0)
        self._state_keys[kind] |= set(values)

    def _refresh_sources(self) -> None:
        """Pager, kernel and device-memory values (safe from the scrape thread)."""
        self._sources_at = time.monotonic()
        m = self.m
        pager = read_pager_stats(self.optimizer)
        if pager is not None:
            self._apply_pager(pager)
        controller = read_controller_stats(self.optimizer)
        if controller is not None:
            self._apply_controller(controller)
        kernels = read_kernel_stats()
        if kernels is not None:
            self._apply_kernels(kernels)
        watch = getattr(self.optimizer, "nonfinite", None)  # pagedopt.optim.nonfinite; read at scrape time
        if watch is not None and hasattr(watch, "total"):
            self._counters.feed(m("pagedopt_nonfinite_grad_elements_total"), ("nonfinite",), watch.total())
        used, total, _ = device_memory(self.device)
        if used is not None:
            m("pagedopt_device_memory_used_bytes").set(used)
        if total is not None:
            m("pagedopt_device_memory_total_bytes").set(total)
        device_state = self._last_state.device_bytes if self._last_state is not None else 0
        budget, headroom = device_budget(self.optimizer, pager, device_state, self.device)
        if budget is not None:
            m("pagedopt_device_budget_bytes").set(budget)
        if headroom is not None:
            m("pagedopt_device_headroom_bytes").set(headroom)
        peak = pager.peak_device_bytes if pager is not None and pager.peak_device_bytes is not None else None
        m("pagedopt_peak_device_state_bytes").set(peak if peak is not None else self._peak_device_state)

    def _apply_pager(self, pager: PagerStats) -> None:
        m = self.m
        for (direction, reason), (count, nbytes) in pager.transfers.items():
            self._counters.feed(m("pagedopt_page_transfers_total", direction=direction, reason=reason),
                                ("transfers", direction, reason), count)
            self._counters.feed(m("pagedopt_page_transfer_bytes_total", direction=direction, reason=reason),
                                ("transfer_bytes", direction, reason), nbytes)
        self._counters.feed(m("pagedopt_prefetch_stall_seconds_total"), ("stall",), pager.prefetch_stall_seconds)
        for action, count in pager.oom_avoidance_actions.items():
            self._counters.feed(m("pagedopt_oom_avoidance_actions_total", action=action), ("oom", action), count)
        for direction, nbytes in pager.last_step_page_bytes.items():
            m("pagedopt_step_page_bytes", direction=direction).set(nbytes)
        for direction, seconds in pager.copy_seconds.items():
            self._counters.feed(m("pagedopt_page_copy_seconds_total", direction=direction), ("copy", direction), seconds)
        self._counters.feed(m("pagedopt_page_thrash_transfers_total"), ("thrash",), pager.thrash_transfers_total)
        self._counters.feed(m("pagedopt_page_thrash_bytes_total"), ("thrash_bytes",), pager.thrash_bytes_total)
        if pager.staging_pool_bytes is not None:
            m("pagedopt_staging_pool_bytes").set(pager.staging_pool_bytes)

    def _apply_controller(self, controller: ControllerStats) -> None:
        m = self.m
        if controller.free_bytes is not None:
            m("pagedopt_memory_free_bytes").set(controller.free_bytes)
        if controller.target_free_bytes is not None:
            m("pagedopt_memory_target_free_bytes").set(controller.target_free_bytes)
        for phase, count in controller.recoveries.items():
            self._counters.feed(m("pagedopt_oom_recoveries_total", phase=phase), ("oom_recoveries", phase), count)

    def _apply_kernels(self, kernels: Any) -> None:
        histogram = self.m("pagedopt_kernel_compile_seconds")
        seen_compiles, seen_seconds = self._kernel_seen
        if kernels.compiles < seen_compiles:  # the backend's counters restarted
            seen_compiles, seen_seconds = 0, 0.0
        new = kernels.compiles - seen_compiles
        if new > 0:
            if kernels.durations is not None and len(kernels.durations) >= new:
                for seconds in kernels.durations[len(kernels.durations) - new:]:
                    histogram.observe(seconds)
            else:
                # Only totals known: each new compile counts at the mean duration of the new
                # ones (count and sum stay exact; bucket placement is approximate).
                mean = max(kernels.compile_seconds - seen_seconds, 0.0) / new
                for _ in range(new):
                    histogram.observe(mean)
        self._kernel_seen = (kernels.compiles, kernels.compile_seconds)
        self._counters.feed(self.m("pagedopt_kernel_cache_hits_total"), ("cache_hits",), kernels.cache_hits)

    # -- scrape and end of training ---------------------------------------------------------------

    def before_scrape(self) -> None:
        """Called before the registry is collected (scrape thread): fresh pull values, device
        values that have arrived, and a request for a state measurement at the next step end."""
        with self._lock:
            self._state_wanted = True
            self._norms_wanted = True
            self._guard(self._apply_device_values)
            self._guard(self._refresh_sources)

    def finish(self) -> None:
        """Training has ended: wait for device values still in flight, take final
        measurements, set ``pagedopt_training_active`` to 0."""
        with self._lock:
            self._guard(self._apply_device_values, True)
            self._guard(self._refresh_state)
            self._guard(self._refresh_sources)
            self.m("pagedopt_training_active").set(0)


class _GuardedProbe:
    """A quantization-error probe whose failures are logged and counted, never raised into
    the optimizer step; a probe that failed measures nothing more."""

    def __init__(self, probe: QuantErrorProbe, guard: Callable[..., bool]):
        self._probe = probe
        self._guard = guard
        self._failed = False

    @property
    def samples(self) -> list:
        return [] if self._failed else self._probe.samples

    def before(self, kind: Any, entries: Any, items: Any) -> None:
        if not self._failed:
            self._failed = not self._guard(self._probe.before, kind, entries, items)

    def after(self) -> None:
        if not self._failed:
            self._failed = not self._guard(self._probe.after)


class _RefreshingRegistry(CollectorRegistry):
    """A registry that lets the sink refresh pull values just before each collection, and
    leaves out the ``*_created`` samples prometheus-client adds to counters and histograms
    (in the text format each becomes one more series per labelled child; Prometheus does not
    need them to compute rates)."""

    def __init__(self) -> None:
        super().__init__()
        self.before_collect: list[Callable[[], None]] = []

    def collect(self):  # type: ignore[override]
        for hook in list(self.before_collect):
            hook()
        for metric in super().collect():
            if metric.name.startswith("pagedopt_"):
                metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric
