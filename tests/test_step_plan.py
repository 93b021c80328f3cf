"""The step plan (pagedopt/optim/plan.py, execute.py): built once, rebuilt exactly when
something that shapes it changes, and bit-identical to the per-item path.

Tolerance tier: ``EXACT`` everywhere - the prepared launches run the same native kernels on
the same float32 scalars as the per-item path, so parameters and states must be equal bit
for bit (``torch.equal``).
"""

from __future__ import annotations

import pytest
import torch

import pagedopt
from pagedopt.functional.dispatch import backend_for

NATIVE = backend_for(torch.device("cpu")).name == "cpu"
needs_native = pytest.mark.skipif(
    not NATIVE, reason="the native CPU kernels are not in use (library not built, or PAGEDOPT_BACKEND=reference)"
)

ALGORITHMS = ["AdamW", "Adam", "Lion", "SGD", "RMSprop", "Adagrad", "AdEMAMix", "LAMB", "LARS"]
HP = {"SGD": dict(lr=1e-2, momentum=0.9), "LARS": dict(lr=1e-2, momentum=0.9), "AdEMAMix": dict(t_alpha=5, t_beta3=5)}


def make_params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes_dtypes = [((257, 65), torch.float32), ((4097,), torch.bfloat16), ((1,), torch.float32),
                     ((0,), torch.float32), ((300, 20), torch.float16), ((5000,), torch.float32)]
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(d)) for s, d in shapes_dtypes]


def grads_for(params, step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(p.shape, generator=g) * 0.01).to(p.dtype) for p in params]


def run(name: str, bits: int, prepared: bool, steps: int = 4, set_to_none: bool = True, **extra):
    params = make_params()
    cls = pagedopt.optim.get_optimizer_class(f"{name}{bits}bit")
    kwargs = {**HP.get(name, {}), **extra}
    opt = cls(params, min_8bit_size=0, **kwargs) if bits == 8 else cls(params, **kwargs)
    opt.prepared_launches = prepared
    for t in range(steps):
        gs = grads_for(params, t)
        for p, g in zip(params, gs):
            if set_to_none or p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        opt.param_groups[0]["lr"] = 1e-3 * (0.9 ** t)  # a schedule: must not re-plan
        opt.step()
        if set_to_none:
            opt.zero_grad(set_to_none=True)
    return params, opt


def assert_same(a_params, a_opt, b_params, b_opt):
    for pa, pb in zip(a_params, b_params):
        assert torch.equal(pa, pb), "parameters differ"
        sa, sb = a_opt.state[pa], b_opt.state[pb]
        assert sa["step"] == sb["step"]
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in sa:
                assert torch.equal(sa[key], sb[key]), key


@needs_native
@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("bits", [8, 32])
def test_prepared_launches_are_bit_identical_to_per_item(name, bits):
    planned = run(name, bits, prepared=True)
    per_item = run(name, bits, prepared=False)
    assert_same(*planned, *per_item)
    assert planned[1].plan_builds == 1
    # every parameter went through a prepared launch, trust ratios (LAMB/LARS) and tensor-wise
    # state (LAMB's default) included: those with their prepare pass launched before the update
    plan = planned[1]._plan
    launched = sum(len(lg.entries) for lg in plan.launch_groups)
    assert not plan.per_item and launched == len(planned[0])
    assert any(lg.prepare_launch is not None for lg in plan.launch_groups) == (
        planned[1].defaults["max_unorm"] > 0 or (bits == 8 and not planned[1].defaults["block_wise"]))


@needs_native
def test_gradients_kept_between_steps_and_weight_decay_groups():
    planned = run("AdamW", 8, prepared=True, set_to_none=False, weight_decay=0.1)
    per_item = run("AdamW", 8, prepared=False, set_to_none=False, weight_decay=0.1)
    assert_same(*planned, *per_item)


