"""The pager on CPU with the simulated device: every policy is bit-identical to the unpaged
optimizer, budgets hold at every transition, faults lose nothing, memory is freed.

Tolerance tier everywhere here: **exact** (``torch.equal``). Paging only copies bytes
between pools; any difference from the unpaged optimizer is a bug, not rounding.
"""

from __future__ import annotations

import gc
import io
import warnings
import weakref

import pytest
import torch

import pagedopt
from pagedopt.paging import Pager, PagingConfig, PagingFallbackWarning, live_bytes
from pagedopt.paging.stats import REASONS_IN, REASONS_OUT

from _paging_support import (
    InvariantWatch,
    assert_identical,
    make_pair,
    make_params,
    set_grads,
    total_state_bytes,
    train,
)

POLICIES = ["on_demand", "pipelined", "offload", "budgeted"]
# 2-state and 1-state optimizers, 8-bit and 32-bit state, AdEMAMix's (2, *shape) state1.
OPTIMIZERS = ["AdamW8bit", "AdamW32bit", "Lion8bit", "RMSprop32bit", "AdEMAMix8bit", "SGD8bit"]


def sim(policy: str, budget: int | None = 10_000, **kw) -> PagingConfig:
    kw.setdefault("min_paged_numel", 100)
    kw.setdefault("prefetch_depth", 1)
    if policy == "budgeted" and budget is None:
        budget = 10_000
    return PagingConfig(policy=policy, backend="simulated", device_budget_bytes=budget, **kw)


def extra_kwargs(name: str) -> dict:
    return {"lr": 0.01, "momentum": 0.9} if name.startswith("SGD") else {}


# -- every policy equals the unpaged optimizer -------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_policy_is_bit_identical_to_unpaged(name, policy):
    # A budget below the total state forces evictions, page-ins and (for the largest
    # parameters under 32-bit state) overdrafts, so every path moves data.
    ref, rp, paged, pp = make_pair(name, sim(policy), **extra_kwargs(name))
    watch = InvariantWatch(paged.pager, 10_000)
    train(ref, rp, 3, skip=[3] if name.endswith("32bit") else ())
    train(paged, pp, 3, skip=[3] if name.endswith("32bit") else ())
    assert_identical(ref, rp, paged, pp)
    stats = paged.pager.stats()
    assert stats["page_in_bytes"] > 0 and watch.transitions > 0
    paged.pager.verify_accounting()


@pytest.mark.parametrize("policy", POLICIES)
def test_prepare_pass_tensorwise_and_trust_ratio_paged(policy):
    # Tensor-wise 8-bit state and LAMB's trust ratio run the prepare pass through visit()
    # before the update pass: both passes must see the same state.
    for kwargs in ({"block_wise": False}, {"max_unorm": 1.0}):
        ref, rp, paged, pp = make_pair("LAMB8bit", sim(policy), **kwargs)
        train(ref, rp, 2)
        train(paged, pp, 2)
        assert_identical(ref, rp, paged, pp)
        paged.pager.verify_accounting()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_params_paged(dtype):
    ref, rp, paged, pp = make_pair("AdamW8bit", sim("budgeted"), dtype=dtype)
    train(ref, rp, 2)
    train(paged, pp, 2)
    assert_identical(ref, rp, paged, pp)


def test_frozen_and_gradless_params_keep_their_state():
    ref, rp, paged, pp = make_pair("Adam8bit", sim("offload"))
    rp[3].requires_grad_(False)
    pp[3].requires_grad_(False)
    train(ref, rp, 2, skip=[3])
    train(ref, rp, 1, start=2, skip=[0, 3])  # param 0 skips a step: its state must stay put
    train(paged, pp, 2, skip=[3])
    train(paged, pp, 1, start=2, skip=[0, 3])
    assert_identical(ref, rp, paged, pp)
    assert pp[3] not in paged.state


