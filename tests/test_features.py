"""The 8-bit optimizer arguments and edge cases: percentile clipping, min_8bit_size, skip_zeros,
max_unorm, AdEMAMix schedules, frozen parameters, grad=None, empty tensors, NaN/Inf gradients,
the args object, parameter groups and overrides."""

from __future__ import annotations

import math

import pytest
import torch

import pagedopt
from oracle import Oracle
from pagedopt.functional.scalars import ademamix_schedules
from numerics_helpers import float32_states, fp32_close, quant_drift


def spiky_gradients(shape, steps, seed=0):
    """Gradients whose norm jumps by 10-100x now and then, so percentile clipping engages."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        scale = 0.01 * (50.0 if i % 7 == 6 else 1.0) * (1 + i % 3)
        out.append(torch.randn(shape, generator=g) * scale)
    return out


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("name", ["AdamW", "Lion", "SGD"])
def test_percentile_clipping_matches_oracle(name, bits):
    """32-bit: tier FP32 against the oracle's float64 percentile clipping (history of 100
    squared norms, threshold at the 5th percentile). 8-bit: tier QUANT."""
    hp = {"AdamW": dict(lr=1e-3), "Lion": dict(lr=1e-4), "SGD": dict(lr=1e-2, momentum=0.9)}[name]
    shape = (300, 17)
    p0 = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.1
    p = torch.nn.Parameter(p0.clone())
    cls = pagedopt.optim.get_optimizer_class(f"{name}{bits}bit")
    opt = cls([p], **hp, percentile_clipping=5, min_8bit_size=0)
    oracle = Oracle(name, hp, p0, percentile_clipping=5)
    for grad in spiky_gradients(shape, 40):
        p.grad = grad.clone()
        opt.step()
        oracle.step(grad)
    history = opt.state[p]["gnorm_vec"]
    torch.testing.assert_close(history.double(), oracle.history, rtol=1e-6, atol=0)
    if bits == 32:
        fp32_close(p.detach(), oracle.param)
    else:
        assert quant_drift(p.detach(), oracle.param, p0) < 0.06


def test_percentile_clipping_scales_spikes_down():
    p = torch.nn.Parameter(torch.zeros(1000))
    sink = pagedopt.telemetry.sink.RecordingSink()
    opt = pagedopt.SGD32bit([p], lr=1.0, momentum=0.5, percentile_clipping=50)
    opt.sink = sink
    for i in range(10):
        p.grad = torch.full((1000,), 100.0 if i == 9 else 1.0)
        opt.step()
    last = sink.reports[-1].params[0]
    assert float(last.clip_scale) == pytest.approx(1.0 / 100.0, rel=1e-5)
    assert float(last.grad_norm) == pytest.approx(100.0 * math.sqrt(1000), rel=1e-5)
    assert float(last.clip_threshold) == pytest.approx(math.sqrt(1000), rel=1e-5)


@pytest.mark.parametrize("numel, expected", [(4095, torch.float32), (4096, torch.uint8)])
def test_min_8bit_size_boundary(numel, expected):
    p = torch.nn.Parameter(torch.randn(numel))
    opt = pagedopt.AdamW8bit([p])
    p.grad = torch.randn(numel)
    opt.step()
    assert opt.state[p]["state1"].dtype == expected
    assert opt.state[p]["state2"].dtype == expected
    assert ("absmax1" in opt.state[p]) == (expected == torch.uint8)


@pytest.mark.parametrize("bits", [32, 8])
def test_skip_zeros_leaves_zero_gradient_elements_untouched(bits):
    """Tier EXACT: with skip_zeros, elements whose gradient is exactly 0 keep parameter and
    (32-bit) state; all other elements follow the run without skip_zeros bit for bit."""
    g = torch.Generator().manual_seed(4)
    p0 = torch.randn(5000, generator=g)
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    oa = pagedopt.optim.get_optimizer_class(f"Adam{bits}bit")([a], skip_zeros=True)
    ob = pagedopt.optim.get_optimizer_class(f"Adam{bits}bit")([b], skip_zeros=False)
    zero = torch.zeros(5000, dtype=torch.bool)
    zero[::3] = True
    for step in range(5):
        grad = torch.randn(5000, generator=g)
        if step == 4:
            grad[zero] = 0.0
            before, m_before = a.detach().clone(), opt_state(oa, a, 0).clone()
        a.grad, b.grad = grad.clone(), grad.clone()
        oa.step()
        ob.step()
    assert torch.equal(a.detach()[zero], before[zero])
    if bits == 32:
        assert torch.equal(opt_state(oa, a, 0)[zero], m_before[zero])
        assert torch.equal(a.detach()[~zero], b.detach()[~zero])
    else:
        # 8-bit: the kept elements are re-encoded against the block's new absmax
        assert (opt_state(oa, a, 0)[zero] - m_before[zero]).abs().max() < 0.02 * m_before.abs().max()


def opt_state(opt, p, index):
    return float32_states(opt, p, opt.kind.state_signed)[index]


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_elements_are_skipped(bits, bad):
    """Documented behaviour: a NaN/Inf gradient element leaves that parameter element and its
    state unchanged (bitsandbytes zeroes the state instead, losing its history); every other
    element is updated as if nothing happened (tier EXACT against a clean run)."""
    g = torch.Generator().manual_seed(5)
    p0 = torch.randn(4100, generator=g)
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    cls = pagedopt.optim.get_optimizer_class(f"AdamW{bits}bit")
    oa, ob = cls([a]), cls([b])
    hit = torch.tensor([0, 17, 4099])
    for step in range(4):
        grad = torch.randn(4100, generator=g)
        bad_grad = grad.clone()
        if step == 3:
            bad_grad[hit] = bad
            before, state_before = a.detach().clone(), opt_state(oa, a, 0).clone()
        a.grad, b.grad = bad_grad, grad
        oa.step()
        ob.step()
    assert torch.isfinite(a).all() and torch.isfinite(opt_state(oa, a, 0)).all()
    assert torch.equal(a.detach()[hit], before[hit])
    others = torch.ones(4100, dtype=torch.bool)
    others[hit] = False
    assert torch.equal(a.detach()[others], b.detach()[others])
    if bits == 32:
        assert torch.equal(opt_state(oa, a, 0)[hit], state_before[hit])


def test_non_finite_gradient_norm_uses_finite_elements():
    p = torch.nn.Parameter(torch.zeros(100))
    opt = pagedopt.Adam32bit([p], percentile_clipping=10)
    grad = torch.full((100,), 2.0)
    grad[3] = float("nan")
    p.grad = grad
    opt.step()
    assert float(opt.state[p]["gnorm_vec"][0]) == pytest.approx(99 * 4.0)
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("name, cls_hp", [("LAMB", dict(max_unorm=0.01)), ("LARS", dict(lr=0.1, momentum=0.9, max_unorm=0.001))])
@pytest.mark.parametrize("block_wise", [False, True])
def test_trust_ratio_engages_and_matches_oracle(name, cls_hp, block_wise):
    """A small max_unorm forces the trust ratio below 1; 32-bit tier FP32, 8-bit tier QUANT."""
    g = torch.Generator().manual_seed(6)
    p0 = torch.randn(64, 80, generator=g)
    for bits in (32, 8):
        p = torch.nn.Parameter(p0.clone())
        opt = pagedopt.optim.get_optimizer_class(f"{name}{bits}bit")([p], **cls_hp, block_wise=block_wise)
        oracle = Oracle(name, cls_hp, p0)
        sink = pagedopt.telemetry.sink.RecordingSink()
        opt.sink = sink
        gg = torch.Generator().manual_seed(7)
        for _ in range(15):
            grad = torch.randn(64, 80, generator=gg)
            p.grad = grad.clone()
            opt.step()
            oracle.step(grad)
        assert float(sink.reports[-1].params[0].update_scale) < 1.0
        assert opt.state[p]["unorm_vec"].item() > 0
        if bits == 32:
            fp32_close(p.detach(), oracle.param)
        else:
            assert quant_drift(p.detach(), oracle.param, p0) < 0.06


def test_trust_ratio_is_one_for_zero_parameters():
    """A zero-initialised bias must still train (bitsandbytes' trust ratio is 0 there)."""
    p = torch.nn.Parameter(torch.zeros(10))
    opt = pagedopt.LAMB32bit([p], lr=0.1)
    p.grad = torch.ones(10)
    opt.step()
    assert torch.all(p < 0)


def test_ademamix_schedules_follow_the_paper():
    b1, b3, alpha = 0.9, 0.9999, 5.0
    assert ademamix_schedules(1, alpha, b1, b3, None, None) == (alpha, b3)
    a_t, b3_t = ademamix_schedules(50, alpha, b1, b3, 100, 100)
    assert a_t == pytest.approx(2.5)
    s = 0.5
    expected = math.exp(math.log(b1) * math.log(b3) / ((1 - s) * math.log(b3) + s * math.log(b1)))
    assert b3_t == pytest.approx(expected)
    assert ademamix_schedules(1, alpha, b1, b3, 100, 100)[1] == pytest.approx(
        math.exp(math.log(b1) * math.log(b3) / (0.99 * math.log(b3) + 0.01 * math.log(b1))))
    assert ademamix_schedules(500, alpha, b1, b3, 100, 100) == (alpha, b3)


@pytest.mark.parametrize("bits", [32, 8])
def test_frozen_and_gradless_parameters(bits):
    frozen = torch.nn.Parameter(torch.randn(5000), requires_grad=False)
    later = torch.nn.Parameter(torch.randn(5000))
    active = torch.nn.Parameter(torch.randn(5000))
    opt = pagedopt.optim.get_optimizer_class(f"AdamW{bits}bit")([frozen, later, active])
    f0, l0 = frozen.detach().clone(), later.detach().clone()
    active.grad = torch.randn(5000)
    opt.step()
    assert torch.equal(frozen, f0) and torch.equal(later, l0)
    assert len(opt.state[frozen]) == 0 and len(opt.state[later]) == 0
    later.grad = torch.randn(5000)  # unfrozen: state appears, its step count starts at 1
    opt.step()
    assert opt.state[later]["step"] == 1 and opt.state[active]["step"] == 2
    assert not torch.equal(later, l0)


@pytest.mark.parametrize("name", ["AdamW", "AdEMAMix", "Lion", "LAMB", "LARS", "Adagrad"])
@pytest.mark.parametrize("bits", [32, 8])
def test_zero_size_parameters(name, bits):
    hp = dict(lr=0.1, momentum=0.9) if name == "LARS" else {}
    empty = torch.nn.Parameter(torch.zeros(0, 7))
    one = torch.nn.Parameter(torch.ones(1))
    opt = pagedopt.optim.get_optimizer_class(f"{name}{bits}bit")([empty, one], **hp, min_8bit_size=0)
    for _ in range(3):
        empty.grad, one.grad = torch.zeros(0, 7), torch.ones(1)
        opt.step()
    assert opt.state[empty]["state1"].numel() == 0
    assert torch.isfinite(one).all() and float(one.detach()) != 1.0


def test_args_object_replaces_the_8bit_settings():
    args = pagedopt.optim.optimizer.MockArgs(
        dict(optim_bits=8, min_8bit_size=10, percentile_clipping=50, block_wise=False, max_unorm=0.0, skip_zeros=False)
    )
    p = torch.nn.Parameter(torch.randn(100))
    opt = pagedopt.Adam([p], optim_bits=32, args=args)
    p.grad = torch.randn(100)
    opt.step()
    st = opt.state[p]
    assert st["state1"].dtype == torch.uint8 and st["absmax1"].shape == (1,) and "gnorm_vec" in st


def test_parameter_groups_have_their_own_settings():
    a, b = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    opt = pagedopt.AdamW([{"params": [a], "optim_bits": 32, "lr": 0.0}, {"params": [b]}], optim_bits=8)
    a0 = a.detach().clone()
    a.grad, b.grad = torch.randn(5000), torch.randn(5000)
    opt.step()
    assert opt.state[a]["state1"].dtype == torch.float32 and opt.state[b]["state1"].dtype == torch.uint8
    torch.testing.assert_close(a.detach(), a0 * (1 - 0.0 * 1e-2))  # lr 0: only (zero) decay


def test_learning_rate_changes_apply_next_step():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = pagedopt.SGD8bit([p], lr=1.0, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.ones(4)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    p.grad = torch.ones(4)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), -1.0 - 0.5 * 1.5))


