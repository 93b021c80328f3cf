"""GPU tests of the managed-memory backend (``pytest -m cuda``; skipped without a GPU).

Managed allocations stay tiny (a few MiB in total): asking for more managed memory than a
card has free can hang the GPU.

Tolerance tier: **exact** (paging moves bytes; the unpaged optimizer is the oracle).
"""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch

import pagedopt
from pagedopt.paging import PagingConfig, live_bytes, managed

from _paging_support import assert_identical, make_params, total_state_bytes


def _why_not() -> str:
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU with a driver (torch.cuda.is_available() is False)"
    ok, why = managed.availability(torch.cuda.current_device())
    return "" if ok else f"managed memory unusable here: {why}"


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "ok")]

SHAPES = [(512, 384), (4097,), (1,), (300, 300), (0,), (200_000,)]  # ~0.5M elements in all
POLICIES = ["on_demand", "pipelined", "offload", "budgeted"]


def managed_config(policy: str, **kw) -> PagingConfig:
    kw.setdefault("min_paged_numel", 1000)
    kw.setdefault("device_budget_bytes", 300_000)  # below the 8-bit total: forces paging
    return PagingConfig(policy=policy, backend="managed", **kw)


def cuda_pair(name: str, config: PagingConfig):
    ref_params = [p.cuda() for p in make_params(SHAPES)]
    params = [p.cuda() for p in make_params(SHAPES)]
    ref_params = [torch.nn.Parameter(p.detach()) for p in ref_params]
    params = [torch.nn.Parameter(p.detach()) for p in params]
    ref = getattr(pagedopt, name)(ref_params, min_8bit_size=16)
    opt = getattr(pagedopt, name)(params, paging=config, min_8bit_size=16)
    return ref, ref_params, opt, params


