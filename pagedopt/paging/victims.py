"""Finding the ``next_use`` eviction victim without scanning every resident buffer.

:func:`pagedopt.paging.eviction.pick_victim` ranks all candidates, so with N resident buffers
every eviction costs O(N) and a step that streams N buffers through a budget costs O(N^2)
(1,024 small state buffers under a 50% budget: 264 ms of host time per step, 95% of it in
that scan). During a visit the ranking only depends on each buffer's plan position, the
cursor and the stable prefix, so a :class:`VictimIndex` per device mover keeps the resident
buffers in the order the ranking needs:

* ``outside``: not in this visit's plan (class 4, evicted first), least recently paged in first;
* ``moving`` and ``stable``: in the plan, outside and inside the stable prefix, sorted by plan
  position. The victim is the farthest-needed buffer: the largest position before the cursor
  (used already; next needed only next step), else the largest after it, and the stable set
  only when nothing else is left.

The index is built when a visit starts (O(N log N) once per step), learns every buffer that
becomes resident during the visit (:meth:`VictimIndex.add`, called from the pager's
accounting), and forgets lazily: an entry is checked when reached and dropped when the buffer
left the device or changed plan position. A pick looks at the few buffers near the top of one
list, and prefetch restrictions (:func:`~pagedopt.paging.eviction.prefetch_may_evict`) apply
unchanged. Between equal positions (a parameter's two state buffers) the one paged in first
goes first, as in :func:`~pagedopt.paging.eviction.pick_victim`.

Example:
    >>> from types import SimpleNamespace as B
    >>> from pagedopt.paging.victims import VictimIndex
    >>> mover = B(resident={})
    >>> bufs = [B(serial=i, plan_visit=3, plan_index=i, pins=0, arrived_visit=3) for i in range(4)]
    >>> mover.resident.update((b.serial, b) for b in bufs)
    >>> index = VictimIndex(mover, visit=3, stable=1)
    >>> index.pick(cursor=2, target_index=None, movable=lambda b: True).plan_index  # used, farthest
    1
    >>> index.pick(cursor=0, target_index=None, movable=lambda b: True).plan_index  # all ahead
    3
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any, Callable

from .eviction import prefetch_may_evict


class VictimIndex:
    """The resident buffers of one device mover, ordered for ``next_use`` eviction during one
    visit (see the module docstring)."""

    def __init__(self, mover: Any, visit: int, stable: int) -> None:
        self.mover = mover
        self.visit = visit
        self.stable = stable
        self._order = itertools.count()
        self.outside: list[Any] = []  # LRU order; a head pointer skips what left
        self._outside_head = 0
        self.moving: list[tuple[int, int, Any]] = []  # (plan_index, -order, buffer), sorted
        self.stable_list: list[tuple[int, int, Any]] = []
        self._keys: dict[int, tuple[int, int, Any]] = {}  # serial -> its entry (duplicates ignored)
        for buf in mover.resident.values():
            self.add(buf)

    def add(self, buf: Any) -> None:
        """``buf`` is resident (now, or when the visit started)."""
        if buf.plan_visit != self.visit:
            self.outside.append(buf)
            return
        entry = (buf.plan_index, -next(self._order), buf)
        old = self._keys.get(buf.serial)
        if old is not None and old[0] == buf.plan_index and old[2] is buf and self._valid(old):
            return  # already listed, still valid
        self._keys[buf.serial] = entry
        bisect.insort(self.stable_list if buf.plan_index < self.stable else self.moving, entry, key=_position)

    # -- picking -----------------------------------------------------------------------------

    def pick(self, cursor: int, target_index: int | None, movable: Callable[[Any], bool]) -> Any:
        """The victim, or None. ``movable(buf)``: whether it may move (it may also drop an
        orphaned buffer and say no)."""
        victim = self._pick_outside(movable)
        if victim is not None:
            return victim
        # used already in this visit (positions before the cursor), farthest first
        victim = self._pick_down(self.moving, self._split(cursor), cursor, target_index, movable)
        if victim is None:  # still ahead: the farthest first (split again: stale entries went)
            victim = self._pick_down(self.moving, len(self.moving), cursor, target_index, movable,
                                     stop=self._split(cursor))
        if victim is None and target_index is None:  # prefetches never evict the stable set
            victim = self._pick_down(self.stable_list, len(self.stable_list), cursor, None, movable)
        return victim

    def _split(self, cursor: int) -> int:
        """Index of the first ``moving`` entry at or after the cursor."""
        return bisect.bisect_left(self.moving, (cursor, -float("inf")), key=_position)

    def _pick_outside(self, movable: Callable[[Any], bool]) -> Any:
        outside, i = self.outside, self._outside_head
        while i < len(outside) and not self._resident_outside(outside[i]):
            i += 1  # left the device (or joined the plan) since: forget it
        self._outside_head = i
        for buf in itertools.islice(outside, i, None):
            if self._resident_outside(buf) and not buf.pins and movable(buf):
                return buf
        return None

    def _pick_down(self, entries: list[tuple[int, int, Any]], top: int, cursor: int, target_index: int | None,
                   movable: Callable[[Any], bool], stop: int = 0) -> Any:
        """The first acceptable buffer of entries[stop:top], from the top down; drops stale
        entries on the way."""
        i = top - 1
        while i >= stop:
            entry = entries[i]
            buf = entry[2]
            if not self._valid(entry):
                del entries[i]
                if self._keys.get(buf.serial) is entry:
                    del self._keys[buf.serial]
                i -= 1
                continue
            if target_index is not None:
                if buf.plan_index >= cursor and buf.plan_index <= target_index:
                    return None  # sorted: everything below is needed before the prefetch target
                if not prefetch_may_evict(buf, self.visit, cursor, target_index, self.stable):
                    i -= 1
                    continue
            if not buf.pins and movable(buf):
                return buf
            i -= 1
        return None

    def _valid(self, entry: tuple[int, int, Any]) -> bool:
        buf = entry[2]
        return (self.mover.resident.get(buf.serial) is buf and buf.plan_visit == self.visit
                and buf.plan_index == entry[0])

    def _resident_outside(self, buf: Any) -> bool:
        return self.mover.resident.get(buf.serial) is buf and buf.plan_visit != self.visit


def _position(entry: tuple[int, int, Any]) -> tuple[int, float]:
    return entry[0], entry[1]