@needs_native
@pytest.mark.parametrize("name,bits,extra", [
    ("AdamW", 8, dict(block_wise=False)),  # tensor-wise state alone (no trust ratio)
    ("AdEMAMix", 8, dict(block_wise=False)),  # two state1 moments: two new scales per item
    ("Lion", 8, dict(block_wise=False)),  # one state
    ("LAMB", 8, dict(max_unorm=1.0)),  # tensor-wise (LAMB's default) and a trust ratio that engages
    ("LAMB", 8, dict(max_unorm=1.0, block_wise=True)),
    ("LAMB", 32, dict(max_unorm=1.0)),
    ("LARS", 8, dict(max_unorm=0.05, percentile_clipping=50)),  # clipping and trust ratio together
    ("AdamW", 8, dict(max_unorm=0.3, weight_decay=0.1)),
])
def test_prepare_pass_runs_in_the_launches(name, bits, extra):
    """Trust ratios and tensor-wise state launch their prepare pass as a prepared launch and
    the update reads its results from buffers (pagedopt/optim/launch_prepare.py): parameters,
    states, scales and the trust-ratio norm history bit-identical to the per-item passes, over
    steps with gradient spikes; no per-item entries and one plan build."""
    def go(prepared):
        params = make_params()
        cls = pagedopt.optim.get_optimizer_class(f"{name}{bits}bit")
        kwargs = {**HP.get(name, {}), **extra}
        opt = cls(params, min_8bit_size=0, **kwargs) if bits == 8 else cls(params, **kwargs)
        opt.prepared_launches = prepared
        trust = []
        for t in range(6):
            for p, g in zip(params, grads_for(params, t)):
                p.grad = g * (40.0 if t == 3 else 1.0)
            opt.param_groups[0]["lr"] = 1e-2 * (0.9 ** t)
            opt.step()
            if prepared:
                trust.extend(lg.last_trust.clone() for lg in opt._plan.launch_groups if lg.last_trust is not None)
        return params, opt, trust

    planned, per_item = go(True), go(False)
    assert_same(*planned[:2], *per_item[:2])
    for pa, pb in zip(planned[0], per_item[0]):
        for key in ("unorm_vec", "gnorm_vec"):
            if key in planned[1].state[pa]:
                assert torch.equal(planned[1].state[pa][key], per_item[1].state[pb][key]), key
    plan = planned[1]._plan
    assert not plan.per_item and planned[1].plan_builds == 1
    assert any(lg.prepare_launch is not None for lg in plan.launch_groups)
    if extra.get("max_unorm", 0) > 0:
        assert any(bool((s < 1).any()) for s in planned[2]), "the trust ratio never engaged"


@needs_native
def test_prepared_prepare_pass_reports_trust_ratios_to_sinks():
    """Launched trust-ratio groups give telemetry rows their update scales, as the per-item
    passes do."""
    from pagedopt.telemetry.sink import StatsSink

    class Rows(StatsSink):
        def __init__(self):
            self.rows = []

        def on_step(self, optimizer, report):
            self.rows.append({r.name: r.update_scale for r in report.params})

    def go(prepared):
        params = make_params()
        opt = pagedopt.LAMB8bit(params, min_8bit_size=0, max_unorm=0.5)
        opt.prepared_launches = prepared
        sink = Rows()
        pagedopt.telemetry.attach(opt, sink)
        for t in range(3):
            for p, g in zip(params, grads_for(params, t)):
                p.grad = g
            opt.step()
        return opt, sink.rows

    (opt_a, rows_a), (_, rows_b) = go(True), go(False)
    assert opt_a._plan.launch_groups and not opt_a._plan.per_item
    for a, b in zip(rows_a, rows_b):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name] is not None and torch.equal(a[name], b[name]), name


@needs_native
@pytest.mark.parametrize("name", ["AdamW", "LAMB"])  # (LAMB: a prepare pass reads the gradients too)
def test_non_contiguous_gradient_runs_in_the_launch_on_a_copy(name, monkeypatch):
    """A non-contiguous gradient (step 2, from the first step on for the other parameter)
    stays in the prepared launch, which reads a contiguous copy: never the per-item passes
    (under FSDP, one rank falling back alone would run other collectives than the others)."""
    cls = pagedopt.optim.get_optimizer_class(f"{name}8bit")
    ps = [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(300))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a, b = cls(ps, min_8bit_size=0), cls(qs, min_8bit_size=0)
    b.prepared_launches = False
    per_item_updates = []
    original = a._update_chunk
    monkeypatch.setattr(a, "_update_chunk", lambda works: (per_item_updates.append(len(works)), original(works)))
    for t in range(3):
        g0 = torch.randn(64, 64).t() if t == 1 else torch.randn(64, 64)  # step 2: transposed view
        g1 = torch.randn(600)[::2]  # every step: a strided view
        ps[0].grad, ps[1].grad = g0, g1
        qs[0].grad, qs[1].grad = g0.clone(), g1.clone()
        before = [g0.clone(), g1.clone()]
        a.step()
        b.step()
        assert torch.equal(ps[0].grad, before[0]) and torch.equal(ps[1].grad, before[1])  # read, not changed
        assert not ps[1].grad.is_contiguous()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        for key in ("state1", "state2", "absmax1", "absmax2"):
            assert torch.equal(a.state[p][key], b.state[q][key]), key
    assert a.plan_builds == 1 and not a._plan.per_item and sum(per_item_updates) == 0