def cuda_train(opt, params, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        opt.step()


def test_managed_tensor_is_zero_copy_cuda_and_freed():
    gc.collect()
    before = live_bytes("managed")
    t = managed.allocate((1024, 256), torch.float32, torch.cuda.current_device())
    assert t.is_cuda and t.shape == (1024, 256)
    assert live_bytes("managed") == before + 1024 * 256 * 4
    t.fill_(3.0)
    view = t[10:20]
    del t
    gc.collect()
    assert live_bytes("managed") > before, "a view keeps the allocation alive"
    assert float(view.sum()) == 3.0 * 10 * 256
    del view
    gc.collect()
    assert live_bytes("managed") == before


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", ["AdamW8bit", "Lion32bit"])
def test_managed_paged_equals_unpaged(name, policy):
    ref, rp, opt, pp = cuda_pair(name, managed_config(policy))
    cuda_train(ref, rp, 3)
    cuda_train(opt, pp, 3)
    torch.cuda.synchronize()
    assert_identical(ref, rp, opt, pp)
    stats = opt.pager.stats()
    assert stats["page_in_bytes"] > 0
    opt.pager.verify_accounting(physical=False)


@pytest.mark.parametrize("policy", POLICIES)
def test_residency_matches_cuMemRangeGetAttribute(policy):
    _, _, opt, pp = cuda_pair("AdamW8bit", managed_config(policy))
    cuda_train(opt, pp, 2)
    opt.pager.synchronize()
    torch.cuda.synchronize()
    checked = 0
    for param, key, _nbytes in opt.pager.paged_buffers():
        tensor = opt.state[param][key]
        assert managed.last_prefetch_location(tensor) == opt.pager.location(param, key), (policy, key)
        checked += 1
    assert checked >= 4
    if policy == "offload":
        assert opt.pager.stats()["device_bytes"] == 0


def test_visit_issues_no_host_sync():
    # The pager's part of the step (prefetch, wait, evict, the watermark's free-memory query)
    # must not synchronize; torch raises on any synchronizing call in this mode.
    cfg = managed_config("offload", reserve_free_bytes="64MiB", device_budget_bytes=None)
    _, _, opt, pp = cuda_pair("Lion32bit", cfg)
    cuda_train(opt, pp, 1)  # state created (allocation may synchronize; it is not the step)
    works = [SimpleNamespace(key=p, state=opt.state[p]) for p in pp if p in opt.state]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.pager.visit(works, lambda chunk: [w.state["state1"].mul_(0.5) for w in chunk])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert opt.pager.stats()["page_in_bytes"] > 0


def test_state_dict_round_trip_back_into_managed_memory():
    ref, rp, opt, pp = cuda_pair("AdamW8bit", managed_config("budgeted"))
    cuda_train(ref, rp, 2)
    cuda_train(opt, pp, 2)
    sd = opt.state_dict()
    fresh = pagedopt.AdamW8bit(pp, paging=managed_config("budgeted"), min_8bit_size=16)
    fresh.load_state_dict(sd)
    del opt, sd
    paged_total = sum(n for _p, _k, n in fresh.pager.paged_buffers())
    assert paged_total == total_state_bytes(fresh) - fresh.pager.stats()["unpaged_bytes"] > 0
    cuda_train(ref, rp, 1, start=2)
    cuda_train(fresh, pp, 1, start=2)
    torch.cuda.synchronize()
    assert_identical(ref, rp, fresh, pp)


def _is_allocated(ptr: int) -> bool:
    """Whether the driver still knows an allocation containing ``ptr``."""
    from cuda.bindings import driver

    err, _base, _size = driver.cuMemGetAddressRange(driver.CUdeviceptr(ptr))
    return err == driver.CUresult.CUDA_SUCCESS


def test_deleting_managed_optimizers_frees_managed_memory():
    # The managed state here is large (256 MiB per cycle) so that a leak of it stands out
    # from device memory that torch and the driver keep by design across optimizer lifetimes
    # (module loads, per-stream caches): on an H200 that was a steady ~110 MiB drop of free
    # memory over three small create/delete cycles with every managed byte freed.
    numel = 128 << 20
    params = [torch.nn.Parameter(torch.zeros(numel, device="cuda"))]
    params[0].grad = torch.full_like(params[0], 1e-3)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = live_bytes("managed")
    free_before, _ = torch.cuda.mem_get_info()
    for _ in range(3):
        opt = pagedopt.AdamW8bit(params, paging=managed_config("on_demand", device_budget_bytes=None))
        opt.step()
        torch.cuda.synchronize()
        assert live_bytes("managed") - before >= 2 * numel  # two 8-bit states, managed
        pointers = [opt.state[p][key].data_ptr() for p, key, _nbytes in opt.pager.paged_buffers()]
        assert pointers and all(_is_allocated(ptr) for ptr in pointers)
        del opt
        gc.collect()
        assert live_bytes("managed") == before
        assert not any(_is_allocated(ptr) for ptr in pointers), "cuMemFree was not called"
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free_after, _ = torch.cuda.mem_get_info()
    leaked_if_kept = 3 * 2 * numel
    assert free_before - free_after < leaked_if_kept // 3, (free_before - free_after) / 2**20


def test_stall_time_is_collected_without_syncing():
    _, _, opt, pp = cuda_pair("AdamW8bit", managed_config("offload", device_budget_bytes=None))
    cuda_train(opt, pp, 2)
    torch.cuda.synchronize()
    stats = opt.pager.stats()
    assert stats["prefetch_stall_seconds"] >= 0.0
    assert stats["page_transfers_total"]["out"]["offload"] > 0


# -- staged paging (pinned host homes, device staging slots, copy streams) --------------------


def staged_config(policy: str, **kw) -> PagingConfig:
    kw.setdefault("min_paged_numel", 1000)
    kw.setdefault("device_budget_bytes", 300_000 if policy == "budgeted" else None)
    return PagingConfig(policy=policy, backend="auto", **kw)


@pytest.mark.parametrize("policy", ["offload", "budgeted"])
@pytest.mark.parametrize("name", ["AdamW8bit", "Lion32bit"])
def test_staged_paged_equals_unpaged(name, policy):
    ref, rp, opt, pp = cuda_pair(name, staged_config(policy, chunk_bytes=65536))
    cuda_train(ref, rp, 3)
    cuda_train(opt, pp, 3)
    torch.cuda.synchronize()
    opt.pager.synchronize()
    assert_identical(ref, rp, opt, pp)
    stats = opt.pager.stats()
    assert stats["transfer"] == "staged" and stats["backend"] == "pinned"
    assert stats["page_in_bytes"] > 0 and stats["copy_pieces_total"] > stats["page_ins_total"]
    opt.pager.verify_accounting(physical=False)
    for param, key, _n in opt.pager.paged_buffers():
        if opt.pager.location(param, key) == "host":
            assert opt.state[param][key].is_pinned()


def test_staged_visit_issues_no_host_sync():
    _, _, opt, pp = cuda_pair("Lion32bit", staged_config("offload"))
    cuda_train(opt, pp, 2)  # state and staging slots exist; the steady state allocates nothing
    works = [SimpleNamespace(key=p, state=opt.state[p]) for p in pp if p in opt.state]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.pager.visit(works, lambda chunk: [w.state["state1"].mul_(0.5) for w in chunk])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_staged_state_dict_round_trip():
    ref, rp, opt, pp = cuda_pair("AdamW8bit", staged_config("budgeted"))
    cuda_train(ref, rp, 2)
    cuda_train(opt, pp, 2)
    sd = opt.state_dict()
    fresh = pagedopt.AdamW8bit(pp, paging=staged_config("budgeted"), min_8bit_size=16)
    fresh.load_state_dict(sd)
    del opt, sd
    cuda_train(ref, rp, 1, start=2)
    cuda_train(fresh, pp, 1, start=2)
    torch.cuda.synchronize()
    assert_identical(ref, rp, fresh, pp)


def test_controller_recovers_a_real_oom_under_a_memory_fraction():
    from pagedopt.paging import MemoryController

    device = torch.cuda.current_device()
    ref, rp, opt, pp = cuda_pair("AdamW8bit", staged_config("budgeted"))
    ctrl = MemoryController(opt, {"target_free_bytes": 0})
    cuda_train(ref, rp, 1)
    cuda_train(opt, pp, 1)
    torch.cuda.synchronize()
    total = torch.cuda.get_device_properties(device).total_memory
    cap = torch.cuda.memory_allocated(device) + (64 << 20)  # 64 MiB above what is in use
    attempts = []

    def step(i=1):
        gen = torch.Generator().manual_seed(1000 + i)
        for p in pp:
            p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        attempts.append(1)
        if len(attempts) == 1:  # forward of the first attempt asks for more than the cap allows
            torch.empty(cap, dtype=torch.uint8, device="cuda")
        opt.step()

    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    try:
        ctrl.run_step(step)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    cuda_train(ref, rp, 1, start=1)
    torch.cuda.synchronize()
    assert len(attempts) == 2 and ctrl.oom_recoveries_total == 1
    assert ctrl.recoveries[0]["phase"] == "forward/backward"
    assert_identical(ref, rp, opt, pp)
