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
    >>> agg.submit(rec.reports[0])
    >>> [round(v.grad_norm, 3) for v in agg.poll() if v.kind == "step"]
    [32.0]
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..functional import dispatch
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
            clipping (one extra read of their gradients per step, through the backend's
            batched ``grad_norm_sq``); clipped parameters' norms come free from clipping.
    """

    def __init__(self, table: ParamTable, copies: HostCopies | None = None, compute_grad_norms: bool = True):
        self.table = table
        self.copies = copies or HostCopies()
        self.compute_grad_norms = compute_grad_norms
        self._meta: dict[tuple[str, int], _Meta] = {}
        self._indices: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._clipped: dict[torch.device, torch.Tensor] = {}  # running clipped counts per group

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

    def submit(self, report: StepReport) -> None:
        """Reduce ``report`` on the device(s) and start copying the results to the host."""
        self._submit_step(report)
        if report.quant_errors:
            self._submit_quant(report)

    def _rows(self, report: StepReport) -> dict[torch.device, "_DeviceRows"]:
        """Group the report's parameters by device: clipped ones (norm, threshold and scale
        from clipping) and, if asked, the others (squared norms measured here)."""
        rows: dict[torch.device, _DeviceRows] = {}
        unclipped: dict[torch.device, list[tuple[ParamEntry, torch.Tensor]]] = {}
        for r in report.params:
            entry = self.table.entry(r.param, r.name, r.group)
            if r.grad_norm is not None and r.clip_threshold is not None and r.clip_scale is not None:
                rows.setdefault(r.grad_norm.device, _DeviceRows()).add_clipped(entry, r)
            elif self.compute_grad_norms and r.param is not None and r.param.grad is not None:
                grad = r.param.grad
                to_local = getattr(grad, "to_local", None)
                grad = to_local() if callable(to_local) else grad
                unclipped.setdefault(grad.device, []).append((entry, grad))
        for device, items in unclipped.items():
            norms_sq = dispatch.grad_norm_sq([g for _, g in items])
            target = rows.setdefault(device, _DeviceRows())
            for (entry, _), nsq in zip(items, norms_sq):
                target.add_measured(entry, nsq)
        return rows

    def _submit_step(self, report: StepReport) -> None:
        rows_by_device = self._rows(report)
        if not rows_by_device:
            return
        groups, top = len(self.table.group_labels), len(self.table.top_names)
        meta = _Meta("step", report.step, groups, top, len(rows_by_device))
        for device, rows in rows_by_device.items():
            entries = rows.clipped_entries + rows.measured_entries
            meta.norm_groups.update(e.group_index for e in entries)
            meta.norm_tops.update(e.top_slot for e in entries)
            meta.clip_groups.update(e.group_index for e in rows.clipped_entries)
            meta.clip_tops.update(e.top_slot for e in rows.clipped_entries)
            self.copies.submit(("step", report.step, str(device)), self._pack_step(device, rows, groups, top))
        self._meta[("step", report.step)] = meta

    def _pack_step(self, device: torch.device, rows: "_DeviceRows", groups: int, top: int) -> torch.Tensor:
        f64 = dict(dtype=torch.float64, device=device)
        squares = []
        if rows.clipped_entries:
            squares.append(torch.stack(rows.norms).to(torch.float64).square())
        if rows.measured_entries:
            squares.append(torch.stack(rows.norms_sq).to(torch.float64))
        nsq = torch.cat(squares) if len(squares) > 1 else squares[0]
        entries = rows.clipped_entries + rows.measured_entries
        gidx = self._index(device, [e.group_index for e in entries])
        tidx = self._index(device, [e.top_slot for e in entries])
        group_nsq = torch.zeros(groups, **f64).index_add_(0, gidx, nsq)
        top_nsq = torch.zeros(top, **f64).index_add_(0, tidx, nsq)
        acc = self._clipped_counts(device, groups)
        n_clipped = len(rows.clipped_entries)
        if n_clipped:
            cg = self._index(device, [e.group_index for e in rows.clipped_entries])
            ct = self._index(device, [e.top_slot for e in rows.clipped_entries])
            c_nsq = nsq[:n_clipped]
            thr_sq = torch.stack(rows.thresholds).to(torch.float64).square()
            scale = torch.stack(rows.scales).to(torch.float64)
            acc.index_add_(0, cg, (scale < 1).to(torch.float64))
            per_group = torch.zeros(3, groups, **f64)
            per_group[0].index_add_(0, cg, c_nsq)
            per_group[1].index_add_(0, cg, scale.square() * c_nsq)
            per_group[2].index_add_(0, cg, thr_sq)
            top_thr = torch.zeros(top, **f64).index_add_(0, ct, thr_sq)
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
        v = StepValues("step", meta.step, grad_norm=math.sqrt(total[-1]) if total[-1] >= 0 else float("nan"))
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


class _DeviceRows:
    """One device's parameters of a step, as lists ready for ``torch.stack``."""

    def __init__(self) -> None:
        self.clipped_entries: list[ParamEntry] = []
        self.norms: list[torch.Tensor] = []
        self.thresholds: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []
        self.measured_entries: list[ParamEntry] = []
        self.norms_sq: list[torch.Tensor] = []

    def add_clipped(self, entry: ParamEntry, r: Any) -> None:
        self.clipped_entries.append(entry)
        self.norms.append(r.grad_norm)
        self.thresholds.append(r.clip_threshold)
        self.scales.append(r.clip_scale)

    def add_measured(self, entry: ParamEntry, norm_sq: torch.Tensor) -> None:
        self.measured_entries.append(entry)
        self.norms_sq.append(norm_sq)


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else float("nan")