def test_bad_gradient_raises_with_the_parameter_name():
    model = torch.nn.Linear(8, 8)
    opt = pagedopt.AdamW8bit(list(model.named_parameters()), min_8bit_size=0)
    model.weight.grad, model.bias.grad = torch.randn(8, 8), torch.randn(8)
    opt.step()
    model.weight.grad = torch.randn(8, 8).to_sparse()  # torch itself rejects other dtypes/shapes
    with pytest.raises(RuntimeError, match="weight: sparse gradients are not supported"):
        opt.step()


@needs_native
@pytest.mark.parametrize("new_shape", [(8, 9), (64,), (3, 0)], ids=["bigger", "other-rank", "empty"])
def test_gradient_resized_in_place_is_refused_by_name(new_shape):
    """torch checks a gradient's shape when it is assigned, not when it is resized in place:
    the prepared launch's bulk check must catch it before the kernel reads or writes out of
    bounds, and the per-item check then names the parameter."""
    model = torch.nn.Linear(8, 8)
    opt = pagedopt.AdamW8bit(list(model.named_parameters()), min_8bit_size=0)
    model.weight.grad, model.bias.grad = torch.randn(8, 8), torch.randn(8)
    opt.step()
    before = model.weight.detach().clone()
    model.weight.grad.resize_(new_shape)
    with pytest.raises(RuntimeError, match=r"weight: gradient shape \(.*\) != parameter shape \(8, 8\)"):
        opt.step()
    assert torch.equal(model.weight, before)


# -- re-planning triggers ----------------------------------------------------------------------


def stepped(opt, params):
    for p in params:
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    return opt.plan_builds


def test_hyperparameters_and_step_counts_do_not_replan():
    ps = [torch.nn.Parameter(torch.randn(4096)) for _ in range(3)]
    opt = pagedopt.AdamW8bit(ps)
    assert stepped(opt, ps) == 1
    for t in range(5):
        g = opt.param_groups[0]
        g["lr"] *= 0.5
        g["betas"] = (0.8 + 0.01 * t, 0.99)
        g["weight_decay"] = 0.01 * t
        g["eps"] = 1e-7
        assert stepped(opt, ps) == 1
    assert opt.state[ps[0]]["step"] == 6


def test_replans_on_each_trigger():
    ps = [torch.nn.Parameter(torch.randn(4096)) for _ in range(3)]
    opt = pagedopt.AdamW8bit(ps[:2])
    builds = stepped(opt, ps[:2])
    assert builds == 1
    # add_param_group
    opt.add_param_group({"params": [ps[2]]})
    assert stepped(opt, ps) == 2
    # load_state_dict
    opt.load_state_dict(opt.state_dict())
    assert stepped(opt, ps) == 3
    # a GlobalOptimManager override
    pagedopt.GlobalOptimManager.get_instance().override_config(ps[0], "lr", 1e-5)
    assert stepped(opt, ps) == 4
    assert stepped(opt, ps) == 4
    # a parameter frozen (no gradient) and then unfrozen
    ps[1].requires_grad_(False)
    ps[1].grad = None
    assert stepped(opt, ps) == 5
    ps[1].requires_grad_(True)
    assert stepped(opt, ps) == 6
    # p.data replaced (new storage)
    ps[0].data = torch.randn(4096)
    assert stepped(opt, ps) == 7
    # a plan-shaping setting of a group
    opt.param_groups[0]["skip_zeros"] = True
    assert stepped(opt, ps) == 8
    # state replaced from outside (e.g. ZeroRedundancyOptimizer writing into opt.state)
    opt.state[ps[2]] = {}
    assert stepped(opt, ps) == 9
    assert opt.state[ps[2]]["step"] == 1  # fresh state was created for it
    # numerics
    opt.numerics = "strict"
    assert stepped(opt, ps) == 10
    assert stepped(opt, ps) == 10


