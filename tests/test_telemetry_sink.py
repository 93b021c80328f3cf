"""The telemetry sink protocol in the optimizer core: reports, hooks, quantization-error
probes, and telemetry on vs off (bit-identical training)."""

from __future__ import annotations

import math

import pytest
import torch

import pagedopt
from pagedopt.functional import reference
from pagedopt.functional.items import UpdateItem
from pagedopt.functional.quantization import dequantize
from pagedopt.telemetry.quant_error import QuantErrorSampler
from pagedopt.telemetry.sink import NULL_SINK, BaseSink, FanoutSink, RecordingSink, attach, detach


def _grads(params, step, nan_at=None):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    if nan_at is not None:
        params[nan_at].grad.view(-1)[0] = float("nan")


def test_report_carries_device_scalars_and_params():
    w = torch.nn.Parameter(torch.randn(4097))
    b = torch.nn.Parameter(torch.randn(3))
    frozen = torch.nn.Parameter(torch.randn(5000), requires_grad=False)
    opt = pagedopt.AdamW8bit([w, b, frozen], percentile_clipping=90)
    sink = attach(opt, RecordingSink())
    for step in range(3):
        _grads([w, b], step)
        opt.step()
    reports = sink.reports
    assert [r.step for r in reports] == [1, 2, 3]
    last = reports[-1]
    assert [p.param is q for p, q in zip(last.params, (w, b))] == [True, True]  # frozen: no grad, no row
    assert [p.precision for p in last.params] == ["8bit-blockwise", "32bit"]
    for row, p in zip(last.params, (w, b)):
        assert row.grad_norm.shape == () and row.clip_threshold.shape == () and row.clip_scale.shape == ()
        # fp32 tier: the clipping norm is float32 sqrt of a float64 sum of the same gradient.
        assert math.isclose(float(row.grad_norm), float(p.grad.double().norm()), rel_tol=1e-6)
    assert last.duration_seconds > 0
    assert last.quant_errors == []  # no sampler asked for it


def test_hooks_order_and_null_sink_default():
    calls = []

    class Sink(BaseSink):
        def on_step_begin(self, optimizer):
            calls.append("begin")

        def on_step(self, optimizer, report):
            calls.append(("step", report.step))

    w = torch.nn.Parameter(torch.randn(10))
    opt = pagedopt.AdamW([w])
    assert opt.sink is NULL_SINK
    attach(opt, Sink())
    w.grad = torch.ones(10)
    opt.step()
    opt.step()
    assert calls == ["begin", ("step", 1), "begin", ("step", 2)]


def test_minimal_sink_with_only_on_step():
    class OnlyStep:
        def __init__(self):
            self.steps = 0

        def on_step(self, optimizer, report):
            self.steps += 1

    w = torch.nn.Parameter(torch.randn(10))
    opt = pagedopt.Lion8bit([w])
    sink = attach(opt, OnlyStep())
    w.grad = torch.ones(10)
    opt.step()
    assert sink.steps == 1


def test_attach_fans_out_and_detach_restores():
    w = torch.nn.Parameter(torch.randn(5000))
    opt = pagedopt.AdamW8bit([w])
    a, b = RecordingSink(), RecordingSink(QuantErrorSampler(every=1))
    attach(opt, a)
    assert opt.sink is a
    attach(opt, b)
    assert isinstance(opt.sink, FanoutSink) and opt.sink.sinks == [a, b]
    attach(opt, b)  # attaching twice does not duplicate
    assert opt.sink.sinks == [a, b]
    w.grad = torch.randn(5000)
    opt.step()
    assert len(a.reports) == len(b.reports) == 1
    # The fan-out hands the one probe's samples to both sinks' reports.
    assert [s.state for s in a.reports[0].quant_errors] == ["state1", "state2"]
    detach(opt, a)
    assert opt.sink is b
    detach(opt, b)
    assert opt.sink is NULL_SINK
    with pytest.raises(TypeError, match="optimizer: SGD"):
        attach(torch.optim.SGD([w], lr=0.1), a)


