"""CPython's cyclic garbage collector is paused while ``optimizer.step()`` runs.

The per-item and prepare passes create a few small objects per tensor that live for the whole
step; a collection during the step would promote them, and enough promotions trigger full
collections of the whole process (~100 ms each with torch imported; benchmarks/bench_gc_pauses.py).
These tests check the mechanism (no collection of any generation starts inside a step, the
collector's state is restored, also after an error), not timings.
"""

from __future__ import annotations

import gc

import pytest
import torch

import pagedopt
from pagedopt.paging import PagingConfig


@pytest.fixture
def collections():
    """Generations of the collections that started while the list is ``armed``."""
    seen: list[int] = []
    armed = [False]

    def watch(phase, info):
        if phase == "start" and armed[0]:
            seen.append(info["generation"])

    gc.callbacks.append(watch)
    try:
        yield seen, armed
    finally:
        gc.callbacks.remove(watch)


def _paged_optimizer(n: int = 400):
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(n)]
    opt = pagedopt.PagedAdamW8bit(params, min_8bit_size=16,
                                  paging=PagingConfig(backend="simulated", min_paged_numel=1))
    for p in params:
        p.grad = torch.randn(64)
    return params, opt


def test_no_collection_starts_inside_a_step(collections):
    """400 paged parameters take the per-item visits: thousands of allocations per step, well
    past the young generation's threshold (700), yet no collection starts inside the step."""
    seen, armed = collections
    params, opt = _paged_optimizer()
    opt.step()
    assert len(opt._plan.per_item) == len(params)
    original = opt._step_body

    def watched_body():
        armed[0] = True
        try:
            original()
        finally:
            armed[0] = False

    opt._step_body = watched_body
    threshold = gc.get_threshold()[0]
    before = gc.get_count()[0]
    for _ in range(3):
        opt.step()
    assert gc.isenabled()
    assert seen == []
    # the steps did allocate past the threshold: without the pause a collection would start
    assert before + 3 * len(params) > threshold


def test_collector_state_is_restored_after_an_error_and_left_off_when_the_caller_turned_it_off():
    params, opt = _paged_optimizer(4)
    params[0].grad = torch.randn(64).to_sparse()  # the step raises, naming the parameter
    with pytest.raises(RuntimeError, match="sparse gradients are not supported"):
        opt.step()
    assert gc.isenabled()
    params[0].grad = torch.randn(64)
    gc.disable()
    try:
        opt.step()
        assert not gc.isenabled()
    finally:
        gc.enable()
