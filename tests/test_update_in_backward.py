"""Update in backward (pagedopt/optim/backward_update.py).

Tolerance tier: ``EXACT`` - the hooks run the same kernels on the same inputs as ``step()``,
so with ``numerics="strict"`` the parameters and states must be bit-identical to the
ordinary step.
"""

from __future__ import annotations

import pytest
import torch

import pagedopt


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 96), torch.nn.GELU(), torch.nn.Linear(96, 7)
    )
    model[2].bias.requires_grad_(False)  # a frozen parameter
    return model


def batches(n: int):
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(5, 48, generator=g), torch.randn(5, 7, generator=g)) for _ in range(n)]


def train(cls_name: str, in_backward: bool, steps: int = 3, micro: int = 1, **kw):
    model = make_model()
    cls = pagedopt.optim.get_optimizer_class(cls_name)
    opt = cls([p for p in model.parameters()], min_8bit_size=0, numerics="strict", **kw) \
        if cls_name.endswith("8bit") else cls(list(model.parameters()), numerics="strict", **kw)
    opt.update_in_backward = in_backward
    data = batches(steps * micro)
    for s in range(steps):
        opt.param_groups[0]["lr"] *= 0.9  # a schedule, set before backward (the update runs there)
        for m in range(micro):
            x, y = data[s * micro + m]
            loss = torch.nn.functional.mse_loss(model(x), y) / micro
            if in_backward and m < micro - 1:
                with opt.accumulating():
                    loss.backward()
            else:
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def assert_identical(a, b):
    (ma, oa), (mb, ob) = a, b
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(pa, pb), name
        sa, sb = oa.state.get(pa, {}), ob.state.get(pb, {})
        assert set(sa) == set(sb), name
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb[key]), (name, key)
            else:
                assert value == sb[key], (name, key)


@pytest.mark.parametrize("cls_name,kw", [
    ("AdamW8bit", {}),
    ("AdamW8bit", {"percentile_clipping": 90}),
    ("Lion8bit", {}),
    ("AdamW32bit", {}),
    ("LAMB8bit", {"max_unorm": 1.0}),
])
def test_bit_identical_to_the_ordinary_step(cls_name, kw):
    in_backward = train(cls_name, True, **kw)
    ordinary = train(cls_name, False, **kw)
    assert_identical(in_backward, ordinary)
    model, opt = in_backward
    trainable = sum(p.requires_grad for p in model.parameters())
    assert opt.backward_updates == 3 * trainable
    assert len(opt.state.get(model[2].bias, {})) == 0  # frozen: never touched


def test_gradient_accumulation_updates_only_on_the_last_micro_batch():
    in_backward = train("AdamW8bit", True, steps=2, micro=3)
    ordinary = train("AdamW8bit", False, steps=2, micro=3)
    assert_identical(in_backward, ordinary)
    assert in_backward[1].state[in_backward[0][0].weight]["step"] == 2


def test_gradients_are_freed_in_backward_and_step_is_a_no_op():
    model = make_model()
    opt = pagedopt.AdamW8bit(model.parameters(), min_8bit_size=0, update_in_backward=True)
    x, y = batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.state[model[0].weight]["step"] == 1


def test_hand_set_gradients_still_go_through_step():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = pagedopt.optim.Lion32bit([p], lr=0.1, betas=(0.0, 0.0), update_in_backward=True)
    p.grad = torch.ones(10)  # not from backward: no hook ran
    opt.step()
    assert torch.equal(p.detach(), torch.full((10,), -0.1))


def test_new_groups_are_hooked_and_turning_off_removes_the_hooks():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = pagedopt.optim.Lion32bit([a], lr=0.1, betas=(0.0, 0.0), update_in_backward=True)
    opt.add_param_group({"params": [b]})
    (a.sum() + b.sum()).backward()
    assert a.grad is None and b.grad is None and opt.backward_updates == 2
    opt.update_in_backward = False
    (a.sum() + b.sum()).backward()
    assert a.grad is not None and b.grad is not None and opt.backward_updates == 2
    opt.step()
    assert torch.allclose(b.detach(), torch.full((4,), 0.8))


def test_custom_update_step_runs_in_backward():
    calls = []

    class Custom(pagedopt.optim.Optimizer1State):
        def __init__(self, params):
            super().__init__("lion", params, lr=0.5, betas=(0.0, 0.0), update_in_backward=True)

        def update_step(self, group, p, gindex, pindex):
            calls.append((gindex, pindex))
            self.state[p]["step"] += 1
            p.sub_(0.5)

    w = torch.nn.Parameter(torch.ones(3))
    opt = Custom([w])
    (w * 2).sum().backward()
    assert calls == [(0, 0)] and torch.equal(w.detach(), torch.full((3,), 0.5)) and w.grad is None
    opt.step()
    assert calls == [(0, 0)]


def test_config_key_turns_it_on():
    model = make_model()
    opt = pagedopt.build_optimizer(model, {"optimizer": "AdamW8bit", "update_in_backward": True})
    assert opt.update_in_backward


@pytest.mark.parametrize("policy", ["on_demand", "offload", "budgeted"])
def test_paged_state_in_backward_matches_the_ordinary_paged_step(policy):
    paging = {"backend": "simulated", "policy": policy}
    if policy == "budgeted":
        paging["device_budget_bytes"] = 40_000
    in_backward = train("PagedAdamW8bit", True, paging=paging)
    ordinary = train("PagedAdamW8bit", False, paging=paging)
    assert_identical(in_backward, ordinary)


def test_backward_prefetches_the_state_backward_reaches_next():
    model = make_model()
    opt = pagedopt.PagedAdamW8bit(model.parameters(), min_8bit_size=0, update_in_backward=True,
                                  paging={"backend": "simulated", "policy": "offload"})
    asked = []
    real = opt.state_store.prefetch
    opt.state_store.prefetch = lambda params=None: (asked.append(list(params)), real(params))
    opt.prefetch_state = lambda p: None  # only the look-ahead asks the pager now
    for x, y in batches(2):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # step 1 creates the state as backward goes, so only step 2 can look ahead to all but the
    # first parameter (the last one backward reaches has nothing after it)
    prefetched = {id(q) for call in asked for q in call}
    assert asked and prefetched == {id(p) for p in trainable[:-1]}