def test_state_is_created_when_a_parameter_first_gets_a_gradient():
    a, b = torch.nn.Parameter(torch.randn(4096)), torch.nn.Parameter(torch.randn(4096))
    opt = pagedopt.AdamW8bit([a, b])
    a.grad = torch.randn(4096)
    opt.step()
    assert len(opt.state[b]) == 0 and opt.plan_builds == 1
    b.grad = torch.randn(4096)
    before = a.detach().clone()
    opt.step()
    assert opt.plan_builds == 2
    assert opt.state[b]["step"] == 1 and opt.state[a]["step"] == 2
    assert not torch.equal(before, a)


@needs_native
def test_different_step_counts_share_no_launch_but_match_per_item():
    # b joins at step 3: its step count differs, so it gets its own launch group
    def go(prepared):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(4096)), torch.nn.Parameter(torch.randn(4096))
        opt = pagedopt.AdamW8bit([a, b])
        opt.prepared_launches = prepared
        for t in range(5):
            a.grad = torch.randn(4096)
            b.grad = torch.randn(4096) if t >= 2 else None
            opt.step()
        return [a, b], opt
    planned, per_item = go(True), go(False)
    assert_same(*planned, *per_item)
    assert len(planned[1]._plan.launch_groups) == 2


def test_per_parameter_override_values_apply_without_replanning():
    ps = [torch.nn.Parameter(torch.zeros(4096)) for _ in range(2)]
    pagedopt.GlobalOptimManager.get_instance().override_config(ps[0], "lr", 0.5)
    opt = pagedopt.optim.Lion32bit(ps, lr=0.1, betas=(0.0, 0.0))
    for p in ps:
        p.grad = torch.ones(4096)
    opt.step()
    assert float(ps[0].detach()[0]) == pytest.approx(-0.5) and float(ps[1].detach()[0]) == pytest.approx(-0.1)  # Lion: -lr * sign


@needs_native
def test_a_telemetry_sink_keeps_the_launches_also_on_sampling_steps(monkeypatch):
    """With a sink attached the launches still run; the report has a row per updated
    parameter, the same rows (in the same order) as the per-item path's. The steps where the
    sink samples the quantization error keep the launches too (a sink on one FSDP rank alone
    must not change that rank's collectives) and sample the same blocks with the same result."""
    from pagedopt.telemetry.quant_error import QuantErrorSampler
    from pagedopt.telemetry.sink import RecordingSink, attach

    def go(prepared: bool, percentile_clipping: int):
        params = make_params()
        opt = pagedopt.AdamW8bit(params, min_8bit_size=0, percentile_clipping=100)
        if percentile_clipping < 100:  # one parameter clipped (its own launch group)
            pagedopt.GlobalOptimManager.get_instance().override_config(params[0], "percentile_clipping", 90)
        opt.prepared_launches = prepared
        sink = attach(opt, RecordingSink(QuantErrorSampler(every=3, params_per_sample=2, blocks_per_param=1)))
        per_item_updates = []
        original = opt._update_chunk
        monkeypatch.setattr(opt, "_update_chunk", lambda works: (per_item_updates.append(len(works)), original(works)))
        try:
            for t in range(6):
                for p, g in zip(params, grads_for(params, t)):
                    p.grad = g
                opt.step()
        finally:
            pagedopt.GlobalOptimManager.get_instance().clear()
        return params, opt, sink, per_item_updates

    for clipping in (100, 90):
        planned = go(True, clipping)
        per_item = go(False, clipping)
        assert_same(*planned[:2], *per_item[:2])
        sink, updates = planned[2], planned[3]
        assert updates == []  # every step launched (clipped or not), sampling steps 3 and 6 too
        for a, b in zip(sink.reports, per_item[2].reports):
            rows_a = [(r.name, r.group, r.numel, r.precision, r.param is not None) for r in a.params]
            rows_b = [(r.name, r.group, r.numel, r.precision, r.param is not None) for r in b.params]
            assert rows_a == rows_b and len(rows_a) == 6
            assert [r.clip_threshold is not None for r in a.params] == [r.clip_threshold is not None for r in b.params]
            assert bool(a.quant_errors) == (a.step % 3 == 0) == bool(b.quant_errors)
            samples_a = [(q.name, q.state, q.elements, float(q.error_sq), float(q.reference_sq)) for q in a.quant_errors]
            samples_b = [(q.name, q.state, q.elements, float(q.error_sq), float(q.reference_sq)) for q in b.quant_errors]
            assert samples_a == samples_b