def test_closure_is_called_and_its_loss_returned():
    w = torch.nn.Parameter(torch.ones(3))
    opt = pagedopt.AdamW8bit([w])

    def closure():
        opt.zero_grad()
        loss = (w * 2).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == 6.0
    assert not torch.equal(w, torch.ones(3))


@pytest.mark.parametrize("bits", [32, 8])
def test_non_contiguous_parameters(bits):
    base = torch.randn(80, 70)
    a = torch.nn.Parameter(base.clone().t())  # non-contiguous view as a parameter
    b = torch.nn.Parameter(base.clone().t().contiguous())
    assert not a.is_contiguous()
    cls = pagedopt.optim.get_optimizer_class(f"Adam{bits}bit")
    oa, ob = cls([a]), cls([b])
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        grad = torch.randn(70, 80, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        oa.step()
        ob.step()
    assert torch.equal(a.detach(), b.detach())


def test_override_to_32bit_applies_to_that_parameter_only():
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 100))
    mng = pagedopt.GlobalOptimManager.get_instance()
    mng.register_parameters(model.parameters())
    mng.override_config(model[0].weight, "optim_bits", 32)
    opt = pagedopt.Adam(model.parameters(), optim_bits=8)
    model(torch.randn(2, 100)).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["state1"].dtype == torch.float32
    assert opt.state[model[1].weight]["state1"].dtype == torch.uint8
    other = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 100))
    opt2 = pagedopt.Adam(other.parameters(), optim_bits=8)
    other(torch.randn(2, 100)).sum().backward()
    opt2.step()
    assert opt2.state[other[0].weight]["state1"].dtype == torch.uint8  # no leak by position


def test_stable_embedding_keeps_32bit_state():
    emb = pagedopt.StableEmbedding(1000, 64)
    head = torch.nn.Linear(64, 100)
    opt = pagedopt.AdamW8bit(list(emb.parameters()) + list(head.parameters()))
    head(emb(torch.randint(0, 1000, (4, 8)))).sum().backward()
    opt.step()
    assert opt.state[emb.weight]["state1"].dtype == torch.float32
    assert opt.state[head.weight]["state1"].dtype == torch.uint8
