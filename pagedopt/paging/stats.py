"""Pager statistics: gauges (bytes by location) and counters (transfers by direction and reason).

Names follow Prometheus conventions so the exporter can map them one to one:
``*_bytes`` are gauges or byte counters, ``*_total`` are counters, ``*_seconds`` durations.
Transfers are counted by ``(direction, reason)``; the exporter publishes them as
``pagedopt_page_transfers_total{direction,reason}`` and
``pagedopt_page_transfer_bytes_total{direction,reason}``.

Reasons. Page-in (``direction="in"``): ``demand`` (needed by the current update and not
prefetched: the step waited for it), ``prefetch`` (moved ahead of its update). Page-out
(``direction="out"``): ``offload`` (policy ``offload`` after the update), ``budget`` (LRU
eviction to stay under ``device_budget_bytes``), ``pressure`` (free device memory below
``reserve_free_bytes``), ``capacity`` (a device allocation failed; room was made),
``overdraft`` (a parameter larger than the room streamed through and left again),
``manual`` (:meth:`Pager.evict`).

Overdrafts: a parameter whose state does not fit even after everything else left the
device streams through alone; ``budget_overdrafts_total`` counts those that exceeded the
budget, ``pressure_overdrafts_total`` those that broke the watermark or the device capacity,
``max_overdraft_bytes`` is the largest state that streamed through.

Example:
    >>> from pagedopt.paging.stats import PagerStats
    >>> s = PagerStats()
    >>> s.count_transfer("in", "demand", 4096)
    >>> s.as_dict()["page_in_bytes"], s.as_dict()["page_transfers_total"]
    (4096, {'in': {'demand': 1}})
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

DIRECTIONS = ("in", "out")
REASONS_IN = ("demand", "prefetch")
REASONS_OUT = ("offload", "budget", "pressure", "capacity", "overdraft", "manual")


@dataclass
class PagerStats:
    """Counters kept by the pager (gauges are computed from its buffers when asked).

    Example:
        >>> from pagedopt.paging.stats import PagerStats
        >>> s = PagerStats()
        >>> s.count_transfer("out", "budget", 100)
        >>> s.as_dict()["page_transfer_bytes_total"]
        {'out': {'budget': 100}}
    """

    peak_device_bytes: int = 0
    prefetch_stall_seconds: float = 0.0
    transfers: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    transfer_bytes: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    budget_overdrafts_total: int = 0
    pressure_overdrafts_total: int = 0
    max_overdraft_bytes: int = 0
    pressure_events_total: int = 0
    allocation_failures_total: int = 0
    allocation_fallbacks_total: int = 0
    visits_total: int = 0
    chunks_total: int = 0
    copy_seconds: dict[str, float] = field(default_factory=lambda: {"in": 0.0, "out": 0.0})
    thrash_transfers_total: int = 0
    thrash_bytes_total: int = 0
    steps_seen: int = 0
    last_step_bytes: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})
    _step: int = 0
    _step_start: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})
    _step_of: dict[int, Any] = field(default_factory=dict)

    def note_step(self, key: Any, step: Any) -> None:
        """A visit starts; it opens a new step when the first parameter's step counter moved
        (the prepare and update passes of one step share it; the optimizer counts up before
        visiting)."""
        if step is not None and self._step_of.get(id(key)) == step:
            return
        self._step_of = {id(key): step}
        if self.steps_seen:
            self.last_step_bytes = {d: self.bytes_moved(d) - self._step_start[d] for d in DIRECTIONS}
        self._step_start = {d: self.bytes_moved(d) for d in DIRECTIONS}
        self.steps_seen += 1
        self._step += 1

    def count_step_page_in(self, buf: Any) -> None:
        """Thrashing: the same state paged in twice in one step."""
        if getattr(buf, "step_in", None) == self._step:
            self.thrash_transfers_total += 1
            self.thrash_bytes_total += buf.nbytes
        buf.step_in = self._step

    def count_transfer(self, direction: str, reason: str, nbytes: int) -> None:
        self.transfers[direction][reason] += 1
        self.transfer_bytes[direction][reason] += nbytes

    def bytes_moved(self, direction: str) -> int:
        return sum(self.transfer_bytes[direction].values())

    def as_dict(self) -> dict[str, Any]:
        """Plain data (nested dicts for the labelled counters)."""
        return {
            "peak_device_bytes": self.peak_device_bytes,
            "page_in_bytes": self.bytes_moved("in"),
            "page_out_bytes": self.bytes_moved("out"),
            "page_ins_total": sum(self.transfers["in"].values()),
            "page_outs_total": sum(self.transfers["out"].values()),
            "page_transfers_total": {d: dict(r) for d, r in self.transfers.items() if r},
            "page_transfer_bytes_total": {d: dict(r) for d, r in self.transfer_bytes.items() if r},
            "prefetch_stall_seconds": self.prefetch_stall_seconds,
            "budget_overdrafts_total": self.budget_overdrafts_total,
            "pressure_overdrafts_total": self.pressure_overdrafts_total,
            "max_overdraft_bytes": self.max_overdraft_bytes,
            "pressure_events_total": self.pressure_events_total,
            "allocation_failures_total": self.allocation_failures_total,
            "allocation_fallbacks_total": self.allocation_fallbacks_total,
            "visits_total": self.visits_total,
            "chunks_total": self.chunks_total,
            "copy_seconds_total": dict(self.copy_seconds),
            "thrash_transfers_total": self.thrash_transfers_total,
            "thrash_bytes_total": self.thrash_bytes_total,
            "steps_seen": self.steps_seen,
            # the last complete step, plus the one in progress
            "last_step_page_bytes": dict(self.last_step_bytes),
            "current_step_page_bytes": {d: self.bytes_moved(d) - self._step_start[d] for d in DIRECTIONS},
        }
