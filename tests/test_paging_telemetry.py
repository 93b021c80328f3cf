"""Paging cost and memory-controller telemetry: per-step bytes, thrashing, copy time, OOM
recoveries, and host residency of CPU training, through the real Prometheus sink.

Tolerance tier: exact byte counts (derived from the state sizes).
"""

from __future__ import annotations

import torch

import pagedopt
from pagedopt.paging import MemoryController, PagingConfig
from pagedopt.telemetry.prometheus import PrometheusSink
from pagedopt.telemetry.sink import attach

from telemetry_helpers import scrape, single, values


def _params(n=6, numel=5000):
    return [torch.nn.Parameter(torch.randn(numel, generator=torch.Generator().manual_seed(i))) for i in range(n)]


def _grads(params, step):
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + i))


def test_step_bytes_and_no_thrashing_under_next_use():
    params = _params()
    cfg = PagingConfig(policy="budgeted", backend="simulated", device_budget_bytes=3 * 10_000, min_paged_numel=1,
                       prefetch_depth=1)
    opt = pagedopt.PagedAdamW8bit(params, paging=cfg)
    for step in range(4):
        _grads(params, step)
        opt.step()
    stats = opt.pager.stats()
    # budget 3 of 6 parameters, stream room 2: one stays, five stream through each step
    assert stats["last_step_page_bytes"] == {"in": 5 * 10_000, "out": 5 * 10_000}
    assert stats["thrash_transfers_total"] == 0 and stats["steps_seen"] == 4
    assert stats["copy_seconds_total"]["in"] > 0 and stats["copy_seconds_total"]["out"] > 0


def test_two_pass_optimizer_under_offload_thrashes_and_is_exported():
    params = _params(4)
    cfg = PagingConfig(policy="offload", backend="simulated", min_paged_numel=1)
    opt = pagedopt.PagedLAMB8bit(params, paging=cfg, max_unorm=1.0)  # prepare pass + update pass
    sink = attach(opt, PrometheusSink(opt, run="thrash"))
    for step in range(3):
        _grads(params, step)
        opt.step()
    stats = opt.pager.stats()
    per_step = 4 * 10_000
    assert stats["thrash_bytes_total"] == 3 * per_step  # every buffer a second time, every step
    assert stats["last_step_page_bytes"]["in"] == 2 * per_step
    sink.finish()
    families = scrape(sink)
    assert single(families, "pagedopt_page_thrash_bytes_total") == 3 * per_step
    assert single(families, "pagedopt_step_page_bytes", direction="in") == 2 * per_step
    assert single(families, "pagedopt_staging_pool_bytes") > 0
    assert single(families, "pagedopt_page_copy_seconds_total", direction="out") > 0


def test_oom_recoveries_and_controller_readings_are_exported():
    params = _params(4)
    cfg = PagingConfig(policy="budgeted", backend="simulated", simulated_capacity_bytes=1_000_000,
                       device_budget_bytes=20_000, min_paged_numel=1)
    opt = pagedopt.PagedAdamW8bit(params, paging=cfg)
    ctrl = MemoryController(opt, {"target_free_bytes": 900_000})
    sink = attach(opt, PrometheusSink(opt, run="oom"))
    inner, fired = opt._update_chunk, []

    def failing(works):
        if not fired:
            fired.append(1)
            raise torch.OutOfMemoryError("injected")
        inner(works)

    opt._update_chunk = failing
    for step in range(2):
        ctrl.run_step(lambda step=step: (_grads(params, step), opt.step()))
    sink.finish()
    families = scrape(sink)
    assert single(families, "pagedopt_oom_recoveries_total", phase="optimizer.step") == 1
    assert single(families, "pagedopt_memory_target_free_bytes") == 900_000
    assert single(families, "pagedopt_memory_free_bytes") == ctrl.last["simulated"]["free_bytes"]
    assert single(families, "pagedopt_device_budget_bytes") == opt.pager.budget


def test_cpu_training_state_is_labelled_host():
    params = _params(2)
    opt = pagedopt.AdamW8bit(params)
    sink = attach(opt, PrometheusSink(opt, run="cpu"))
    _grads(params, 0)
    opt.step()
    sink.finish()
    families = scrape(sink)
    assert values(families, "pagedopt_state_bytes", residency="device") == {}
    assert sum(values(families, "pagedopt_state_bytes", residency="host").values()) > 0