def test_nonfinite_gradients_propagate_identically():
    ref, rp, paged, pp = make_pair("AdamW32bit", sim("pipelined"))
    for opt, params in ((ref, rp), (paged, pp)):
        set_grads(params, 0)
        params[0].grad[0, 0] = float("nan")
        params[1].grad[5] = float("inf")
        opt.step()
    for a, b in zip(rp, pp):
        assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True, rtol=0, atol=0)


# -- budgets and residency --------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["budgeted", "offload"])
def test_device_bytes_never_exceed_budget(policy):
    # Budget fits two of the paged 8-bit parameters, never all of them: every step pages.
    shapes = [(96, 100), (50, 100), (9000,), (4097,), (70, 70), (12,)]
    budget = 20_000
    ref, rp, paged, pp = make_pair("AdamW8bit", sim(policy, budget=budget), shapes=shapes)
    watch = InvariantWatch(paged.pager, budget)
    train(ref, rp, 3)
    train(paged, pp, 3)
    assert_identical(ref, rp, paged, pp)
    stats = paged.pager.stats()
    assert watch.max_device_bytes <= budget, "no parameter here is larger than the budget"
    assert stats["peak_device_bytes"] <= budget
    assert stats["budget_overdrafts_total"] == 0
    assert total_state_bytes(paged) > budget, "the test must not fit in the budget"
    assert stats["page_out_bytes"] > 0


def test_offload_keeps_state_on_host_between_steps():
    ref, rp, paged, pp = make_pair("AdamW8bit", sim("offload", budget=None, prefetch_depth=2))
    watch = InvariantWatch(paged.pager, None)
    train(paged, pp, 2)
    stats = paged.pager.stats()
    assert stats["device_bytes"] == 0
    assert stats["host_bytes"] == total_state_bytes(paged, keys=("state1", "state2")) - stats["unpaged_bytes"]
    assert stats["page_in_bytes"] == stats["page_out_bytes"]
    assert set(stats["page_transfers_total"]["out"]) == {"offload"}
    # prefetch depth 2: at most the running parameter plus two ahead were on the device
    sizes = sorted((n for _p, _k, n in paged.pager.paged_buffers()), reverse=True)
    assert watch.max_device_bytes <= sum(sizes[:6])
    assert {r.residency for r in paged.memory_report().rows} == {"host", "unpaged"}


def test_on_demand_state_stays_resident_when_it_fits():
    ref, rp, paged, pp = make_pair("AdamW8bit", sim("on_demand", budget=None))
    train(paged, pp, 1)
    before = paged.pager.stats()
    train(paged, pp, 2, start=1)
    after = paged.pager.stats()
    # new simulated state starts on the host and is paged in once by the first step
    assert before["host_bytes"] == 0 and after["page_in_bytes"] == before["page_in_bytes"] > 0
    assert after["page_out_bytes"] == 0
    assert after["chunks_total"] - before["chunks_total"] == 2, "one update call per step when everything is resident"


def test_pipelined_prefetches_in_visit_order():
    shapes = [(40, 100), (41, 100), (42, 100), (43, 100), (44, 100)]
    cfg = sim("pipelined", budget=20_000, prefetch_depth=2)
    ref, rp, paged, pp = make_pair("Lion8bit", cfg, shapes=shapes)
    train(paged, pp, 1)
    paged.pager.evict()
    watch = InvariantWatch(paged.pager, 20_000)
    train(paged, pp, 1, start=1)
    order = [next(i for i, q in enumerate(pp) if q is p) for p, _key in watch.page_in_order]
    assert order == sorted(order), f"page-ins out of visit order: {order}"
    transfers = paged.pager.stats()["page_transfers_total"]["in"]
    assert transfers["prefetch"] >= 3 and transfers["demand"] <= 2
    train(ref, rp, 2)
    assert_identical(ref, rp, paged, pp)


def test_pipelined_waits_less_than_on_demand():
    counts = {}
    for policy in ("on_demand", "pipelined"):
        _, _, paged, pp = make_pair("Lion8bit", sim(policy, budget=12_000, prefetch_depth=2), shapes=[(50, 100)] * 6)
        train(paged, pp, 2)
        counts[policy] = paged.pager.stats()["page_transfers_total"]["in"].get("demand", 0)
    assert counts["pipelined"] < counts["on_demand"]


