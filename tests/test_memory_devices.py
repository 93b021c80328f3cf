"""Per-device budgets: the memory controller holds a headroom on each device on its own.

A model whose state is spread over two (simulated) devices gets one budget per device: memory
pressure on one lowers only that device's budget, and an OOM recovery lowers each device's
budget from what that device held. Every simulated pager has a device of its own; the
controller names them ``simulated``, ``simulated:1``, ...

Tolerance tier: **exact** (budgets are byte counts; the parameters are compared bit for bit
with an unpaged run).
"""

from __future__ import annotations

import pytest
import torch

import pagedopt
from pagedopt.paging import MemoryConfig, MemoryController, Pager, PagingConfig
from pagedopt.paging.controller import device_shares

from _paging_support import make_params, set_grads

# device 0 gets the first three, device 1 the rest; 0- and 1-element tensors included
SHAPES = [(60, 70), (1,), (40, 50), (33, 64), (0,), (50, 50)]
SPLIT = 3


def device_config(capacity: int) -> dict:
    return {"policy": "budgeted", "backend": "simulated", "simulated_capacity_bytes": capacity,
            "device_budget_bytes": 40_000, "min_paged_numel": 100, "prefetch_depth": 1}


def two_device_optimizer(params):
    return pagedopt.AdamW8bit([{"params": params[:SPLIT], "paging": device_config(300_000)},
                               {"params": params[SPLIT:], "paging": device_config(310_000)}],
                              min_8bit_size=16)


def step(opt, params, i):
    set_grads(params, i)
    opt.step()


def devices_of(opt):
    shares = device_shares([s for s in opt.state_store.stores if isinstance(s, Pager)])
    return {key: shares[key][0].pager for key in shares}


def test_two_simulated_devices_get_two_keys_and_two_budgets():
    params = make_params(SHAPES)
    opt = two_device_optimizer(params)
    ctrl = MemoryController(opt, MemoryConfig(target_free_bytes=200_000))
    step(opt, params, 0)
    pagers = devices_of(opt)
    assert set(pagers) == {"simulated", "simulated:1"}
    assert pagers["simulated"] is not pagers["simulated:1"]
    assert pagers["simulated"].simulated_device is not pagers["simulated:1"].simulated_device
    for key, pager in pagers.items():
        last = ctrl.last[key]
        device = pager.simulated_device
        assert last["total_bytes"] == device.capacity_bytes  # each key samples its own device
        assert last["budget_bytes"] == pager.budget


def test_pressure_on_one_device_lowers_only_its_budget():
    ref_params, params = make_params(SHAPES), make_params(SHAPES)
    ref = pagedopt.AdamW8bit(ref_params, min_8bit_size=16)
    opt = two_device_optimizer(params)
    ctrl = MemoryController(opt, MemoryConfig(target_free_bytes=200_000))
    for i in range(2):
        step(ref, ref_params, i)
        step(opt, params, i)
    pagers = devices_of(opt)
    before = {key: ctrl.last[key]["budget_bytes"] for key in pagers}
    busy = pagers["simulated:1"]
    footprint = busy.device_bytes + busy.idle_staging_bytes
    assert footprint > 0
    # activations arrive on device 1 only: its free memory falls below the target
    activations = busy.simulated_device.occupy(busy.simulated_device.free_bytes - (200_000 - footprint // 2))
    step(ref, ref_params, 2)
    step(opt, params, 2)
    after = {key: ctrl.last[key]["budget_bytes"] for key in pagers}
    assert after["simulated:1"] < before["simulated:1"]
    assert after["simulated"] >= before["simulated"]  # device 0 is untouched by device 1's pressure
    assert busy.device_bytes + busy.idle_staging_bytes <= after["simulated:1"]
    del activations
    for a, b in zip(ref_params, params):
        assert torch.equal(a, b)
    for pager in pagers.values():
        pager.verify_accounting()


def test_recovery_lowers_each_device_budget_from_its_own_state():
    params = make_params(SHAPES)
    opt = two_device_optimizer(params)
    ctrl = MemoryController(opt, MemoryConfig(oom_budget_factor=0.5), auto_update=False)
    step(opt, params, 0)
    pagers = devices_of(opt)
    resident = {key: p.device_bytes for key, p in pagers.items()}
    assert all(resident.values()) and resident["simulated"] != resident["simulated:1"]
    ctrl.recover("test")
    assert ctrl.recoveries[-1]["budgets"] == {key: n // 2 for key, n in resident.items()}
    for key, pager in pagers.items():
        assert pager.device_bytes == 0
        assert pager.budget == resident[key] // 2


def test_set_budget_for_one_device_and_argument_errors():
    pager = Pager(PagingConfig(policy="budgeted", backend="simulated", device_budget_bytes=8000,
                               min_paged_numel=1))
    state = {"state1": pager.zeros(torch.zeros(1000), "state1", (1000,), torch.float32)}
    assert state["state1"].numel() == 1000
    pager.set_budget(100, device="cpu")
    assert pager.device_budgets() == {"cpu": 100} and pager.budget == 8000
    assert pager.stats()["device_budgets_bytes"] == {"cpu": 100}
    with pytest.raises(ValueError, match="device 'cuda:3' holds no paged state"):
        pager.set_budget(100, device="cuda:3")
    with pytest.raises(ValueError, match="budget must be >= 0"):
        pager.set_budget(-1)
    pager.set_budget(None)
    assert pager.device_budgets() == {"cpu": None} and pager.budget is None
