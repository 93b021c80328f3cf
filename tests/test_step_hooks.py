"""bitsandbytes 0.49's subclassing hooks (pagedopt/optim/hooks.py), the ``numerics`` option and
the step under ``torch.compile``.

Tolerance tier: ``EXACT`` - the compiled and hook paths run the same kernels as eager/planned
steps, so results must be bit-identical; the custom optimizer is checked against float32
torch math written out in the test (``FP32``-exact for one multiply-add per element).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import pagedopt
from pagedopt.functional import dispatch
from pagedopt.optim import Optimizer1State, Optimizer2State


class SignMomentum(Optimizer1State):
    """A custom optimizer written the bitsandbytes way: subclass, override ``update_step``,
    use ``get_config`` and the state that ``init_state`` created."""

    def __init__(self, params, lr=0.1, momentum=0.5):
        super().__init__("momentum", params, lr, (momentum, 0.0), optim_bits=32)
        self.calls: list[tuple[int, int]] = []

    @torch.no_grad()
    def update_step(self, group, p, gindex, pindex):
        config = self.get_config(gindex, pindex, group)
        state = self.state[p]
        state["step"] += 1
        buf = state["state1"]
        buf.mul_(config["betas"][0]).add_(p.grad.sign())
        p.add_(buf, alpha=-config["lr"])
        self.calls.append((gindex, pindex))


def test_custom_update_step_runs_for_each_parameter():
    a = torch.nn.Parameter(torch.ones(5000))
    b = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(2))
    opt = SignMomentum([{"params": [a, frozen]}, {"params": [b], "lr": 0.01}])
    pagedopt.GlobalOptimManager.get_instance().override_config(a, "lr", 0.5)
    for _ in range(2):
        a.grad, b.grad = torch.full((5000,), 2.0), torch.full((3,), -1.0)
        opt.step()
    assert opt.calls == [(0, 0), (1, 0)] * 2  # frozen (grad None) is skipped
    assert opt.initialized
    # step 1: buf = 1 -> p = 1 - lr; step 2: buf = 0.5 + 1 = 1.5 -> p -= 1.5 lr
    assert torch.equal(a.detach(), torch.full((5000,), 1.0 - 0.5 - 0.75))
    assert torch.allclose(b.detach(), torch.full((3,), 1.0 + 0.01 + 0.015))
    assert opt.state[a]["step"] == 2 and len(opt.state[frozen]) == 0
    assert opt.plan_builds == 0  # the planned path was never used


class CountingAdam(Optimizer2State):
    """Overrides ``init_state`` only, adds an entry, and keeps the built-in update."""

    def __init__(self, params, **kw):
        super().__init__("adamw", params, optim_bits=8, min_8bit_size=0, **kw)
        self.prefetched = 0

    def init_state(self, group, p, gindex, pindex):
        super().init_state(group, p, gindex, pindex)
        self.state[p]["extra"] = self.get_state_buffer(p, dtype=torch.float16)

    def prefetch_state(self, p):
        self.prefetched += 1
        super().prefetch_state(p)


def test_init_state_override_gets_the_hook_path_with_builtin_updates():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4097))
    q = torch.nn.Parameter(p.detach().clone())
    custom, builtin = CountingAdam([p]), pagedopt.AdamW8bit([q], min_8bit_size=0, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn(4097)
        p.grad, q.grad = g, g.clone()
        custom.step()
        builtin.step()
    assert torch.equal(p, q)  # EXACT: super().update_step is the built-in update
    assert custom.state[p]["extra"].dtype == torch.float16 and custom.state[p]["extra"].shape == p.shape
    assert custom.prefetched == 3 and custom.plan_builds == 0 and builtin.plan_builds == 1


def test_builtin_optimizers_do_not_take_the_hook_path():
    for cls in (pagedopt.AdamW8bit, pagedopt.Lion, pagedopt.optim.Optimizer2State):
        assert cls._uses_hook_path(object.__new__(cls)) is False
    assert SignMomentum._uses_hook_path(object.__new__(SignMomentum)) is True


def test_hook_methods_have_bitsandbytes_meaning():
    p = torch.nn.Parameter(torch.randn(64))
    opt = pagedopt.AdamW8bit([p], min_8bit_size=0, lr=0.01)
    opt.fill_qmap()
    assert set(opt.name2qmap) == {"dynamic", "udynamic"}
    assert float(opt.name2qmap["dynamic"].min()) < 0 <= float(opt.name2qmap["udynamic"].min())
    cfg = opt.get_config(0, 0, opt.param_groups[0])
    assert cfg["lr"] == 0.01 and cfg["optim_bits"] == 8 and cfg["betas"] == (0.9, 0.999)
    pagedopt.GlobalOptimManager.get_instance().override_config(p, "lr", 0.5)
    opt.check_overrides()
    assert opt.get_config(0, 0, opt.param_groups[0])["lr"] == 0.5
    buf = opt.get_state_buffer(p, dtype=torch.uint8)
    assert buf.dtype == torch.uint8 and buf.shape == p.shape and not buf.any()
    opt.init_state(opt.param_groups[0], p, 0, 0)
    before = opt.state[p]["absmax1"]
    opt.to_gpu()  # state already on the parameter's device stays the same tensor (no copy)
    assert opt.state[p]["absmax1"] is before
    opt.prefetch_state(p)  # unpaged: a no-op


# -- numerics ----------------------------------------------------------------------------------


def test_numerics_reaches_every_update_item(monkeypatch):
    seen = []
    real = dispatch.update

    def spy(kind, items):
        seen.extend(item.numerics for item in items)
        return real(kind, items)

    monkeypatch.setattr(dispatch, "update", spy)
    p = torch.nn.Parameter(torch.randn(4096))
    opt = pagedopt.optim.Optimizer2State("adamw", [p], optim_bits=8, min_8bit_size=0, numerics="strict")
    opt.prepared_launches = False  # the per-item passes (what dispatch.update serves)
    p.grad = torch.randn(4096)
    opt.step()
    assert seen == ["strict"]
    opt.numerics = "fast"
    p.grad = torch.randn(4096)
    opt.step()
    assert seen == ["strict", "fast"]
    assert pagedopt.AdamW8bit([p]).numerics == "fast"  # the default


def test_numerics_rejects_other_values():
    p = torch.nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match="numerics must be 'fast' or 'strict', got 'exact'"):
        pagedopt.optim.Optimizer2State("adamw", [p], numerics="exact")
    opt = pagedopt.AdamW([p])
    with pytest.raises(ValueError, match="numerics must be"):
        opt.numerics = "fastest"


# -- torch.compile -----------------------------------------------------------------------------


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    return model, pagedopt.AdamW8bit(model.parameters(), min_8bit_size=0, percentile_clipping=95)


def _train(compile_mode: str | None, steps: int = 3):
    model, opt = _model_and_opt()
    xs = [torch.randn(4, 32, generator=torch.Generator().manual_seed(i)) for i in range(steps)]

    def train_step(x):
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step_fn = opt.step
    if compile_mode == "train_step":
        train_step = torch.compile(train_step, backend="eager")
    elif compile_mode == "opt_step":
        step_fn = torch.compile(opt.step, backend="eager")

        def train_step(x):  # noqa: F811
            model(x).pow(2).mean().backward()
            step_fn()
            opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x in xs:
            train_step(x)
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("mode", ["train_step", "opt_step"])
def test_compiled_step_matches_eager(mode):
    torch._dynamo.reset()
    eager, eager_opt = _train(None)
    compiled, compiled_opt = _train(mode)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert [s["step"] for s in compiled_opt.state.values()] == [3] * 4


def test_config_numerics_and_cuda_graph_reach_the_optimizer():
    model = torch.nn.Linear(4, 4)
    opt = pagedopt.build_optimizer(model, {"optimizer": "AdamW8bit", "numerics": "strict", "cuda_graph": False})
    assert (opt.numerics, opt.cuda_graph) == ("strict", False)
    opt = pagedopt.build_optimizer(model, {"optimizer": "AdamW8bit"})
    assert (opt.numerics, opt.cuda_graph) == ("fast", True)
    with pytest.raises(pagedopt.ConfigError, match="numerics: Input should be 'fast' or 'strict'"):
        pagedopt.build_optimizer(model, {"optimizer": "AdamW8bit", "numerics": "exact"})


def test_ademamix_double_buffer_has_the_shape_of_its_stacked_moments():
    w = torch.nn.Parameter(torch.randn(64, 80))
    opt = pagedopt.AdEMAMix8bit([w], min_8bit_size=0)
    buf = opt._get_state_double_buffer(w, dtype=torch.uint8)
    assert buf.shape == (2, 64, 80) and buf.dtype == torch.uint8 and not buf.any()
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.state[w]["state1"].shape == buf.shape
