"""Telemetry: the sink protocol the optimizer core writes to, and the Prometheus exporter.

The core (optimizers, pager, functional) only knows :mod:`pagedopt.telemetry.sink`; nothing
there imports prometheus-client. The exporter lives in :mod:`pagedopt.telemetry.exporter`
and is loaded on first use of :func:`start_exporter` / :class:`PrometheusSink`.

Modules: :mod:`~pagedopt.telemetry.sink` (protocol, ``attach``), :mod:`~pagedopt.telemetry.metrics`
(the metric catalogue), :mod:`~pagedopt.telemetry.prometheus` (the Prometheus sink), :mod:`~pagedopt.telemetry.exporter` (HTTP endpoint),
:mod:`~pagedopt.telemetry.aggregate` (per-step device reductions),
:mod:`~pagedopt.telemetry.host_copy` (device values to the host without a sync),
:mod:`~pagedopt.telemetry.layout` (labels, top-k), :mod:`~pagedopt.telemetry.quant_error`
(sampled quantization error), :mod:`~pagedopt.telemetry.sources` (pager, kernels, devices),
:mod:`~pagedopt.telemetry.training` (``--metrics-port``/``--linger`` flags and a training-loop
callback).

Example:
    >>> import torch, pagedopt
    >>> from pagedopt.telemetry import start_exporter
    >>> model = torch.nn.Linear(64, 64)
    >>> opt = pagedopt.AdamW8bit(model.parameters(), percentile_clipping=95)
    >>> exporter = start_exporter(opt, model=model, port=0)   # http://127.0.0.1:<port>/metrics
    >>> exporter.enabled
    True
    >>> exporter.close()
"""

from __future__ import annotations

from typing import Any

from .sink import (
    NULL_SINK, BaseSink, FanoutSink, NullSink, ParamStepReport, QuantErrorSample, RecordingSink, StatsSink,
    StepReport, attach, detach,
)

_LAZY = {
    "start_exporter": "exporter",
    "Exporter": "exporter",
    "PrometheusSink": "prometheus",
    "QuantErrorSampler": "quant_error",
    "METRICS": "metrics",
    "MetricsCallback": "training",
    "add_metrics_arguments": "training",
    "metrics_callback": "training",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pagedopt.telemetry' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "StatsSink", "BaseSink", "NullSink", "RecordingSink", "FanoutSink", "NULL_SINK", "StepReport",
    "ParamStepReport", "QuantErrorSample", "attach", "detach", *_LAZY,
]
