"""The managed-memory mover's stream/event protocol, checked on CPU with a recording fake
of the CUDA calls (the real driver is exercised by ``test_paging_cuda.py`` on a GPU).

What must hold on a GPU, checked here on the recorded call sequence:

* every update of a buffer comes after its last prefetch went to the device, and after the
  compute stream waited on the event recorded behind that prefetch on the side stream;
* every page-out (prefetch to the host) waits on the side stream for the event recorded on
  the compute stream after the buffer's last update;
* the last prefetch of each buffer (what ``cuMemRangeGetAttribute`` reports) is where the
  pager's books say the buffer is.

Tolerance tier: **exact** (parameters compared with the unpaged optimizer bit for bit).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

import pagedopt
from pagedopt.paging import PagingConfig, managed, movers

from _paging_support import assert_identical, make_pair, train


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.ids = itertools.count()


class FakeEvent:
    def __init__(self, rec: Recorder, enable_timing: bool = False) -> None:
        self.rec, self.id = rec, next(rec.ids)

    def record(self, stream) -> None:
        self.rec.log.append(("record", stream.name, self.id))

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 2.0


class FakeStream:
    def __init__(self, rec: Recorder, name: str) -> None:
        self.rec, self.name, self.cuda_stream = rec, name, 0

    def wait_event(self, event: FakeEvent) -> None:
        self.rec.log.append(("wait", self.name, event.id))

    def synchronize(self) -> None:
        self.rec.log.append(("synchronize", self.name))


@pytest.fixture
def fake_cuda(monkeypatch):
    rec = Recorder()
    compute = FakeStream(rec, "compute")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream(rec, "side"))
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing=False: FakeEvent(rec, enable_timing))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index=None: 0)
    monkeypatch.setattr(managed, "allocate", lambda shape, dtype, index: torch.empty(shape, dtype=dtype))
    monkeypatch.setattr(managed, "advise", lambda t, preferred: rec.log.append(("advise", t.data_ptr(), preferred)))
    monkeypatch.setattr(
        managed, "prefetch", lambda t, where, stream: rec.log.append(("prefetch", stream.name, t.data_ptr(), where))
    )
    monkeypatch.setattr(managed, "device_free_bytes", lambda index: 1 << 40)
    return rec


def managed_pair(policy: str, rec: Recorder, **kw):
    cfg = PagingConfig(policy=policy, backend="simulated", device_budget_bytes=10_000, min_paged_numel=100,
                       prefetch_depth=1, **kw)
    ref, rp, paged, pp = make_pair("AdamW8bit", cfg)
    pager = paged.pager
    preferred = "host" if policy in ("offload", "budgeted") else None
    pager._movers[torch.device("cpu")] = movers.ManagedMover(torch.device("cuda", 0), preferred, True, pager.reserve > 0)
    original = paged._update_chunk

    def logged_update(works):
        for w in works:
            for key in ("state1", "state2"):
                if key in w.state and pager.location(w.key, key) is not None:
                    rec.log.append(("update", w.state[key].data_ptr()))
        original(works)

    paged._update_chunk = logged_update
    return ref, rp, paged, pp


def check_protocol(log: list[tuple]) -> dict[int, str]:
    last_prefetch: dict[int, tuple[str, int | None]] = {}  # ptr -> (where, event recorded behind it)
    pending_side_prefetch: list[int] = []
    waited_by_compute: set[int] = set()
    recorded_on: dict[int, str] = {}
    used_event: dict[int, int] = {}  # ptr -> event recorded on compute after its last update
    updated_since_used: set[int] = set()
    side_waited: set[int] = set()
    for entry in log:
        kind = entry[0]
        if kind == "prefetch":
            _, stream, ptr, where = entry
            if stream == "side" and where == "host" and ptr in used_event:
                assert used_event[ptr] in side_waited, "page-out did not wait for the buffer's last update"
            if stream == "side" and ptr in updated_since_used:
                raise AssertionError("moved a buffer whose update has no recorded event yet")
            last_prefetch[ptr] = (where, None)
            if stream == "side":
                pending_side_prefetch.append(ptr)
        elif kind == "record":
            _, stream, event = entry
            recorded_on[event] = stream
            if stream == "side":
                for ptr in pending_side_prefetch:
                    last_prefetch[ptr] = (last_prefetch[ptr][0], event)
                pending_side_prefetch.clear()
            else:
                for ptr in updated_since_used:
                    used_event[ptr] = event
                updated_since_used.clear()
        elif kind == "wait":
            _, stream, event = entry
            (waited_by_compute if stream == "compute" else side_waited).add(event)
        elif kind == "update":
            ptr = entry[1]
            where, event = last_prefetch[ptr]
            assert where == "device", "updated a buffer whose last prefetch went to the host"
            assert event is None or event in waited_by_compute, "update did not wait for its prefetch"
            updated_since_used.add(ptr)
    return {ptr: where for ptr, (where, _event) in last_prefetch.items()}


@pytest.mark.parametrize("policy", ["on_demand", "pipelined", "offload", "budgeted"])
def test_managed_mover_orders_prefetch_update_and_eviction(fake_cuda, policy):
    ref, rp, paged, pp = managed_pair(policy, fake_cuda)
    train(ref, rp, 3)
    train(paged, pp, 3)
    paged.pager.evict([pp[0]])
    assert_identical(ref, rp, paged, pp)
    final = check_protocol(fake_cuda.log)
    for param, key, _n in paged.pager.paged_buffers():
        assert final[paged.state[param][key].data_ptr()] == paged.pager.location(param, key)
    stats = paged.pager.stats()
    assert stats["page_in_bytes"] > 0 and stats["backend"] == "managed"
    paged.pager.verify_accounting(physical=False)


def test_managed_mover_advises_and_measures_stalls_on_the_gpu_timeline(fake_cuda):
    ref, rp, paged, pp = managed_pair("offload", fake_cuda, reserve_free_bytes=1000)
    train(paged, pp, 2)
    advice = {entry[2] for entry in fake_cuda.log if entry[0] == "advise"}
    assert advice == {"host"}, "offload prefers the host, with an accessed-by mapping for the GPU"
    stats = paged.pager.stats()
    waits = sum(1 for e in fake_cuda.log if e[0] == "wait" and e[1] == "compute")
    assert waits > 0 and stats["prefetch_stall_seconds"] > 0.0  # 2 ms per measured wait
    assert not any(e[0] == "synchronize" for e in fake_cuda.log), "the step never synchronizes"
    paged.pager.synchronize()
    assert fake_cuda.log[-1] == ("synchronize", "side")
