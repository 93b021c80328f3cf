"""Which resident state buffer makes room: the eviction rules of the pager.

Steps visit parameters in the same order every time, so the future is known: a buffer used
earlier in the current visit is next needed in the next step at its position, after
everything still ahead in this one. ``next_use`` (the default) evicts the buffer needed
farthest in the future (Belady's rule); for this cyclic access LRU evicts exactly the buffer
the next step needs first, so with a budget below the total state every byte moves every step.

With a budget, the plan's longest prefix that fits in the budget minus the stream's room
(the running parameter plus ``lookahead`` prefetched ones) is the *stable set*: it is evicted
last, so it stays resident from step to step and only the rest streams through.

Prefetches are optional: a prefetch that evicts a buffer which stayed resident from the
previous step saves latency once and costs a full transfer next step. So a prefetch may only
evict buffers not needed in this visit, buffers needed after the one it brings in, and
*streaming* buffers (paged in during this visit and already used). Demand page-ins may evict
anything unpinned. With a budget of half the state, the first budget-worth of state (minus the
room the stream needs) stays resident and only the rest moves: about half per step.

Example:
    >>> from types import SimpleNamespace as B
    >>> from pagedopt.paging.eviction import next_use_key
    >>> used = B(plan_visit=5, plan_index=1, arrived_visit=2)
    >>> ahead = B(plan_visit=5, plan_index=7, arrived_visit=5)
    >>> next_use_key(used, visit=5, cursor=4) > next_use_key(ahead, visit=5, cursor=4)
    True
"""

from __future__ import annotations

from typing import Any, Sequence


def stable_prefix(group_bytes: Sequence[int], budget: int | None, lookahead: int) -> int:
    """How many leading parameters (in visit order) form the stable resident set: the longest
    prefix that fits in the budget minus the room the stream needs (the running parameter and
    ``lookahead`` prefetched ones, each as large as the largest parameter's state). 0 without
    a budget (pure farthest-next-use)."""
    if budget is None or not group_bytes:
        return 0
    room = budget - (lookahead + 1) * max(group_bytes)
    total, count = 0, 0
    for nbytes in group_bytes:
        if total + nbytes > room:
            break
        total += nbytes
        count += 1
    return count


def next_use_key(buf: Any, visit: int, cursor: int, stable: int = 0) -> tuple[int, int]:
    """Order for ``next_use`` eviction (larger = evict first). ``stable``: the length of the
    stable prefix (its buffers go last)."""
    if buf.plan_visit != visit:
        return (4, 0)  # not needed this visit at all: first to go (LRU order among them)
    if buf.plan_index < stable:
        return (1, buf.plan_index)  # the stable set: only when nothing else is left
    if buf.plan_index < cursor:
        return (3, buf.plan_index)  # needed again next step, later ones farther away
    return (2, buf.plan_index)  # still ahead in this visit: the farthest one first


def prefetch_may_evict(buf: Any, visit: int, cursor: int, target_index: int, stable: int = 0) -> bool:
    """Whether a prefetch of the parameter at ``target_index`` may evict ``buf``."""
    if buf.plan_visit != visit:
        return True
    if buf.plan_index < stable:
        return False
    if buf.plan_index < cursor:
        # streaming state only; without a stable prefix, state that stayed from the last step stays
        return stable > 0 or buf.arrived_visit == visit
    return buf.plan_index > target_index


def pick_victim(candidates: Sequence[Any], eviction: str, visit: int, cursor: int,
                target_index: int | None, stable: int = 0) -> Any:
    """The buffer to evict among ``candidates`` (unpinned, movable, least recently used
    first), or ``None``. ``target_index``: the plan position a prefetch is for (``None``
    for a demand page-in, pressure or capacity); ``stable``: the stable prefix length."""
    if not candidates:
        return None
    if eviction == "lru" or cursor < 0:
        return candidates[0]
    if target_index is not None:
        candidates = [b for b in candidates if prefetch_may_evict(b, visit, cursor, target_index, stable)]
    return max(candidates, key=lambda b: next_use_key(b, visit, cursor, stable), default=None)