@needs_native
@pytest.mark.parametrize("name", ["AdamW", "Lion", "AdEMAMix"])
def test_percentile_clipping_runs_in_the_launches(name):
    """Clipped parameters join the launches: each clipped group's scales are computed before
    its launch into a buffer the launch points at. Bit-identical to the per-item path over
    steps whose gradient norms spike (so clipping engages), histories included."""
    def go(prepared):
        params = make_params()
        cls = pagedopt.optim.get_optimizer_class(f"{name}8bit")
        opt = cls(params, min_8bit_size=0, percentile_clipping=50, **HP.get(name, {}))
        opt.prepared_launches = prepared
        scales = []
        for t in range(8):
            for p, g in zip(params, grads_for(params, t)):
                p.grad = g * (30.0 if t in (4, 6) else 1.0)  # spikes above the median of the history
            opt.step()
            if prepared:
                scales.append(torch.cat([lg.clip_scales for lg in opt._plan.launch_groups]).clone())
        return params, opt, scales

    planned, per_item = go(True), go(False)
    assert_same(*planned[:2], *per_item[:2])
    for pa, pb in zip(planned[0], per_item[0]):
        assert torch.equal(planned[1].state[pa]["gnorm_vec"], per_item[1].state[pb]["gnorm_vec"])
    plan = planned[1]._plan
    assert not plan.per_item and sum(len(lg.entries) for lg in plan.launch_groups) == len(planned[0])
    assert planned[1].plan_builds == 1
    assert any(bool((s < 1).any()) for s in planned[2]), "clipping never engaged"


@needs_native
def test_parameter_dtype_changed_under_the_plan_runs_per_item_then_replans(monkeypatch):
    """``p.data = p.data.view(torch.bfloat16)`` on an fp16 parameter between steps (with a
    gradient to match) keeps the parameter object, its storage pointer, its shape and its
    state, so the plan still looks valid: the launch's bulk check sees the other dtype, runs
    that group per item for the step and re-plans for the next one - the same results as the
    per-item path throughout."""
    def go(prepared: bool):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(300, 20, generator=gen).half()),
              torch.nn.Parameter(torch.randn(4097, generator=gen).half())]
        opt = pagedopt.AdamW8bit(ps, min_8bit_size=0)
        opt.prepared_launches = prepared
        original, opt.per_item_steps = opt._update_chunk, []
        monkeypatch.setattr(opt, "_update_chunk", lambda works: (opt.per_item_steps.append(opt.steps_taken), original(works)))
        for t in range(5):
            if t == 2:
                for p in ps:
                    p.data = p.data.view(torch.bfloat16)
            for p, g in zip(ps, grads_for(ps, t)):
                p.grad = g
            opt.step()
        return ps, opt

    planned, per_item = go(True), go(False)
    assert_same(*planned, *per_item)
    assert planned[1].per_item_steps == [2]  # (steps_taken counts completed steps: the third step)
    assert planned[0][0].dtype == torch.bfloat16
    opt = planned[1]
    assert opt.plan_builds == 2 and not opt._plan.per_item and opt._plan.launch_groups[0].dtypes[0] == torch.bfloat16


@needs_native
@pytest.mark.parametrize("name,extra", [("AdamW", {}), ("LAMB", {}), ("AdamW", dict(percentile_clipping=90))])
def test_the_plan_keeps_no_gradient_alive(name, extra):
    """``zero_grad(set_to_none=True)`` frees every gradient: the plan (its launches, their
    items, prepare and clipping buffers) holds no reference to the gradients of the step that
    built it or of any later step - a kept set would double gradient memory on the device."""
    import gc
    import weakref

    params = make_params()
    opt = pagedopt.optim.get_optimizer_class(f"{name}8bit")(params, min_8bit_size=0, **extra)
    refs = []
    for t in range(3):
        for p, g in zip(params, grads_for(params, t)):
            p.grad = g
            refs.append(weakref.ref(g))
        del g  # (the loop's own reference)
        opt.step()
        opt.zero_grad(set_to_none=True)
    gc.collect()
    assert opt._plan.launch_groups and not opt._plan.per_item
    assert [r() is None for r in refs] == [True] * len(refs)
