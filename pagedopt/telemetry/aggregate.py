"""Per-step gradient, clipping and quantization statistics reduced on the device.

A step report carries 0-d device tensors for every parameter (thousands, in a large model).
:class:`StepAggregator` reduces them on the device into one short float64 vector per step -
sums of squares per parameter group and per top-k slot, a running count of clipped updates
- and ships that vector to the host through :class:`~pagedopt.telemetry.host_copy.HostCopies`.
About a dozen small kernels per step whatever the parameter count; no host sync.

Definitions (``n_i`` a parameter's gradient norm over its finite elements, ``t_i`` its
percentile-clipping threshold, ``s_i`` its clip scale, 1 when not clipped):

* group / global gradient norm: ``sqrt(sum n_i^2)``;
* group clip threshold: ``sqrt(sum t_i^2)`` over the group's clipped parameters - the norm the
  group's gradient would have if every parameter sat exactly at its threshold, so it plots on
  the same axis as the group norm;
* clip scale ratio: ``sqrt(sum (s_i n_i)^2 / sum n_i^2)`` over clipped parameters - the
  fraction of the gradient norm that survives clipping (1: nothing clipped);
* clipped updates: parameter updates with ``s_i < 1`` (a counter, accumulated on the device);
* ``__other__`` per-parameter values fold like a group: ``sqrt`` of summed squares.

Example:
    >>> import torch, pagedopt
    >>> from pagedopt.telemetry.aggregate import StepAggregator
    >>> from pagedopt.telemetry.layout import ParamTable
    >>> from pagedopt.telemetry.sink import RecordingSink, attach
    >>> w = torch.nn.Parameter(torch.zeros(4096))
    >>> opt = pagedopt.AdamW8bit([w], percentile_clipping=100)
    >>> rec = attach(opt, RecordingSink())
    >>> w.grad = torch.full((4096,), 0.5); opt.step()
    >>> agg = StepAggregator(ParamTable(opt, top_k=1))
    >>> agg.submit(rec.reports[0])   # returns the parameters that went through clipping, per group
    {}
    >>> [round(v.grad_norm, 3) for v in agg.poll() if v.kind == "step"]
    [32.0]
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..functional import dispatch
from ..shards import local_tensor as _local
from .host_copy import HostCopies
from .layout import ParamEntry, ParamTable
from .sink import StepReport

STATES = ("state1", "state2")


@dataclass
class StepValues:
    """One step's statistics on the host (labels resolved; missing = not measured this step)."""

    kind: str  # "step"
    step: int
    grad_norm: float | None = None
    group_grad_norm: dict[str, float] = field(default_factory=dict)
    clip_threshold: dict[str, float] = field(default_factory=dict)
    clip_scale_ratio: dict[str, float] = field(default_factory=dict)
    clipped_updates: dict[str, float] = field(default_factory=dict)  # cumulative per group
    param_grad_norm: dict[str, float] = field(default_factory=dict)
    param_clip_threshold: dict[str, float] = field(default_factory=dict)


@dataclass
class QuantValues:
    """One sampling step's quantization error ratios, per (group, state)."""

    kind: str  # "quant"
    step: int
    ratio: dict[tuple[str, str], float] = field(default_factory=dict)


@dataclass
class _Meta:
    """What the host knows about a submitted vector (which slots carry data)."""

    kind: str
    step: int
    groups: int
    top: int
    devices: int
    has_total: bool = True  # the vector's last value is the global norm's square
    norm_groups: set[int] = field(default_factory=set)
    clip_groups: set[int] = field(default_factory=set)
    norm_tops: set[int] = field(default_factory=set)
    clip_tops: set[int] = field(default_factory=set)
    quant_slots: set[int] = field(default_factory=set)
    parts: list[np.ndarray] = field(default_factory=list)