def test_attach_points_the_pager_at_the_sink():
    w = torch.nn.Parameter(torch.randn(10))
    opt = pagedopt.PagedAdamW([w], paging={"backend": "host"})
    sink = attach(opt, RecordingSink())
    assert opt.pager.sink is sink
    opt.pager.sink.on_prefetch_latency(0.002)
    assert sink.prefetch_latencies == [0.002]
    detach(opt, sink)
    assert opt.pager.sink is NULL_SINK


# --- quantization error ------------------------------------------------------------------------


def _expected_ratio(kind, item_before, stored_after, signed, block_wise, index):
    """Independent computation over the whole tensor: exact fp32 update of the dequantized old
    state, vs. the stored new state (dequantized)."""
    old = []
    for i, (codes, absmax) in enumerate(item_before["states"]):
        moments = absmax.reshape(-1, absmax.shape[-1]).shape[0] if absmax.dim() == 2 else 1
        per = codes.reshape(moments, -1)
        values = torch.stack([dequantize(c, a, signed=kind.state_signed[i], block_wise=block_wise)
                              for c, a in zip(per, absmax.reshape(moments, -1))])
        old.append(values if moments > 1 else values[0])
    sub = UpdateItem(item_before["param"], item_before["grad"], old[0], old[1] if len(old) > 1 else None,
                     None, None, item_before["scalars"], block_wise=block_wise,
                     gnorm_scale=item_before["gnorm_scale"])
    reference.update(kind, [sub])
    exact = old[index].reshape(-1).double()
    codes, absmax = stored_after
    moments = absmax.reshape(-1, absmax.shape[-1]).shape[0] if absmax.dim() == 2 else 1
    got = torch.stack([dequantize(c, a, signed=signed, block_wise=block_wise)
                       for c, a in zip(codes.reshape(moments, -1), absmax.reshape(moments, -1))]).reshape(-1).double()
    return math.sqrt(float((got - exact).square().sum() / exact.square().sum()))


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (pagedopt.AdamW8bit, {}),
        (pagedopt.Adam8bit, {"block_wise": False}),
        (pagedopt.AdEMAMix8bit, {}),
        (pagedopt.Lion8bit, {}),
        (pagedopt.AdamW8bit, {"percentile_clipping": 50}),
    ],
    ids=["adamw", "adam-tensorwise", "ademamix", "lion", "adamw-clipped"],
)
def test_quant_error_matches_independent_computation(cls, kwargs):
    """The probe's ratio over all blocks equals a from-scratch computation of the definition.

    Tolerance tier: float64 reductions of identical float32 values in a different order
    (rel 1e-9); a probe that measured after the update, or against the wrong absmax, is off
    by orders of magnitude.
    """
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4097))  # 17 blocks, the last one partial
    opt = cls([w], min_8bit_size=0, **kwargs)
    sink = attach(opt, RecordingSink(QuantErrorSampler(every=3, params_per_sample=4, blocks_per_param=10_000)))
    kind = opt.kind
    for step in range(1, 4):
        w.grad = torch.randn(4097)
        if step == 3 and "percentile_clipping" in kwargs:
            w.grad *= 3  # well above the history: clipping acts on the measured step
        if step == 3:
            state = opt.state[w]
            before = {
                "param": w.detach().clone(), "grad": w.grad.clone(),
                "states": [(state[f"state{i}"].clone(), state[f"absmax{i}"].clone()) for i in range(1, kind.num_states + 1)],
            }
        opt.step()
        if step < 3:
            assert sink.reports[-1].quant_errors == []
    report = sink.reports[-1]
    samples = report.quant_errors
    assert [s.state for s in samples] == [f"state{i}" for i in range(1, kind.num_states + 1)]
    # Scalars of step 3 and the clip scale the step used, rebuilt from the optimizer's config.
    from pagedopt.functional.scalars import step_scalars

    before["scalars"] = step_scalars(kind, opt.param_groups[0], 3)
    before["gnorm_scale"] = report.params[0].clip_scale
    if "percentile_clipping" in kwargs:
        assert float(before["gnorm_scale"]) < 0.5
    state = opt.state[w]
    for index, sample in enumerate(samples):
        assert sample.elements == 4097 * (kind.state1_moments if index == 0 else 1)
        got = math.sqrt(float(sample.error_sq / sample.reference_sq))
        expected = _expected_ratio(kind, before, (state[f"state{index + 1}"], state[f"absmax{index + 1}"]),
                                   kind.state_signed[index], opt.param_groups[0]["block_wise"], index)
        assert got == pytest.approx(expected, rel=1e-9)
        # Statistical sanity for the dynamic 8-bit maps on Gaussian-like state.
        assert 1e-4 < got < 0.1


