"""The victim index (pagedopt/paging/victims.py) picks what the full ranking
(pagedopt/paging/eviction.pick_victim) picks, on random resident sets, cursors and prefetch
targets - the same eviction class and plan position (between a parameter's two buffers at one
position either may go first) - and the same "nothing to evict"."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from pagedopt.paging.eviction import next_use_key, pick_victim
from pagedopt.paging.victims import VictimIndex


def _world(rng: random.Random, visit: int):
    n = rng.randint(0, 40)
    bufs = []
    for serial in range(n):
        in_plan = rng.random() < 0.85
        bufs.append(SimpleNamespace(
            serial=serial, plan_visit=visit if in_plan else visit - 1, plan_index=rng.randint(0, 15),
            pins=1 if rng.random() < 0.15 else 0, arrived_visit=visit if rng.random() < 0.5 else visit - 1,
            movable=rng.random() < 0.9))
    rng.shuffle(bufs)  # resident (LRU) order
    return SimpleNamespace(resident={b.serial: b for b in bufs}), bufs


@pytest.mark.parametrize("seed", range(300))
def test_index_picks_what_the_full_ranking_picks(seed):
    rng = random.Random(seed)
    visit = 7
    mover, bufs = _world(rng, visit)
    stable = rng.choice([0, 0, 2, 5])
    index = VictimIndex(mover, visit, stable)
    for _ in range(6):
        cursor = rng.randint(0, 15)
        target = rng.choice([None, None, rng.randint(cursor, 16)])
        candidates = [b for b in mover.resident.values() if not b.pins and b.movable]
        expected = pick_victim(candidates, "next_use", visit, cursor, target, stable)
        got = index.pick(cursor, target, lambda b: b.movable)
        if expected is None:
            assert got is None
        else:
            assert got is not None
            assert next_use_key(got, visit, cursor, stable) == next_use_key(expected, visit, cursor, stable)
        # the world moves on: the victim leaves, a buffer of the plan arrives
        if got is not None:
            del mover.resident[got.serial]
        if rng.random() < 0.7:
            new = SimpleNamespace(serial=1000 + rng.randint(0, 10**6), plan_visit=visit, plan_index=rng.randint(0, 15),
                                  pins=0, arrived_visit=visit, movable=True)
            mover.resident[new.serial] = new
            index.add(new)