class StepAggregator:
    """Reduces step reports on the device and decodes them on the host (see module docs).

    Args:
        table: the parameters' labels and top-k slots.
        copies: the device-to-host channel (one is created if not given).
        compute_grad_norms: also measure gradient norms of parameters without percentile
            clipping (one extra read of their gradients, through the backend's batched
            ``grad_norm_sq``, on the steps submitted with ``measure=True``); clipped
            parameters' norms come free from clipping, every step.
    """

    def __init__(self, table: ParamTable, copies: HostCopies | None = None, compute_grad_norms: bool = True):
        self.table = table
        self.copies = copies or HostCopies()
        self.compute_grad_norms = compute_grad_norms
        self._meta: dict[tuple[str, int], _Meta] = {}
        self._indices: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._clipped: dict[torch.device, torch.Tensor] = {}  # running clipped counts per group
        self._plans: dict[bool, _Plan] = {}  # by "unclipped norms measured this step"

    # -- device side ---------------------------------------------------------------------------

    def _index(self, device: torch.device, values: Sequence[int]) -> torch.Tensor:
        """A cached int64 index tensor on ``device``, copied without a host sync."""
        key = (device, tuple(values))
        found = self._indices.get(key)
        if found is not None:
            self._indices.move_to_end(key)
            return found
        host = torch.tensor(values, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        tensor = host.to(device, non_blocking=True)
        self._indices[key] = tensor
        if len(self._indices) > 16:
            self._indices.popitem(last=False)
        return tensor

    def _clipped_counts(self, device: torch.device, groups: int) -> torch.Tensor:
        acc = self._clipped.get(device)
        if acc is None or acc.numel() < groups:
            grown = torch.zeros(groups, dtype=torch.float64, device=device)
            if acc is not None:
                grown[: acc.numel()].copy_(acc)
            acc = self._clipped[device] = grown
        return acc

    def submit(self, report: StepReport, measure: bool = True) -> dict[str, int]:
        """Reduce ``report`` on the device(s) and start copying the results to the host.
        ``measure``: measure the gradient norms of unclipped parameters this step (else the
        step reports only what clipping measured: no group, total or per-parameter norms
        when some of them would be missing). Returns how many parameters of each group went
        through percentile clipping."""
        plan = self._plan_for(report, measure and self.compute_grad_norms)
        self._submit_step(report, plan)
        if report.quant_errors:
            self._submit_quant(report)
        return plan.clip_evaluations

    def _plan_for(self, report: StepReport, measure: bool) -> "_Plan":
        """The step's layout (which rows go where), reused while the parameters with
        gradients and their clipping stay the same - the usual case, step after step."""
        params = [r.param for r in report.params]
        clipped = [r.clip_threshold is not None for r in report.params]
        plan = self._plans.get(measure)
        if (plan is None or plan.clipped != clipped or len(plan.params) != len(params)
                or not all(a is b for a, b in zip(plan.params, params))):
            plan = self._plans[measure] = self._build_plan(report, params, clipped, measure)
        return plan

    def _build_plan(self, report: StepReport, params: list, clipped: list[bool], measure: bool) -> "_Plan":
        plan = _Plan(params, clipped)
        by_device: dict[torch.device, _DevicePlan] = {}
        for i, r in enumerate(report.params):
            entry = self.table.entry(r.param, r.name, r.group)
            if clipped[i] and r.grad_norm is not None and r.clip_scale is not None:
                device = r.grad_norm.device
                target = by_device.setdefault(device, _DevicePlan(device))
                target.clipped.append(i)
                target.clipped_entries.append(entry)
                plan.clip_evaluations[entry.group_label] = plan.clip_evaluations.get(entry.group_label, 0) + 1
            elif self.compute_grad_norms and r.param is not None and r.param.grad is not None:
                if not measure:
                    plan.partial = True  # this parameter's norm is missing this step
                    continue
                device = _local(r.param.grad).device
                target = by_device.setdefault(device, _DevicePlan(device))
                target.measured.append(i)
                target.measured_entries.append(entry)
        for dp in by_device.values():
            entries = dp.clipped_entries + dp.measured_entries
            if not plan.partial:  # (partial sums would read as norms: report none)
                dp.norm_groups = {e.group_index for e in entries}
                dp.norm_tops = {e.top_slot for e in entries}
            dp.clip_groups = {e.group_index for e in dp.clipped_entries}
            dp.clip_tops = {e.top_slot for e in dp.clipped_entries}
            dp.group_index = self._index(dp.device, [e.group_index for e in entries])
            dp.top_index = self._index(dp.device, [e.top_slot for e in entries])
            if dp.clipped:
                dp.clip_group_index = self._index(dp.device, [e.group_index for e in dp.clipped_entries])
                dp.clip_top_index = self._index(dp.device, [e.top_slot for e in dp.clipped_entries])
        plan.devices = list(by_device.values())
        return plan

    def _submit_step(self, report: StepReport, plan: "_Plan") -> None:
        if not plan.devices:
            return
        groups, top = len(self.table.group_labels), len(self.table.top_names)
        meta = _Meta("step", report.step, groups, top, len(plan.devices), has_total=not plan.partial)
        for dp in plan.devices:
            meta.norm_groups |= dp.norm_groups
            meta.norm_tops |= dp.norm_tops
            meta.clip_groups |= dp.clip_groups
            meta.clip_tops |= dp.clip_tops
            self.copies.submit(("step", report.step, str(dp.device)), self._pack_step(report, dp, groups, top))
        self._meta[("step", report.step)] = meta

    def _pack_step(self, report: StepReport, dp: "_DevicePlan", groups: int, top: int) -> torch.Tensor:
        rows = report.params
        f64 = dict(dtype=torch.float64, device=dp.device)
        squares = []
        if dp.clipped:
            squares.append(torch.stack([rows[i].grad_norm for i in dp.clipped]).to(torch.float64).square())
        if dp.measured:
            grads = [_local(rows[i].param.grad) for i in dp.measured]
            squares.append(torch.stack(dispatch.grad_norm_sq(grads)).to(torch.float64))
        nsq = torch.cat(squares) if len(squares) > 1 else squares[0]
        group_nsq = torch.zeros(groups, **f64).index_add_(0, dp.group_index, nsq)
        top_nsq = torch.zeros(top, **f64).index_add_(0, dp.top_index, nsq)
        acc = self._clipped_counts(dp.device, groups)
        if dp.clipped:
            c_nsq = nsq[: len(dp.clipped)]
            thr_sq = torch.stack([rows[i].clip_threshold for i in dp.clipped]).to(torch.float64).square()
            scale = torch.stack([rows[i].clip_scale for i in dp.clipped]).to(torch.float64)
            acc.index_add_(0, dp.clip_group_index, (scale < 1).to(torch.float64))
            per_group = torch.zeros(3, groups, **f64)
            per_group[0].index_add_(0, dp.clip_group_index, c_nsq)
            per_group[1].index_add_(0, dp.clip_group_index, scale.square() * c_nsq)
            per_group[2].index_add_(0, dp.clip_group_index, thr_sq)
            top_thr = torch.zeros(top, **f64).index_add_(0, dp.clip_top_index, thr_sq)
        else:
            per_group = torch.zeros(3 * groups, **f64)
            top_thr = torch.zeros(top, **f64)
        return torch.cat([group_nsq, per_group.reshape(-1), acc[:groups], top_nsq, top_thr, nsq.sum().reshape(1)])

    def _submit_quant(self, report: StepReport) -> None:
        groups = len(self.table.group_labels)
        by_device: dict[torch.device, list] = {}
        for s in report.quant_errors:
            entry = self.table.entry(s.param, s.name, s.group)
            slot = entry.group_index * len(STATES) + STATES.index(s.state)
            by_device.setdefault(s.error_sq.device, []).append((slot, s))
        meta = _Meta("quant", report.step, groups, 0, len(by_device))
        for device, items in by_device.items():
            meta.quant_slots.update(slot for slot, _ in items)
            idx = self._index(device, [slot for slot, _ in items])
            size = groups * len(STATES)
            err = torch.stack([s.error_sq for _, s in items]).to(torch.float64)
            ref = torch.stack([s.reference_sq for _, s in items]).to(torch.float64)
            f64 = dict(dtype=torch.float64, device=device)
            packed = torch.cat([torch.zeros(size, **f64).index_add_(0, idx, err),
                                torch.zeros(size, **f64).index_add_(0, idx, ref)])
            self.copies.submit(("quant", report.step, str(device)), packed)
        self._meta[("quant", report.step)] = meta

    # -- host side -----------------------------------------------------------------------------

    def poll(self, wait: bool = False) -> list[StepValues | QuantValues]:
        """Decoded values of every step whose copies have all arrived, oldest first."""
        arrived = self.copies.wait() if wait else self.copies.poll()
        out: list[StepValues | QuantValues] = []
        for (kind, step, _device), values in arrived:
            meta = self._meta.get((kind, step))
            if meta is None:
                continue
            meta.parts.append(values)
            if len(meta.parts) < meta.devices:
                continue
            del self._meta[(kind, step)]
            out.append(self._decode_step(meta) if kind == "step" else self._decode_quant(meta))
        self._forget_dropped()
        return out

    def _forget_dropped(self) -> None:
        # Vectors dropped by a full channel never arrive: keep the bookkeeping bounded.
        if len(self._meta) > 4 * self.copies.slots:
            for key in sorted(self._meta, key=lambda k: k[1])[: len(self._meta) - 4 * self.copies.slots]:
                del self._meta[key]

    def _decode_step(self, meta: _Meta) -> StepValues:
        g, k = meta.groups, meta.top
        total = np.sum(meta.parts, axis=0)
        group_nsq, c_nsq, scaled_sq, thr_sq = (total[i * g:(i + 1) * g] for i in range(4))
        clipped = total[4 * g:5 * g]
        top_nsq, top_thr_sq = total[5 * g:5 * g + k], total[5 * g + k:5 * g + 2 * k]
        labels, names = self.table.group_labels, self.table.top_names
        v = StepValues("step", meta.step, grad_norm=_sqrt(total[-1]) if meta.has_total else None)
        for i in meta.norm_groups:
            v.group_grad_norm[labels[i]] = _sqrt(group_nsq[i])
        for i in meta.clip_groups:
            v.clip_threshold[labels[i]] = _sqrt(thr_sq[i])
            v.clip_scale_ratio[labels[i]] = _sqrt(scaled_sq[i] / c_nsq[i]) if c_nsq[i] > 0 else 1.0
        for i in range(g):
            v.clipped_updates[labels[i]] = float(clipped[i])
        for i in meta.norm_tops:
            v.param_grad_norm[names[i]] = _sqrt(top_nsq[i])
        for i in meta.clip_tops:
            v.param_clip_threshold[names[i]] = _sqrt(top_thr_sq[i])
        return v

    def _decode_quant(self, meta: _Meta) -> QuantValues:
        total = np.sum(meta.parts, axis=0)
        size = meta.groups * len(STATES)
        err, ref = total[:size], total[size:]
        v = QuantValues("quant", meta.step)
        for slot in meta.quant_slots:
            label = self.table.group_labels[slot // len(STATES)]
            v.ratio[(label, STATES[slot % len(STATES)])] = _sqrt(err[slot] / ref[slot]) if ref[slot] > 0 else 0.0
        return v


@dataclass
class _DevicePlan:
    """One device's rows of a step: positions in ``report.params``, labels, index tensors."""

    device: torch.device
    clipped: list[int] = field(default_factory=list)
    measured: list[int] = field(default_factory=list)
    clipped_entries: list[ParamEntry] = field(default_factory=list)
    measured_entries: list[ParamEntry] = field(default_factory=list)
    norm_groups: set[int] = field(default_factory=set)
    norm_tops: set[int] = field(default_factory=set)
    clip_groups: set[int] = field(default_factory=set)
    clip_tops: set[int] = field(default_factory=set)
    group_index: torch.Tensor | None = None
    top_index: torch.Tensor | None = None
    clip_group_index: torch.Tensor | None = None
    clip_top_index: torch.Tensor | None = None


@dataclass
class _Plan:
    params: list
    clipped: list[bool]
    devices: list[_DevicePlan] = field(default_factory=list)
    clip_evaluations: dict[str, int] = field(default_factory=dict)
    partial: bool = False  # unclipped parameters' norms not measured this step


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else float("nan")