def test_budgeted_evicts_least_recently_used_buffer_and_reports_a_mix():
    shapes = [(60, 100), (60, 100)]  # 8-bit: 6000 bytes per state buffer, 12000 per parameter
    _, _, paged, pp = make_pair("AdamW8bit", sim("budgeted", budget=18_000, prefetch_depth=1), shapes=shapes)
    set_grads(pp, 0, skip=[1])
    paged.step()  # param 0 resident (12000)
    set_grads(pp, 1, skip=[0])
    paged.step()  # param 1 needs 12000: only param 0's older buffer (state1) has to go
    rows = {r.name: r.residency for r in paged.memory_report().rows}
    assert rows["group0.param0"] == "state1=host,state2=device"
    assert rows["group0.param1"] == "device"
    assert paged.pager.stats()["page_transfers_total"]["out"] == {"budget": 1}


def test_next_use_eviction_keeps_part_of_the_state_resident():
    # Steps visit parameters cyclically: with a budget for 4 of 8 parameters, LRU evicts the
    # one needed next and pages every byte in every step; next_use keeps budget - 1 - depth
    # parameters resident (one slot streams, prefetch_depth more are in flight).
    moved = {}
    for eviction in ("lru", "next_use"):
        cfg = sim("budgeted", budget=4 * 4000, prefetch_depth=1, eviction=eviction)  # 4 parameters
        ref, rp, paged, pp = make_pair("Lion32bit", cfg, shapes=[(1000,)] * 8)
        train(paged, pp, 2)
        before = paged.pager.stats()["page_in_bytes"]
        train(paged, pp, 4, start=2)
        moved[eviction] = (paged.pager.stats()["page_in_bytes"] - before) / 4 / 4000  # parameters per step
        train(ref, rp, 6)
        assert_identical(ref, rp, paged, pp)
    assert moved["lru"] == 8
    assert moved["next_use"] <= 6


def test_memory_report_and_stats_agree():
    _, _, paged, pp = make_pair("AdamW8bit", sim("budgeted"))
    train(paged, pp, 2)
    report = paged.memory_report()
    by_residency = report.bytes_by_residency
    stats = paged.pager.stats()
    assert "unpaged" in by_residency
    assert stats["unpaged_bytes"] == 4 * 2 * 1 + 0  # the 1-element parameter keeps 2 fp32 states; 0 elements: none
    # every paged byte appears in exactly one place
    assert stats["device_bytes"] + stats["host_bytes"] == total_state_bytes(paged) - stats["unpaged_bytes"]


def test_stats_names_are_prometheus_friendly():
    _, _, paged, pp = make_pair("AdamW8bit", sim("offload"))
    train(paged, pp, 1)
    stats = paged.pager.stats()
    for key in ("device_bytes", "host_bytes", "peak_device_bytes", "page_in_bytes", "page_out_bytes",
                "prefetch_stall_seconds"):
        assert key in stats
    for key in stats:
        assert key.replace("_", "").isalpha() and key == key.lower()
    for direction, reasons in stats["page_transfers_total"].items():
        assert set(reasons) <= set(REASONS_IN if direction == "in" else REASONS_OUT)
        assert sum(stats["page_transfer_bytes_total"][direction].values()) == stats[f"page_{direction}_bytes"]
    assert stats["prefetch_stall_seconds"] > 0.0  # offload demand-loads the first parameter


# -- fault injection --------------------------------------------------------------------------


