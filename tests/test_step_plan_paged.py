"""Paged optimizers and the step plan: state that never moves joins the prepared launches.

A paged optimizer keeps the state of parameters below ``min_paged_numel`` unpaged (on the
parameter's own device, never moved); only parameters with paged state need the pager's
visits. The plan launches the others like an unpaged optimizer's - on a GPT-2-sized list that
is two thirds of the tensors (BENCHMARKS.md, host time of paged optimizers).

Tolerance tier: ``EXACT`` - launches and per-item passes run the same kernels, and paging
moves bytes without changing them, so parameters and states equal the unpaged per-item
reference bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import pagedopt
from _paging_support import assert_identical, make_params, set_grads
from pagedopt.functional.dispatch import backend_for
from pagedopt.paging import Pager, PagingConfig, PagingFallbackWarning
from pagedopt.paging.store import DeviceStateStore

NATIVE = backend_for(torch.device("cpu")).name == "cpu"
needs_native = pytest.mark.skipif(
    not NATIVE, reason="the native CPU kernels are not in use (library not built, or PAGEDOPT_BACKEND=reference)"
)

# numel 4200, 4097, 1, 2112, 0, 1750: with min_paged_numel=2000 the first, second and fourth
# parameters have paged state, the others unpaged state.
SHAPES = [(60, 70), (4097,), (1,), (33, 64), (0,), (25, 70)]
PAGED = [0, 1, 3]
MIN_PAGED = 2000

POLICIES = {
    "pipelined": dict(policy="pipelined"),
    "offload": dict(policy="offload"),
    "budgeted": dict(policy="budgeted", device_budget_bytes=6000),  # about one parameter's state
}


def _plan_split(opt, params):
    """(indexes of per-item parameters, indexes of launched parameters) in the current plan."""
    index = {id(p): i for i, p in enumerate(params)}
    per_item = sorted(index[id(e.key)] for e in opt._plan.per_item)
    launched = sorted(index[id(e.key)] for lg in opt._plan.launch_groups for e in lg.entries)
    return per_item, launched


def _reference(name: str, steps: int, **kwargs):
    params = make_params(SHAPES)
    opt = getattr(pagedopt, name)(params, min_8bit_size=16, **kwargs)
    opt.prepared_launches = False  # every parameter through the per-item passes
    for step in range(steps):
        set_grads(params, step, skip=[2] if step == 1 else ())
        opt.step()
    return opt, params


@needs_native
@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit", "AdamW32bit"])
def test_unpaged_parameters_of_a_paged_optimizer_are_launched(name, policy):
    steps = 5
    ref, ref_params = _reference(name, steps)
    cfg = PagingConfig(backend="simulated", min_paged_numel=MIN_PAGED, **POLICIES[policy])
    params = make_params(SHAPES)
    opt = getattr(pagedopt, name)(params, min_8bit_size=16, paging=cfg)
    for step in range(steps):
        set_grads(params, step, skip=[2] if step == 1 else ())  # a gradient missing for one step
        opt.step()
        if step == 0:
            assert _plan_split(opt, params) == (PAGED, [2, 4, 5])
    assert_identical(ref, ref_params, opt, params)
    assert opt.plan_builds == 3  # first step; the step without parameter 2's gradient; the step after
    assert _plan_split(opt, params) == (PAGED, [2, 4, 5])
    opt.pager.verify_accounting()
    stats = opt.pager.stats()
    assert stats["paged_buffers"] == len(PAGED) * (1 if name == "Lion8bit" else 2)
    if policy != "pipelined":
        assert stats["page_in_bytes"] > 0  # the paged parameters really moved between steps
    for i, p in enumerate(params):
        assert opt.pager.moves(p) == (i in PAGED)


@needs_native
def test_every_parameter_paged_takes_the_visits():
    cfg = PagingConfig(backend="simulated", policy="offload", min_paged_numel=1)
    params = make_params(SHAPES)
    opt = pagedopt.AdamW8bit(params, min_8bit_size=16, paging=cfg)
    set_grads(params, 0)
    opt.step()
    per_item, launched = _plan_split(opt, params)
    assert per_item == [0, 1, 2, 3, 5] and launched == [4]  # the empty parameter has no paged bytes


@needs_native
def test_per_parameter_paging_override_leaves_the_rest_launched():
    mng = pagedopt.GlobalOptimManager.get_instance()
    params = make_params(SHAPES)
    try:
        mng.override_config(params[0], "paging", {"policy": "offload", "backend": "simulated", "min_paged_numel": 1})
        opt = pagedopt.AdamW8bit(params, min_8bit_size=16)
        for step in range(4):
            set_grads(params, step)
            opt.step()
    finally:
        mng.clear()
    ref_params = make_params(SHAPES)
    ref = pagedopt.AdamW8bit(ref_params, min_8bit_size=16)
    ref.prepared_launches = False
    for step in range(4):
        set_grads(ref_params, step)
        ref.step()
    assert_identical(ref, ref_params, opt, params)
    assert _plan_split(opt, params) == ([0], [1, 2, 3, 4, 5])
    assert opt.state_store.moves(params[0]) and not opt.state_store.moves(params[1])


def test_moves_follows_the_pagers_buffers():
    pager = Pager(PagingConfig(backend="simulated", min_paged_numel=100))
    big, small = torch.zeros(1000), torch.zeros(10)
    pager.zeros(big, "state1", (1000,), torch.uint8)
    pager.zeros(small, "state1", (10,), torch.uint8)
    assert pager.moves(big) and not pager.moves(small)
    pager.forget(big)
    assert not pager.moves(big)
    assert not DeviceStateStore().moves(big)


@needs_native
@pytest.mark.parametrize("backend", ["auto", "host"])
def test_host_state_of_cpu_training_never_moves_and_is_launched(backend):
    """CPU parameters under ``backend="host"`` (what ``auto`` picks for them): the state is
    plain host memory that no policy ever moves, so every parameter joins the launches - a
    paged optimizer trains on the CPU at the speed of the unpaged one - while the pager still
    accounts its bytes and reports it as host-resident."""
    steps = 4
    ref, ref_params = _reference("AdamW8bit", steps)
    params = make_params(SHAPES)
    opt = pagedopt.PagedAdamW8bit(params, min_8bit_size=16,
                                  paging=PagingConfig(backend=backend, policy="offload", min_paged_numel=1))
    for step in range(steps):
        set_grads(params, step, skip=[2] if step == 1 else ())
        opt.step()
    assert_identical(ref, ref_params, opt, params)
    assert _plan_split(opt, params) == ([], [0, 1, 2, 3, 4, 5])
    assert not any(opt.pager.moves(p) for p in params)
    opt.pager.verify_accounting()
    stats = opt.pager.stats()
    assert stats["backend"] == "host" and stats["paged_buffers"] == 2 * 5  # (not the empty parameter)
    assert stats["page_in_bytes"] == 0 and stats["host_bytes"] == sum(
        t.numel() * t.element_size() for p in params for k, t in opt.state[p].items() if k in ("state1", "state2"))
    residency = [opt.pager.residency(p, opt.state[p]) for p in params]
    assert residency == ["host"] * 4 + ["unpaged", "host"]  # (the empty parameter has nothing to page)


@needs_native
def test_state_whose_paged_allocation_failed_still_takes_the_visits():
    """Both of parameter 0's paged allocations fail (its state stays unpaged): it still takes
    the pager's visits like the other paged parameters, because which path a parameter takes
    follows the configuration (an allocation's outcome may differ between FSDP ranks; see
    tests/test_distributed_fsdp.py), and the result equals the per-item reference."""
    steps = 3
    ref, ref_params = _reference("AdamW8bit", steps)
    params = make_params(SHAPES)
    opt = pagedopt.AdamW8bit(params, min_8bit_size=16,
                             paging=PagingConfig(backend="simulated", policy="offload", min_paged_numel=MIN_PAGED))
    opt.pager.host_memory.fail_next_allocations(2)
    with pytest.warns(PagingFallbackWarning, match="keeping it unpaged"):
        for step in range(steps):
            set_grads(params, step, skip=[2] if step == 1 else ())
            opt.step()
    assert_identical(ref, ref_params, opt, params)
    assert opt.pager.stats()["allocation_fallbacks_total"] == 2
    assert opt.memory_report().rows[0].residency == "unpaged"
    assert _plan_split(opt, params) == (PAGED, [2, 4, 5])
    opt.pager.verify_accounting()
