"""The telemetry sink protocol: what the optimizer core reports, with no exporter dependency.

The core calls :meth:`StatsSink.on_step` once per ``optimizer.step()``. Values that live on
the device (gradient norms, clip thresholds, scales) are handed over as 0-d tensors, never
read on the host inside the step; a sink copies them asynchronously and reads them later.

Example:
    >>> from pagedopt.telemetry.sink import RecordingSink
    >>> sink = RecordingSink()
    >>> sink.reports
    []
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class ParamStepReport:
    """One parameter's part of a step (device tensors are 0-d, float32)."""

    name: str
    group: int
    numel: int
    precision: str
    grad_norm: torch.Tensor | None = None
    clip_threshold: torch.Tensor | None = None
    clip_scale: torch.Tensor | None = None
    update_scale: torch.Tensor | None = None


@dataclass
class StepReport:
    """What happened in one ``optimizer.step()``."""

    step: int
    duration_seconds: float
    params: list[ParamStepReport] = field(default_factory=list)


class StatsSink(Protocol):
    """Receives reports from the optimizer core (and events from the pager)."""

    def on_step(self, optimizer: Any, report: StepReport) -> None: ...


class NullSink:
    """Discards everything (the default)."""

    def on_step(self, optimizer: Any, report: StepReport) -> None:
        return None


class RecordingSink:
    """Keeps every report in memory (for tests and notebooks)."""

    def __init__(self) -> None:
        self.reports: list[StepReport] = []

    def on_step(self, optimizer: Any, report: StepReport) -> None:
        self.reports.append(report)


NULL_SINK = NullSink()