def test_budget_smaller_than_one_parameter_streams_through_alone():
    shapes = [(50, 100), (80, 100), (4097,), (3,)]
    budget = 1_000  # smaller than any paged parameter's state
    ref, rp, paged, pp = make_pair("AdamW8bit", sim("budgeted", budget=budget), shapes=shapes)
    watch = InvariantWatch(paged.pager, budget)
    train(ref, rp, 3)
    train(paged, pp, 3)
    assert_identical(ref, rp, paged, pp)
    stats = paged.pager.stats()
    paged_params = 3
    assert stats["budget_overdrafts_total"] == 3 * paged_params
    assert stats["max_overdraft_bytes"] == 2 * 8000  # the largest parameter's two 8-bit states
    assert stats["device_bytes"] == 0, "an overdrawn parameter leaves right after its update"
    assert watch.max_device_bytes == 2 * 8000


def test_allocation_failure_at_creation_keeps_state_unpaged():
    ref, rp, paged, pp = make_pair("AdamW8bit", sim("on_demand", budget=None))
    paged.pager.host_memory.fail_next_allocations(1)  # the very first paged allocation
    with pytest.warns(PagingFallbackWarning, match="keeping it unpaged"):
        train(paged, pp, 1)
    train(paged, pp, 2, start=1)
    train(ref, rp, 3)
    assert_identical(ref, rp, paged, pp)
    stats = paged.pager.stats()
    assert stats["allocation_failures_total"] == 1 and stats["allocation_fallbacks_total"] == 1
    assert paged.memory_report().rows[0].residency == "state1=unpaged,state2=device"
    paged.pager.verify_accounting()


def test_allocation_failure_during_page_in_evicts_and_retries():
    # The device refuses an allocation the books say fits (fragmentation, someone else's
    # memory): the pager evicts least recently used state and retries instead of failing.
    ref, rp, paged, pp = make_pair("AdamW8bit", sim("on_demand", budget=None))
    train(paged, pp, 1)
    paged.pager.evict([pp[0]])
    paged.pager.simulated_device.fail_next_allocations(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PagingFallbackWarning)  # recovered by eviction: no fallback
        train(paged, pp, 2, start=1)
    train(ref, rp, 3)
    assert_identical(ref, rp, paged, pp)
    stats = paged.pager.stats()
    assert stats["allocation_failures_total"] == 1 and stats["allocation_fallbacks_total"] == 0
    assert stats["page_transfers_total"]["out"]["capacity"] == 1
    paged.pager.verify_accounting()


def test_device_that_never_allocates_updates_in_host_memory():
    ref, rp, paged, pp = make_pair("AdamW8bit", sim("pipelined", budget=None))
    paged.pager.simulated_device.fail_next_allocations(10**9)
    with pytest.warns(PagingFallbackWarning):
        train(paged, pp, 3)
    train(ref, rp, 3)
    assert_identical(ref, rp, paged, pp)
    stats = paged.pager.stats()
    assert stats["device_bytes"] == 0 and stats["host_bytes"] > 0
    paged.pager.verify_accounting()


def test_pressure_spike_mid_step_evicts_and_loses_nothing():
    capacity = 150_000
    cfg = sim("pipelined", budget=None, simulated_capacity_bytes=capacity, reserve_free_bytes=30_000)
    ref, rp, paged, pp = make_pair("AdamW8bit", cfg)
    train(paged, pp, 1)
    assert paged.pager.stats()["page_out_bytes"] == 0
    device = paged.pager.simulated_device
    spike = []
    original = paged._update_chunk

    def update_then_spike(works):
        original(works)
        if not spike:  # activations grab most of the free memory after the first chunk
            spike.append(device.occupy(device.free_bytes - 10_000))

    paged.pager.evict([pp[0]])  # make the step page, so it has chunks to spike between
    paged._update_chunk = update_then_spike
    train(paged, pp, 1, start=1)
    stats = paged.pager.stats()
    assert stats["pressure_events_total"] >= 1
    assert stats["page_transfers_total"]["out"].get("pressure", 0) >= 1
    assert device.free_bytes >= 30_000 or stats["device_bytes"] == 0, "watermark restored after the step"
    paged._update_chunk = original
    spike.clear()  # the activations are gone again
    train(paged, pp, 1, start=2)
    train(ref, rp, 3)
    assert_identical(ref, rp, paged, pp)
    paged.pager.verify_accounting()


