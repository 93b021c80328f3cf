"""The Prometheus exporter's bounded cardinality: the number of series per metric does not depend
on the number of parameters (hundreds and thousands), the per-parameter table (top-k membership
fixed before the first step, names from the optimizer, the model or the position, expected state
bytes equal to the actual ones), and per-parameter overrides registered after the exporter."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import pagedopt
from pagedopt.telemetry import start_exporter
from pagedopt.telemetry.layout import OTHER, ParamTable, actual_state_bytes, expected_state_bytes
from pagedopt.telemetry.metrics import METRICS
from pagedopt.telemetry.prometheus import PrometheusSink
from pagedopt.telemetry.sink import attach

from telemetry_helpers import scrape, single, small_model


def many_params(n: int):
    """``n`` parameters of assorted sizes (mostly small 32-bit ones, every 50th 8-bit) in two
    named groups (small sizes keep the reference backend's step fast)."""
    sizes = [4096 + i if i % 50 == 0 else (i * 37) % 200 + 1 for i in range(n)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in sizes]
    half = n // 2
    return params, [{"params": params[:half], "name": "a"},
                    {"params": params[half:], "name": "b", "percentile_clipping": 100}]


def series_by_metric(families) -> dict[str, int]:
    counts = defaultdict(int)
    for name, family in families.items():
        if name.startswith("pagedopt_"):
            counts[name] += sum(1 for s in family.samples if not s.name.endswith("_created"))
    return counts


@pytest.mark.parametrize("n", [300, 3000])
def test_series_count_is_bounded_with_thousands_of_parameters(n):
    params, groups = many_params(n)
    opt = pagedopt.AdamW8bit(groups, percentile_clipping=90)
    sink = attach(opt, PrometheusSink(opt, run="card", top_k=20, quant_error_every=1))
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    sink.finish()
    families = scrape(sink)
    counts = series_by_metric(families)
    param_labels = {s.labels["param"] for f in families.values() for s in f.samples if "param" in s.labels}
    assert len(param_labels) == 21 and OTHER in param_labels
    # Series per metric do not depend on the number of parameters: exact bounds.
    assert counts["pagedopt_param_grad_norm"] == 21
    assert counts["pagedopt_param_clip_threshold"] <= 21
    assert counts["pagedopt_param_state_bytes"] == 21  # one residency
    # group x state key x precision x residency: 2 x (4 + 2) x 2 x 1 at most
    assert counts["pagedopt_state_bytes"] <= 2 * 6 * 2
    assert counts["pagedopt_quant_error_ratio"] <= 2 * 2
    assert sum(counts.values()) <= series_bound(groups=2, top_k=20, residencies=1), counts


def series_bound(groups: int, top_k: int, residencies: int) -> int:
    """Most series the exporter can produce, whatever the number of parameters."""
    single = 16  # info x3, budget, headroom, peak, memory used/total, stall, steps, last step,
    #              active, global grad norm, kernel cache hits, telemetry errors
    histograms = sum(len(m.buckets) + 3 for m in METRICS if m.type == "histogram")  # + Inf, sum, count
    paging = 2 * 2 * 5 + 3  # transfers and bytes by direction x reason; dropped x3
    per_group = groups * (5 + 2 + 6 * 2 * residencies)  # norms/clipping x5, quant x2 states, state bytes
    per_param = (top_k + 1) * (2 + residencies)  # grad norm, threshold, state bytes per residency
    return single + histograms + paging + per_group + per_param


def test_top_k_membership_is_fixed_before_the_first_step():
    """The largest parameters by *expected* state bytes get series from the start, even one
    that gets its first gradient late; a parameter added later joins __other__."""
    big_late = torch.nn.Parameter(torch.randn(20000))
    mids = [torch.nn.Parameter(torch.randn(5000 + i)) for i in range(3)]
    f32 = torch.nn.Parameter(torch.randn(4000))  # below min_8bit_size: 32-bit state, 4x the bytes per element
    # Expected bytes: big_late 2 x 20000 + absmax, f32 8 x 4000, mid_i 2 x (5000 + i) + absmax.
    opt = pagedopt.AdamW8bit([("big_late", big_late), ("f32", f32)] + [(f"mid{i}", p) for i, p in enumerate(mids)])
    table = ParamTable(opt, top_k=3)
    assert table.top_names == ["big_late", "f32", "mid2", OTHER]
    for p in mids + [f32]:
        p.grad = torch.randn(p.shape)
    opt.step()
    late = torch.nn.Parameter(torch.randn(10 ** 5))
    opt.add_param_group({"params": [late], "param_names": ["late"], "name": "late"})
    table.sync_groups()
    assert table.entry(late).top_label == OTHER and table.group_labels == ["0", "late"]
    assert table.top_names == ["big_late", "f32", "mid2", OTHER]


@pytest.mark.parametrize(
    "cls,kwargs",
    [(pagedopt.AdamW8bit, {}), (pagedopt.AdamW8bit, {"percentile_clipping": 5, "block_wise": False}),
     (pagedopt.AdEMAMix8bit, {}), (pagedopt.LAMB8bit, {"max_unorm": 1.0}), (pagedopt.Lion32bit, {}),
     (pagedopt.SGD8bit, {"momentum": 0.9})],
)
def test_expected_state_bytes_equal_actual(cls, kwargs):
    shapes = [(4097,), (1,), (0,), (64, 70), (4096,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = cls(params, lr=0.1, **kwargs)
    expected = [expected_state_bytes(opt, 0, i) for i in range(len(params))]
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert expected == [actual_state_bytes(opt.state[p]) for p in params]


def test_overrides_registered_after_the_exporter_still_apply():
    """bitsandbytes' usage registers per-parameter overrides after creating the optimizer;
    an exporter attached in between must not freeze the settings (bit-identical training)."""
    def train(with_exporter: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
        manager = pagedopt.GlobalOptimManager.get_instance()
        manager.register_parameters(model.parameters())
        opt = pagedopt.Adam8bit(model.parameters())
        exporter = start_exporter(opt, model=model, port=0) if with_exporter else None
        manager.override_config(model[0].weight, "optim_bits", 32)
        for _ in range(2):
            model(torch.randn(4, 64)).square().mean().backward()
            opt.step()
        if exporter is not None:
            exporter.finish()
            families = scrape(exporter)
            exporter.close()
            assert single(families, "pagedopt_state_bytes", state="state1", precision="32bit",
                          residency="host") == 4 * (64 * 128 + 128 + 64)
        manager.clear()
        return model, opt

    on_model, on_opt = train(True)
    off_model, off_opt = train(False)
    assert on_opt.state[on_model[0].weight]["state1"].dtype == torch.float32
    for a, b in zip(on_model.parameters(), off_model.parameters()):
        assert torch.equal(a, b)


def test_names_come_from_optimizer_then_model_then_position():
    model = small_model()
    named = pagedopt.AdamW8bit(model.named_parameters())
    assert ParamTable(named, top_k=1).top_names == ["0.weight", OTHER]
    plain = pagedopt.AdamW8bit(model.parameters())
    assert ParamTable(plain, model=model, top_k=1).top_names == ["0.weight", OTHER]
    assert ParamTable(plain, top_k=1).top_names == ["group0.param0", OTHER]
    with pytest.raises(ValueError, match="top_k=-1"):
        ParamTable(plain, top_k=-1)