def test_quant_error_sampling_rotates_and_windows_are_block_aligned():
    params = [torch.nn.Parameter(torch.randn(3000 + 300 * i)) for i in range(5)]
    small = torch.nn.Parameter(torch.randn(10))  # 32-bit state: never sampled
    opt = pagedopt.AdamW8bit(params + [small], min_8bit_size=1000)
    sampler = QuantErrorSampler(every=2, params_per_sample=2, blocks_per_param=3)
    probes = []

    class Spy(RecordingSink):
        def quant_error_probe(self, optimizer, step):
            probe = sampler.probe(step)
            if probe is not None:
                probes.append(probe)
                original = probe.before

                def before(kind, entries, items):
                    original(kind, entries, items)
                    for w in probe._pending:
                        assert w.lo % 256 == 0 and w.hi - w.lo <= 3 * 256 and w.hi <= w.item.numel

                probe.before = before
            return probe

    sink = attach(opt, Spy())
    for step in range(8):
        _grads(params + [small], step)
        opt.step()
    sampled = [[s.name for s in r.quant_errors if s.state == "state1"] for r in sink.reports]
    assert sampled[0] == [] and sampled[2] == []  # odd steps are not sampled
    assert [len(s) for s in sampled[1::2]] == [2, 2, 2, 2]
    names_seen = {n for s in sampled for n in s}
    assert names_seen == {f"group0.param{i}" for i in range(5)}  # rotation reaches every 8-bit parameter
    assert "group0.param5" not in names_seen


def test_quant_error_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every=-1"):
        QuantErrorSampler(every=-1)
    with pytest.raises(ValueError, match="blocks_per_param=0"):
        QuantErrorSampler(blocks_per_param=0)


# --- telemetry on vs off -------------------------------------------------------------------------


def _train(cls, kwargs, dtype, with_telemetry, steps=5):
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(4097).to(dtype)),
        torch.nn.Parameter(torch.randn(64, 80).to(dtype)),
        torch.nn.Parameter(torch.randn(1).to(dtype)),
        torch.nn.Parameter(torch.randn(0).to(dtype)),
        torch.nn.Parameter(torch.randn(300).to(dtype), requires_grad=False),
    ]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    opt = cls(named, min_8bit_size=1000, **kwargs)
    exporter = None
    if with_telemetry:
        from pagedopt.telemetry import start_exporter

        exporter = start_exporter(opt, port=0, top_k=2, quant_error_every=1, quant_error_blocks=2)
    for step in range(steps):
        _grads(params, step, nan_at=0 if step == 2 else None)
        if step == 3:
            params[1].grad = None  # grad=None for one step
        opt.step()
    if exporter is not None:
        exporter.finish()
        assert exporter.sink.errors == 0
        exporter.close()
    return params, opt


@pytest.mark.parametrize(
    "cls,kwargs,dtype",
    [
        (pagedopt.AdamW8bit, {"percentile_clipping": 80}, torch.float32),
        (pagedopt.LAMB8bit, {"max_unorm": 1.0}, torch.float32),
        (pagedopt.AdEMAMix8bit, {"percentile_clipping": 90}, torch.bfloat16),
        (pagedopt.Adam8bit, {"block_wise": False}, torch.float16),
        (pagedopt.Lion8bit, {}, torch.float32),
    ],
    ids=["adamw-clip", "lamb-trust", "ademamix-bf16", "adam-tensorwise-fp16", "lion"],
)
def test_telemetry_on_and_off_train_bit_identically(cls, kwargs, dtype):
    """Exporter with every-step quantization sampling and grad norms vs no telemetry: exact
    equality of parameters and every state tensor (no tolerance: telemetry must not write)."""
    on_params, on_opt = _train(cls, kwargs, dtype, True)
    off_params, off_opt = _train(cls, kwargs, dtype, False)
    for a, b in zip(on_params, off_params):
        assert torch.equal(a, b)
    for a, b in zip(on_params, off_params):
        sa, sb = on_opt.state.get(a, {}), off_opt.state.get(b, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key