def test_capacity_smaller_than_one_parameter_updates_on_host():
    cfg = sim("on_demand", budget=None, simulated_capacity_bytes=10_000)
    ref, rp, paged, pp = make_pair("AdamW32bit", cfg)
    with pytest.warns(PagingFallbackWarning):
        train(paged, pp, 2)
    train(ref, rp, 2)
    assert_identical(ref, rp, paged, pp)
    assert paged.pager.simulated_device.peak_bytes <= 10_000


# -- state dict, manual control, replaced state ------------------------------------------------


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("policy", POLICIES)
def test_state_dict_round_trip_keeps_paging(policy):
    ref, rp, paged, pp = make_pair("AdamW8bit", sim(policy))
    train(ref, rp, 2)
    train(paged, pp, 2)
    loaded_params = make_params()
    for a, b in zip(pp, loaded_params):
        b.data.copy_(a.data)
    loaded = pagedopt.AdamW8bit(loaded_params, paging=sim(policy), min_8bit_size=16)
    loaded.load_state_dict(_roundtrip(paged.state_dict()))
    stats = loaded.pager.stats()
    assert stats["device_bytes"] + stats["host_bytes"] == total_state_bytes(loaded) - stats["unpaged_bytes"] > 0
    loaded.pager.verify_accounting()
    train(ref, rp, 2, start=2)
    train(loaded, loaded_params, 2, start=2)
    assert_identical(ref, rp, loaded, loaded_params)
    loaded.pager.verify_accounting()


def test_unpaged_state_dict_loads_into_paged_and_back():
    ref, rp, paged, pp = make_pair("Lion32bit", sim("budgeted"))
    train(ref, rp, 2)
    paged.load_state_dict(_roundtrip(ref.state_dict()))
    for a, b in zip(rp, pp):
        b.data.copy_(a.data)
    train(ref, rp, 1, start=2)
    train(paged, pp, 1, start=2)
    assert_identical(ref, rp, paged, pp)
    ref.load_state_dict(_roundtrip(paged.state_dict()))
    train(ref, rp, 1, start=3)
    train(paged, pp, 1, start=3)
    assert_identical(ref, rp, paged, pp)


def test_manual_evict_and_prefetch():
    ref, rp, paged, pp = make_pair("AdamW8bit", sim("on_demand", budget=None))
    train(paged, pp, 1)
    paged.pager.evict()
    stats = paged.pager.stats()
    assert stats["device_bytes"] == 0 and stats["page_transfers_total"]["out"] == {"manual": stats["page_outs_total"]}
    paged.pager.prefetch([pp[0]])
    assert paged.pager.location(pp[0], "state1") == "device" and paged.pager.location(pp[1], "state1") == "host"
    train(paged, pp, 2, start=1)
    train(ref, rp, 3)
    assert_identical(ref, rp, paged, pp)


def test_state_tensor_replaced_by_the_user_is_adopted():
    ref, rp, paged, pp = make_pair("AdamW32bit", sim("budgeted"))
    train(ref, rp, 1)
    train(paged, pp, 1)
    for a, b in zip(rp, pp):
        if b in paged.state:
            paged.state[b]["state1"] = ref.state[a]["state1"].clone()  # not pager memory
    train(ref, rp, 1, start=1)
    train(paged, pp, 1, start=1)
    assert_identical(ref, rp, paged, pp)
    paged.pager.verify_accounting()


# -- backends and configuration ----------------------------------------------------------------


def test_host_backend_accounts_host_memory_and_never_moves():
    ref, rp, paged, pp = make_pair("AdamW8bit", PagingConfig(backend="host", min_paged_numel=100))
    train(ref, rp, 2)
    train(paged, pp, 2)
    assert_identical(ref, rp, paged, pp)
    stats = paged.pager.stats()
    assert stats["device_bytes"] == 0 and stats["page_in_bytes"] == stats["page_out_bytes"] == 0
    assert stats["host_bytes"] == paged.pager.host_memory.used_bytes > 0
    assert {r.residency for r in paged.memory_report().rows} == {"host", "unpaged"}


