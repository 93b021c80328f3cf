"""The memory controller on the simulated device: headroom tracking and OOM recovery.

Tolerance tier: **exact**. A recovered step must give bit-identical parameters and state to a
run that never ran out of memory (nothing lost, nothing applied twice).
"""

from __future__ import annotations

import logging

import pytest
import torch

import pagedopt
from pagedopt.paging import MemoryConfig, MemoryController, PagingConfig

from _paging_support import assert_identical, make_pair, make_params, set_grads

SHAPES = [(60, 70), (4097,), (1,), (33, 64), (0,), (25, 70), (50, 50)]


def sim(policy="budgeted", **kw) -> PagingConfig:
    kw.setdefault("min_paged_numel", 100)
    kw.setdefault("prefetch_depth", 1)
    kw.setdefault("device_budget_bytes", 10_000)
    return PagingConfig(policy=policy, backend="simulated", simulated_capacity_bytes=400_000, **kw)


class OOMOnce:
    """Make ``opt._update_chunk`` raise torch.OutOfMemoryError on its ``at``-th call (0-based,
    counted over the whole run), before the chunk's update runs."""

    def __init__(self, opt, at: int) -> None:
        self.at, self.calls, self.fired = at, 0, False
        self.inner = opt._update_chunk
        opt._update_chunk = self

    def __call__(self, works):
        call, self.calls = self.calls, self.calls + 1
        if call == self.at and not self.fired:
            self.fired = True
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        self.inner(works)


def run(opt, params, steps, ctrl=None, start=0):
    for step in range(start, start + steps):
        def fn(step=step):
            set_grads(params, step)
            opt.step()
        if ctrl is None:
            fn()
        else:
            ctrl.run_step(fn)


@pytest.mark.parametrize("policy", ["budgeted", "offload", "on_demand"])
@pytest.mark.parametrize("at", [0, 1, 3, 5, 9])
def test_oom_inside_step_is_recovered_exactly_once(policy, at):
    ref, rp, paged, pp = make_pair("AdamW8bit", sim(policy), shapes=SHAPES, percentile_clipping=90)
    ctrl = MemoryController(paged, MemoryConfig())
    injector = OOMOnce(paged, at)
    run(ref, rp, 4)
    run(paged, pp, 4, ctrl)
    assert injector.fired
    assert ctrl.oom_recoveries_total == 1 and ctrl.recoveries[0]["phase"] == "optimizer.step"
    assert_identical(ref, rp, paged, pp)
    paged.pager.verify_accounting()


def test_oom_in_the_first_step_recreates_state():
    ref, rp, paged, pp = make_pair("AdamW8bit", sim(), shapes=SHAPES)
    ctrl = MemoryController(paged)
    OOMOnce(paged, 2)  # some parameters have fresh state and no update yet
    run(ref, rp, 3)
    run(paged, pp, 3, ctrl)
    assert_identical(ref, rp, paged, pp)