def test_auto_on_cpu_is_host_and_default_paged_optimizer_works():
    params = make_params([(400, 300), (10,)])
    opt = pagedopt.PagedAdamW8bit(params)  # is_paged with no config: on_demand on auto
    train(opt, params, 1)
    assert isinstance(opt.pager, Pager) and opt.pager.policy.name == "on_demand"
    assert opt.pager.stats()["host_bytes"] == 2 * 400 * 300


def test_managed_backend_on_cpu_params_is_a_clear_error():
    params = make_params([(400, 300)])
    opt = pagedopt.PagedAdamW8bit(params, paging=PagingConfig(backend="managed"))
    set_grads(params, 0)
    with pytest.raises(ValueError, match="backend='managed'.*CPU"):
        opt.step()


def test_unpaged_optimizer_pager_is_the_plain_store():
    params = make_params([(10,)])
    opt = pagedopt.AdamW8bit(params)
    assert opt.pager is opt.state_store and not isinstance(opt.pager, Pager)


# -- memory is freed ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["simulated", "host"])
def test_deleting_the_optimizer_frees_its_memory(backend):
    gc.collect()
    baseline = live_bytes()
    refs = []
    for i in range(4):
        params = make_params([(60, 50), (5000,), (3,)], seed=i)
        cfg = PagingConfig(policy="budgeted", backend=backend, device_budget_bytes=6_000, min_paged_numel=100) \
            if backend == "simulated" else PagingConfig(backend="host", min_paged_numel=100)
        opt = pagedopt.PagedAdamW8bit(params, paging=cfg, min_8bit_size=16)
        train(opt, params, 2)
        opt.load_state_dict(_roundtrip(opt.state_dict()))
        train(opt, params, 1, start=2)
        assert sum(live_bytes().values()) > sum(baseline.values())
        refs.append(weakref.ref(opt.pager))
        del opt, params
        gc.collect()
        assert live_bytes() == baseline, f"iteration {i}: {live_bytes()} != {baseline}"
    assert all(r() is None for r in refs)


def test_per_parameter_paging_stats_add_up_across_pagers():
    """Two parameter groups with their own paging configs: opt.pager.stats() sums both pagers."""
    a, b = torch.nn.Parameter(torch.randn(200_000)), torch.nn.Parameter(torch.randn(200_000))
    sim = {"backend": "simulated", "simulated_capacity_bytes": "64MiB", "min_paged_numel": 0}
    opt = pagedopt.AdamW8bit([{"params": [a], "paging": {**sim, "policy": "offload"}},
                              {"params": [b], "paging": {**sim, "policy": "on_demand"}}])
    a.grad, b.grad = torch.randn(200_000), torch.randn(200_000)
    opt.step()
    parts = [s.stats() for s in opt.pager.stores if hasattr(s, "stats")]
    total = opt.pager.stats()
    assert len(parts) == 2
    assert total["page_in_bytes"] == sum(p["page_in_bytes"] for p in parts) > 0
    assert total["host_bytes"] == sum(p["host_bytes"] for p in parts)


def test_pager_reports_page_in_latency_to_the_attached_sink():
    class LatencySink(pagedopt.telemetry.BaseSink):
        def __init__(self):
            self.latencies = []

        def on_prefetch_latency(self, latency):
            self.latencies.append(latency)

    p = torch.nn.Parameter(torch.randn(300_000))
    opt = pagedopt.PagedAdamW8bit([p], paging={"policy": "offload", "backend": "simulated",
                                               "simulated_capacity_bytes": "64MiB", "min_paged_numel": 0})
    sink = pagedopt.telemetry.attach(opt, LatencySink())
    for _ in range(3):
        p.grad = torch.randn(300_000)
        opt.step()
    ins = sum(opt.pager.stats()["page_transfers_total"]["in"].values())
    assert ins >= 3 and len(sink.latencies) == ins
    assert all(isinstance(x, float) and x >= 0 for x in sink.latencies)