def test_oom_during_page_in_is_recovered():
    ref, rp, paged, pp = make_pair("AdamW8bit", sim("offload", device_budget_bytes=None), shapes=SHAPES)
    ctrl = MemoryController(paged)
    run(ref, rp, 1)
    run(paged, pp, 1, ctrl)
    mover = next(iter(paged.pager._device_movers()))
    real = mover.page_in
    fired = []

    def failing(buf):
        if not fired:
            fired.append(1)
            raise torch.OutOfMemoryError("injected: staging slot allocation failed")
        return real(buf)

    mover.page_in = failing
    run(ref, rp, 2, start=1)
    run(paged, pp, 2, ctrl, start=1)
    assert fired and ctrl.oom_recoveries_total == 1
    assert_identical(ref, rp, paged, pp)
    paged.pager.verify_accounting()


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_oom_in_forward_or_backward_retries_the_batch(phase, caplog):
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ref = pagedopt.AdamW8bit(models[0].parameters(), min_8bit_size=16)
    opt = pagedopt.AdamW8bit(models[1].parameters(), paging=sim(min_paged_numel=64), min_8bit_size=16)
    ctrl = MemoryController(opt)
    data = [torch.randn(16, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    failed = []

    def step(model, o, x, inject):
        o.zero_grad(set_to_none=True)
        out = model(x)
        if inject and phase == "forward" and not failed:
            failed.append(1)
            raise torch.OutOfMemoryError("injected in forward")
        loss = out.square().mean()
        loss.backward()
        if inject and phase == "backward" and not failed:
            failed.append(1)
            loss2 = model(x).square().mean()
            loss2.backward()  # gradients accumulated twice: must not survive the recovery
            raise torch.OutOfMemoryError("injected in backward")
        o.step()

    for x in data:
        step(models[0], ref, x, False)
    with caplog.at_level(logging.WARNING, logger="pagedopt.memory"):
        for i, x in enumerate(data):
            ctrl.run_step(lambda x=x, i=i: step(models[1], opt, x, i == 1))
    assert failed and ctrl.oom_recoveries_total == 1
    assert "out of memory in forward/backward" in caplog.text
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("api", ["run_step", "attempts"])
def test_retry_after_oom_replays_the_failed_attempts_random_draws(api):
    """Dropout draws from torch's generator: the retry of a batch must draw what the failed
    attempt drew, so a recovered run equals one that never ran out of memory."""
    from pagedopt.paging.guard import attempts

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [pagedopt.AdamW8bit(m.parameters(), min_8bit_size=16) for m in models]
    ctrl = MemoryController(opts[1])
    data = [torch.randn(8, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    failed = []

    def step(model, opt, x, inject):
        opt.zero_grad(set_to_none=True)
        out = model(x)  # draws the dropout mask
        if inject and not failed:
            failed.append(1)
            raise torch.OutOfMemoryError("injected after dropout drew its mask")
        out.square().mean().backward()
        opt.step()

    torch.manual_seed(1)
    for x in data:
        step(models[0], opts[0], x, False)
    torch.manual_seed(1)
    for i, x in enumerate(data):
        if api == "run_step":
            ctrl.run_step(lambda x=x, i=i: step(models[1], opts[1], x, i == 1))
        else:
            for g in attempts(ctrl):
                with g:
                    step(models[1], opts[1], x, i == 1)
    assert failed and ctrl.oom_recoveries_total == 1
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_second_oom_propagates_and_retry_off_raises():
    _ref, _rp, paged, pp = make_pair("AdamW8bit", sim(), shapes=SHAPES)
    ctrl = MemoryController(paged, MemoryConfig(retry_oom=False))
    OOMOnce(paged, 1)
    with pytest.raises(torch.OutOfMemoryError):
        run(paged, pp, 1, ctrl)

    _ref, _rp, paged, pp = make_pair("AdamW8bit", sim(), shapes=SHAPES)
    ctrl = MemoryController(paged)

    def always(works):
        raise torch.OutOfMemoryError("injected: always")

    paged._update_chunk = always
    with pytest.raises(torch.OutOfMemoryError):
        run(paged, pp, 1, ctrl)
    assert ctrl.oom_recoveries_total == 1  # recovered once, then gave up


def test_recovery_evicts_everything_and_lowers_the_budget():
    _ref, _rp, paged, pp = make_pair("AdamW8bit", sim(device_budget_bytes=40_000), shapes=SHAPES)
    ctrl = MemoryController(paged, MemoryConfig(oom_budget_factor=0.5))
    run(paged, pp, 2, ctrl)
    resident = paged.pager.device_bytes
    assert resident > 0
    ctrl.recover("test")
    assert paged.pager.device_bytes == 0 and paged.pager.idle_staging_bytes == 0
    assert paged.pager.budget == resident // 2
    paged.pager.verify_accounting()


def test_recovery_with_nothing_resident_lowers_the_budget_in_force_not_to_zero():
    """An OOM from activations while all state sits on the host: the budget drops by the
    factor from the budget in force (dropping to 0 would page everything every step)."""
    _ref, _rp, paged, pp = make_pair("AdamW8bit", sim(device_budget_bytes=40_000), shapes=SHAPES)
    ctrl = MemoryController(paged, MemoryConfig(oom_budget_factor=0.5))
    run(paged, pp, 2, ctrl)
    paged.pager.evict()
    assert paged.pager.device_bytes == 0
    ctrl.recover("forward/backward")
    assert paged.pager.budget == 20_000
    ctrl.recover("forward/backward")
    assert paged.pager.budget == 10_000


def test_headroom_lowers_and_raises_the_budget():
    cfg = sim(device_budget_bytes=60_000)
    ref, rp, paged, pp = make_pair("AdamW8bit", cfg, shapes=SHAPES)
    ctrl = MemoryController(paged, MemoryConfig(target_free_bytes=300_000))
    run(ref, rp, 2)
    run(paged, pp, 2, ctrl)
    device = paged.pager.simulated_device
    first = ctrl.last["simulated"]
    assert device.free_bytes >= 300_000 or paged.pager.device_bytes == 0
    footprint = paged.pager.device_bytes + paged.pager.idle_staging_bytes
    assert footprint > 20_000
    # activations arrive: free memory falls below the target by half the state's footprint
    activations = device.occupy(device.free_bytes - (300_000 - footprint // 2))
    run(ref, rp, 1, start=2)
    run(paged, pp, 1, ctrl, start=2)
    low = ctrl.last["simulated"]["budget_bytes"]
    assert low < first["budget_bytes"]
    assert paged.pager.device_bytes + paged.pager.idle_staging_bytes <= low
    ctrl.update()
    assert device.free_bytes >= 300_000 - 1  # the headroom holds once the state left
    del activations
    run(ref, rp, 1, start=3)
    run(paged, pp, 1, ctrl, start=3)
    assert ctrl.last["simulated"]["budget_bytes"] > low  # memory came back: budget grows
    assert_identical(ref, rp, paged, pp)


def test_min_and_max_budget_clamp():
    _ref, _rp, paged, pp = make_pair("AdamW8bit", sim(), shapes=SHAPES)
    ctrl = MemoryController(paged, MemoryConfig(target_free_bytes=0, max_budget_bytes=12_345))
    run(paged, pp, 1, ctrl)
    assert paged.pager.budget == 12_345
    ctrl2 = MemoryController(paged, MemoryConfig(target_free_bytes=10**9, min_budget_bytes=5_000), auto_update=False)
    ctrl2.update()
    assert paged.pager.budget == 5_000


def test_memory_config_validation():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not both"):
        MemoryConfig(target_free_bytes=1, target_free_fraction=0.1)
    with pytest.raises(ValidationError, match="below min_budget_bytes"):
        MemoryConfig(min_budget_bytes="2GiB", max_budget_bytes="1GiB")
    assert MemoryConfig(target_free_fraction=0.1).target_for(1000) == 100


def test_oom_in_the_retry_too_leaves_no_half_applied_update():
    ref, rp, paged, pp = make_pair("AdamW8bit", sim(), shapes=SHAPES, percentile_clipping=90)
    ctrl = MemoryController(paged)
    inner, calls = paged._update_chunk, []

    def fail_second_and_fourth(works):
        calls.append(len(works))
        if len(calls) in (2, 4):
            raise torch.OutOfMemoryError("injected")
        inner(works)

    paged._update_chunk = fail_second_and_fourth
    run(ref, rp, 1)
    with pytest.raises(torch.OutOfMemoryError):
        run(paged, pp, 1, ctrl)  # fails, recovers, retries, fails again: raised
    assert ctrl.oom_recoveries_total == 1
    paged._update_chunk = inner
    # Every parameter was updated at most once; finishing the step with the rest (a plain
    # step for the parameters not yet updated) matches the reference exactly.
    updated = {id(p) for p in pp if paged.state.get(p, {}).get("step") == 1}
    assert updated and len(updated) < len([p for p in pp if p.numel()])
    for p in pp:
        if id(p) in updated:
            p.grad = None
    set_grads_skip = [i for i, p in enumerate(pp) if id(p) in updated]
    set_grads(pp, 0, skip=set_grads_skip)
    paged.step()
    assert_identical(ref, rp, paged, pp)


def test_oom_after_the_step_is_applied_propagates_without_a_second_update():
    """An OOM in the guarded body after optimizer.step() has run (a scheduler, a logging pass)
    must not retry the body: the update would be applied twice. Memory is still recovered."""
    ref, rp, paged, pp = make_pair("AdamW8bit", sim(), shapes=SHAPES)
    ctrl = MemoryController(paged)
    run(ref, rp, 1)

    def body():
        set_grads(pp, 0)
        paged.step()
        raise torch.OutOfMemoryError("injected after the step")

    with pytest.raises(torch.OutOfMemoryError, match="after the step"):
        ctrl.run_step(body)
    assert ctrl.oom_recoveries_total == 1 and ctrl.recoveries[0]["phase"] == "after optimizer.step"
    assert_identical(ref, rp, paged, pp)  # exactly one update


class LaunchOOMOnce:
    """Make the ``at``-th prepared launch of a step (0-based) raise torch.OutOfMemoryError
    before it runs: the prepared path bypasses ``_update_chunk``, so it needs its own hook."""

    def __init__(self, opt, at: int) -> None:
        self.at, self.calls, self.fired = at, 0, False
        self.inner = opt._run_launch
        opt._run_launch = self

    def __call__(self, lg, grads):
        call, self.calls = self.calls, self.calls + 1
        if call == self.at and not self.fired:
            self.fired = True
            raise torch.OutOfMemoryError("injected: CUDA out of memory in a prepared launch")
        return self.inner(lg, grads)


@pytest.mark.parametrize("at", [0, 1, 2])
def test_oom_between_prepared_launches_applies_each_update_once(at):
    """An unpaged optimizer under a controller runs prepared multi-tensor launches (one per
    param group here). An OOM after the first launch ran must retry only the launches that
    did not: the result equals a run that never ran out of memory."""
    ref_params, params = make_params(SHAPES), make_params(SHAPES)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:4], "lr": 2e-3}, {"params": ps[4:], "lr": 3e-3}]
    ref = pagedopt.AdamW8bit(groups(ref_params), min_8bit_size=16)
    opt = pagedopt.AdamW8bit(groups(params), min_8bit_size=16)
    ctrl = MemoryController(opt, MemoryConfig())
    run(ref, ref_params, 3)
    run(opt, params, 1, ctrl)  # plans the launches
    injector = LaunchOOMOnce(opt, at)
    run(opt, params, 2, ctrl, start=1)
    assert injector.fired and ctrl.oom_recoveries_total == 1
    assert_identical(ref, ref_params, opt, params)
    run(ref, ref_params, 2, start=3)  # the plan still works after the retry
    run(opt, params, 2, ctrl, start=3)
    assert_identical(ref, ref_params, opt, params)


def test_oom_in_backward_after_update_in_backward_ran_propagates_without_a_retry():
    """With update-in-backward, parameters are updated inside loss.backward(). An OOM later in
    the same backward must not retry the body (those updates would run twice): memory is
    recovered and the error propagates, with each parameter updated at most once."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    opt = pagedopt.AdamW8bit(model.parameters(), min_8bit_size=16)
    opt.update_in_backward = True
    ctrl = MemoryController(opt)
    first = model[1].weight

    def body():
        x = torch.randn(4, 8)
        y = model[0](x)
        y.register_hook(lambda g: (_ for _ in ()).throw(torch.OutOfMemoryError("injected late in backward")))
        model[1](y).sum().backward()

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(torch.OutOfMemoryError, match="late in backward"):
        ctrl.run_step(body)
    assert ctrl.oom_recoveries_total == 1 and ctrl.recoveries[0]["phase"] == "after an update in backward"
    assert opt.state[first]["step"] == 1 and not torch.equal(first, before["1.weight"])
    assert all(len(opt.state[p]) == 0 or opt.state[p]["step"] <= 1 for p in model.parameters())
