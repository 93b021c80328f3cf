"""The Prometheus exporter's exposition and values: names, types and labels against the metric
catalogue (and promtool's lint), values against independent computations, the pager, kernel and
budget sources, the asynchronous device-to-host plumbing the values travel through, and the
telemetry modules' docstring examples. Bounded cardinality with thousands of parameters is tested
in test_telemetry_exporter_cardinality.py; ports, multiprocess mode and the training callback in
test_telemetry_exporter_serving.py; the helpers are in telemetry_helpers.py."""

from __future__ import annotations

import doctest
import importlib
import math
import shutil
import subprocess
import sys
import time
import types
import urllib.request

import pytest
import torch

import pagedopt
from pagedopt.paging.store import DeviceStateStore
from pagedopt.paging.config import PagingConfig
from pagedopt.telemetry import start_exporter
from pagedopt.telemetry.host_copy import EventLatencies, HostCopies, StepTimer
from pagedopt.telemetry.layout import OTHER
from pagedopt.telemetry.metrics import COMMON_LABELS, METRICS
from pagedopt.telemetry.prometheus import PrometheusSink
from pagedopt.telemetry.sink import NULL_SINK, RecordingSink, attach

# test_paging_telemetry.py imports scrape, single and values from this module.
from telemetry_helpers import scrape, single, small_model, step, values


class FakePager(DeviceStateStore):
    """An unpaged state store with scripted pager counters in ``stats()`` (the real pager's
    layout), so the exporter's paging metrics can be checked against known numbers."""

    def __init__(self):
        self.sink = NULL_SINK
        self.totals = {("in", "prefetch"): [0, 0], ("out", "budget"): [0, 0], ("in", "demand"): [0, 0]}
        self.stall = 0.0
        self.fail = False

    def work(self, scale=1):
        for i, key in enumerate(self.totals):
            self.totals[key][0] += scale * (i + 1)
            self.totals[key][1] += scale * (i + 1) * 4096
        self.stall += 0.25 * scale

    def stats(self):
        if self.fail:
            raise RuntimeError("pager is busy")
        return {
            "device_bytes": 1000, "host_bytes": 500, "peak_device_bytes": 1500,
            "page_in_bytes": sum(v[1] for (d, _), v in self.totals.items() if d == "in"),
            "page_out_bytes": sum(v[1] for (d, _), v in self.totals.items() if d == "out"),
            "prefetch_stall_seconds": self.stall,
            "device_budget_bytes": 4000,
            "page_transfers_total": nested({k: c for k, (c, _) in self.totals.items()}),
            "page_transfer_bytes_total": nested({k: b for k, (_, b) in self.totals.items()}),
            "oom_avoidance_actions": {"evict_for_activations": 2},
        }


def nested(flat):
    """{(direction, reason): n} -> {direction: {reason: n}} (the pager's stats layout)."""
    out = {}
    for (direction, reason), n in flat.items():
        out.setdefault(direction, {})[reason] = n
    return out

@pytest.fixture
def trained():
    """An exporter after 6 steps of a small model with two groups, clipping, a fake pager."""
    model = small_model()
    groups = [{"params": [model[0].weight, model[2].weight], "name": "weights"},
              {"params": [model[0].bias, model[2].bias], "name": "biases", "percentile_clipping": 100}]
    opt = pagedopt.AdamW8bit(groups, percentile_clipping=80)
    opt.state_store = FakePager()
    exporter = start_exporter(opt, model=model, port=0, run="unit", top_k=3, quant_error_every=2,
                              grad_norm_refresh_seconds=0)  # every step: the values below are exact
    recorder = attach(opt, RecordingSink())
    for i in range(6):
        opt.pager.work()
        opt.pager.sink.on_prefetch_latency(0.001 * (i + 1))
        step(model, opt, scale=10.0 if i == 5 else 1.0)  # a gradient spike clips at the last step
        opt.zero_grad(set_to_none=False)  # gradients kept (zeroed) until the next backward
    exporter.finish()
    yield model, opt, exporter, recorder
    exporter.close()


def test_exposition_matches_catalogue(trained):
    _, _, exporter, _ = trained
    families = scrape(exporter)
    exposed = {name: f for name, f in families.items() if name.startswith("pagedopt_")}
    for spec in METRICS:
        family_name = spec.name.removesuffix("_total") if spec.type == "counter" else spec.name
        assert family_name in exposed, spec.name
        family = exposed[family_name]
        assert family.type == spec.type, spec.name
        assert family.documentation == spec.help
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            extra = {"le"} if sample.name.endswith("_bucket") else set()
            assert set(sample.labels) == set(COMMON_LABELS) | set(spec.labels) | extra, (sample.name, sample.labels)
            assert sample.labels["run"] == "unit" and sample.labels["rank"] == "0"
    catalogue = {m.name.removesuffix("_total") if m.type == "counter" else m.name for m in METRICS}
    assert set(exposed) == catalogue  # nothing exported outside the catalogue
    # Prometheus' own linter accepts the exposition (naming, units, counters end in _total).
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus'): exposition lint not run")
    text = urllib.request.urlopen(exporter.url, timeout=10).read()
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint


def test_values_match_independent_computation(trained):
    """Gradient norms (fp32 tier: float32 norms squared and summed in float64), clip
    thresholds recomputed from each parameter's clip history, clipped-update counts, state
    bytes against ``memory_report()``, step counters."""
    model, opt, exporter, recorder = trained
    families = scrape(exporter)
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    # The last step's gradients were zeroed in place after the step: norms come from the report.
    last = recorder.reports[-1]
    name_of = {p: n for n, p in model.named_parameters()}
    norm = {name_of[r.param]: float(r.grad_norm) if r.grad_norm is not None else None for r in last.params}
    assert norm["0.bias"] is None  # no clipping in the biases group: the exporter measured it
    # Thresholds: sqrt(sorted(gnorm_vec)[percentile]) of each clipped parameter.
    thresholds = {}
    for name, p in (("0.weight", weights[0]), ("2.weight", weights[1])):
        thresholds[name] = float(torch.sort(opt.state[p]["gnorm_vec"]).values[80].sqrt())
    assert single(families, "pagedopt_clip_threshold", group="weights") == pytest.approx(
        math.sqrt(sum(t * t for t in thresholds.values())), rel=1e-6)
    assert values(families, "pagedopt_clip_threshold", group="biases") == {}
    w_norm = math.sqrt(norm["0.weight"] ** 2 + norm["2.weight"] ** 2)
    assert single(families, "pagedopt_group_grad_norm", group="weights") == pytest.approx(w_norm, rel=1e-6)
    assert single(families, "pagedopt_param_grad_norm", param="0.weight") == pytest.approx(norm["0.weight"], rel=1e-6)
    assert single(families, "pagedopt_param_clip_threshold", param="2.weight") == pytest.approx(thresholds["2.weight"], rel=1e-6)
    # The biases' norms were measured by the exporter after the step (before zero_grad):
    # check them through the global norm identity, which only holds if they were right.
    bias_sq = single(families, "pagedopt_group_grad_norm", group="biases") ** 2
    assert single(families, "pagedopt_grad_norm") == pytest.approx(math.sqrt(w_norm ** 2 + bias_sq), rel=1e-6)
    # Clip scale ratio: kept fraction of the group norm at the (spiked, clipped) last step.
    scales = {name_of[r.param]: float(r.clip_scale) for r in last.params if r.clip_scale is not None}
    kept = math.sqrt(sum((scales[n] * norm[n]) ** 2 for n in scales) / sum(norm[n] ** 2 for n in scales))
    assert kept < 1.0
    assert single(families, "pagedopt_clip_scale_ratio", group="weights") == pytest.approx(kept, rel=1e-6)
    # Clipped updates: parameters whose scale was < 1, over all steps.
    clipped = sum(1 for r in recorder.reports for p in r.params if p.clip_scale is not None and float(p.clip_scale) < 1)
    assert clipped >= 1
    assert single(families, "pagedopt_clipped_updates_total", group="weights") == clipped
    assert single(families, "pagedopt_clipped_updates_total", group="biases") == 0
    assert single(families, "pagedopt_clip_evaluations_total", group="weights") == 2 * 6
    assert single(families, "pagedopt_clip_evaluations_total", group="biases") == 0
    # State bytes: the per-group series and the per-parameter series both add up to the memory report.
    report = opt.memory_report()
    total = report.total_bytes - report.shared_bytes
    assert sum(values(families, "pagedopt_state_bytes").values()) == total
    assert sum(values(families, "pagedopt_param_state_bytes").values()) == total
    # memory_report() rows follow the groups' order; the optimizer got no names, the exporter the model's.
    rows = {n: r.state_bytes for n, r in zip(("0.weight", "2.weight", "0.bias", "2.bias"), report.rows)}
    for name in ("0.weight", "2.weight", "0.bias"):  # top_k=3
        assert single(families, "pagedopt_param_state_bytes", param=name) == rows[name]
    assert single(families, "pagedopt_param_state_bytes", param=OTHER) == rows["2.bias"]
    assert single(families, "pagedopt_state_bytes", group="weights", state="state1", precision="8bit-blockwise",
                  residency="host") == model[0].weight.numel()  # 1 byte per element
    assert single(families, "pagedopt_state_bytes", group="weights", state="state1", precision="32bit",
                  residency="host") == 4 * model[2].weight.numel()  # below min_8bit_size
    # Steps, timings, quantization error (sampled at steps 2, 4, 6).
    assert single(families, "pagedopt_steps_total") == 6
    assert single(families, "pagedopt_step_duration_seconds_count") == 6
    assert single(families, "pagedopt_training_active") == 0
    assert time.time() - single(families, "pagedopt_last_step_timestamp_seconds") < 600
    ratio = values(families, "pagedopt_quant_error_ratio")
    assert set(ratio) == {(("group", "weights"), ("state", "state1")), (("group", "weights"), ("state", "state2"))}
    assert all(1e-4 < v < 0.1 for v in ratio.values())
    assert exporter.sink.errors == 0


def test_pager_and_prefetch_metrics_from_fake_pager(trained):
    _, opt, exporter, _ = trained
    families = scrape(exporter)
    pager = opt.pager
    for (direction, reason), (count, nbytes) in pager.totals.items():
        assert single(families, "pagedopt_page_transfers_total", direction=direction, reason=reason) == count
        assert single(families, "pagedopt_page_transfer_bytes_total", direction=direction, reason=reason) == nbytes
    # Zero-initialized series for the documented reasons the pager did not use.
    assert single(families, "pagedopt_page_transfers_total", direction="out", reason="pressure") == 0
    assert single(families, "pagedopt_prefetch_stall_seconds_total") == pytest.approx(pager.stall)
    assert single(families, "pagedopt_oom_avoidance_actions_total", action="evict_for_activations") == 2
    assert single(families, "pagedopt_peak_device_state_bytes") == 1500
    assert single(families, "pagedopt_device_budget_bytes") == 4000
    assert single(families, "pagedopt_device_headroom_bytes") == 3000
    # Prefetch latencies reported through the pager's sink attribute (attach() set it).
    assert single(families, "pagedopt_prefetch_latency_seconds_count") == 6
    assert single(families, "pagedopt_prefetch_latency_seconds_sum") == pytest.approx(0.021)
    assert single(families, "pagedopt_prefetch_latency_seconds_bucket", le="0.0025") == 2
    # Counters keep counting across scrapes (deltas of the pager's totals), and a failing
    # stats() is logged and leaves the last values in place.
    pager.work(scale=2)
    again = scrape(exporter)
    assert single(again, "pagedopt_page_transfers_total", direction="in", reason="prefetch") == pager.totals[("in", "prefetch")][0]
    pager.fail = True
    failed = scrape(exporter)
    assert single(failed, "pagedopt_page_transfers_total", direction="in", reason="prefetch") == pager.totals[("in", "prefetch")][0]


def test_values_follow_changes_in_the_parameters_with_gradients():
    """The per-step layout is cached while the parameters with gradients stay the same and
    rebuilt when they change (a parameter without gradient, clipping switched per group)."""
    a, b = torch.nn.Parameter(torch.zeros(5000)), torch.nn.Parameter(torch.zeros(300))
    opt = pagedopt.AdamW8bit([{"params": [a], "percentile_clipping": 90}, {"params": [b]}])
    sink = attach(opt, PrometheusSink(opt, run="plan"))
    for grads in ({a: 3.0, b: 4.0}, {a: 1.0}, {a: 1.0}, {b: 2.0}, {a: 3.0, b: 4.0}):
        a.grad = torch.full_like(a, grads[a] / math.sqrt(a.numel())) if a in grads else None
        b.grad = torch.full_like(b, grads[b] / math.sqrt(b.numel())) if b in grads else None
        opt.step()
        sink._apply_device_values(wait=True)
        families = scrape(sink)
        expected = math.sqrt(sum(v * v for v in grads.values()))
        assert single(families, "pagedopt_grad_norm") == pytest.approx(expected, rel=1e-5)
    assert single(families, "pagedopt_clip_evaluations_total", group="0") == 4
    assert sink.errors == 0


def test_unclipped_norms_are_measured_when_they_will_be_seen(monkeypatch):
    """Unclipped parameters' norms (one more read of their gradients) are measured at the
    first step and at the first step after each scrape; between scrapes only clipping's own
    values update, and a group mixing clipped and unclipped parameters reports no partial
    norm. Clipping statistics and counters stay exact at every step."""
    from pagedopt.functional import dispatch

    a, c, b = (torch.nn.Parameter(torch.zeros(n)) for n in (5000, 400, 300))
    mng = pagedopt.GlobalOptimManager.get_instance()
    mng.override_config(c, "percentile_clipping", 100)  # group 0 mixes clipped a and unclipped c
    try:
        opt = pagedopt.AdamW8bit([{"params": [a, c], "percentile_clipping": 90}, {"params": [b]}])
        sink = attach(opt, PrometheusSink(opt, run="refresh", grad_norm_refresh_seconds=3600))
        measured = []
        original = dispatch.grad_norm_sq
        monkeypatch.setattr(dispatch, "grad_norm_sq", lambda grads: (
            measured.append(any(g is b.grad for g in grads)), original(grads))[1])

        def step(norms):
            for p, n in zip((a, c, b), norms):
                p.grad = torch.full_like(p, n / math.sqrt(p.numel()))
            opt.step()

        step((3.0, 4.0, 12.0))  # first step: measured
        step((6.0, 8.0, 24.0))  # no scrape since: clipping only
        sink._apply_device_values(wait=True)
        families = scrape(sink)  # (a scrape: the next step measures)
        assert measured.count(True) == 1
        assert single(families, "pagedopt_grad_norm") == pytest.approx(13.0, rel=1e-5)  # step 1's
        assert single(families, "pagedopt_group_grad_norm", group="0") == pytest.approx(5.0, rel=1e-5)
        assert single(families, "pagedopt_group_grad_norm", group="1") == pytest.approx(12.0, rel=1e-5)
        assert single(families, "pagedopt_clip_evaluations_total", group="0") == 2  # a, both steps
        step((0.3, 0.4, 1.2))
        sink._apply_device_values(wait=True)
        families = scrape(sink)
        assert measured.count(True) == 2
        assert single(families, "pagedopt_grad_norm") == pytest.approx(1.3, rel=1e-5)
        assert single(families, "pagedopt_group_grad_norm", group="0") == pytest.approx(0.5, rel=1e-5)
        assert single(families, "pagedopt_group_grad_norm", group="1") == pytest.approx(1.2, rel=1e-5)
        # clipping's values are every step's: the threshold reflects all three norms of a
        assert single(families, "pagedopt_clip_threshold", group="0") > 0
        assert sink.errors == 0
        with pytest.raises(ValueError, match="grad_norm_refresh_seconds"):
            PrometheusSink(opt, grad_norm_refresh_seconds=-1)
    finally:
        mng.clear()


def test_pager_stats_formats():
    from pagedopt.telemetry.sources import normalize_pager_stats

    mapping = normalize_pager_stats({"page_transfers_total": {"in": {"prefetch": 2}, "out": {"budget": 1}},
                                     "page_transfer_bytes_total": {"in": {"prefetch": 10}, "out": {"budget": 5}}})
    assert mapping.transfers == {("in", "prefetch"): (2, 10), ("out", "budget"): (1, 5)}
    totals_only = normalize_pager_stats(types.SimpleNamespace(page_in_bytes=7, page_out_bytes=9, page_ins_total=1,
                                                              prefetch_stall_seconds=0.5))
    assert totals_only.transfers == {("in", "unspecified"): (1, 7), ("out", "unspecified"): (0, 9)}
    assert totals_only.prefetch_stall_seconds == 0.5


def test_kernel_compile_metrics_from_fake_backend(monkeypatch):
    stats = {"compiles": 0, "compile_seconds": 0.0, "cache_hits": 0}
    fake = types.ModuleType("pagedopt.backends.cuda")
    fake.compile_stats = lambda: dict(stats)
    monkeypatch.setitem(sys.modules, "pagedopt.backends.cuda", fake)
    w = torch.nn.Parameter(torch.randn(100))
    opt = pagedopt.AdamW([w])
    sink = attach(opt, PrometheusSink(opt, run="k"))
    stats.update(compiles=4, compile_seconds=10.0, cache_hits=3)
    families = scrape(sink)
    assert single(families, "pagedopt_kernel_compile_seconds_count") == 4
    assert single(families, "pagedopt_kernel_compile_seconds_sum") == pytest.approx(10.0)
    assert single(families, "pagedopt_kernel_compile_seconds_bucket", le="2.5") == 4  # 4 x 2.5 s (mean)
    assert single(families, "pagedopt_kernel_cache_hits_total") == 3
    # Per-compile durations, when the backend keeps them, land in their own buckets.
    stats.update(compiles=6, compile_seconds=[2.5, 2.5, 2.5, 2.5, 0.05, 40.0], cache_hits=5)
    families = scrape(sink)
    assert single(families, "pagedopt_kernel_compile_seconds_count") == 6
    assert single(families, "pagedopt_kernel_compile_seconds_bucket", le="0.05") == 1
    assert single(families, "pagedopt_kernel_compile_seconds_bucket", le="30.0") == 5
    assert single(families, "pagedopt_kernel_cache_hits_total") == 5


def test_budget_from_paging_config_and_device_fallback():
    w = torch.nn.Parameter(torch.randn(8192))
    opt = pagedopt.PagedAdamW8bit([w], paging=PagingConfig(
        policy="budgeted", device_budget_bytes="1MiB", backend="simulated", simulated_capacity_bytes="8MiB",
        min_paged_numel=0))
    sink = attach(opt, PrometheusSink(opt, run="b"))
    w.grad = torch.randn(8192)
    opt.step()
    sink.finish()
    families = scrape(sink)
    assert single(families, "pagedopt_device_budget_bytes") == 2 ** 20
    device_state = sum(values(families, "pagedopt_state_bytes", residency="device").values())
    assert device_state > 0
    # The budget covers paged state (codes); absmax and qmaps stay unpaged in host memory (CPU parameters).
    paged_on_device = opt.pager.stats()["device_bytes"]
    assert 0 < paged_on_device <= device_state
    assert single(families, "pagedopt_device_headroom_bytes") == 2 ** 20 - paged_on_device
    assert single(families, "pagedopt_run_info", paging_policy="budgeted") == 1
    # Unpaged on the CPU: the budget is the machine's memory, the headroom what is available.
    plain = pagedopt.AdamW8bit([torch.nn.Parameter(torch.randn(10))])
    families = scrape(attach(plain, PrometheusSink(plain, run="c")))
    total = single(families, "pagedopt_device_memory_total_bytes")
    assert single(families, "pagedopt_device_budget_bytes") == total > 0
    assert 0 < single(families, "pagedopt_device_headroom_bytes") <= total


# --- asynchronous plumbing -------------------------------------------------------------------------


def test_host_copies_keep_order_and_drop_when_full():
    copies = HostCopies(slots=2)
    t = torch.tensor([1.0, 2.0])
    assert copies.submit("a", t) and copies.submit("b", t * 2)
    assert not copies.submit("c", t * 3)
    t.add_(100)  # later in-place changes do not leak into submitted copies
    assert [(tag, v.tolist()) for tag, v in copies.poll()] == [("a", [1.0, 2.0]), ("b", [2.0, 4.0])]
    assert copies.dropped == 1 and copies.poll() == []
    with pytest.raises(ValueError, match="slots=0"):
        HostCopies(slots=0)


class FakeEvent:
    """Stands in for torch.cuda.Event: completes when the test says so."""

    clock = 0.0

    def __init__(self, enable_timing=False):
        self.done = False
        self.at = None

    def record(self, stream=None):
        self.at = FakeEvent.clock

    def query(self):
        return self.done

    def elapsed_time(self, end):
        return (end.at - self.at) * 1000.0


def test_step_timer_reads_device_time_only_after_the_end_event(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    timer = StepTimer()
    cuda = torch.device("cuda", 0)
    events = []
    for duration in (0.5, 0.25):
        timer.begin(cuda)
        events.append(timer._start)
        FakeEvent.clock += duration
        timer.end(cuda, host_seconds=0.001)  # host time is ignored for CUDA steps
        events.append(timer._pending[-1][1])
    assert timer.poll() == []  # nothing has completed: nothing is read, nothing blocks
    events[1].done = True
    assert timer.poll() == [pytest.approx(0.5)]
    events[3].done = True
    assert timer.poll() == [pytest.approx(0.25)]


def test_event_latencies_complete_out_of_order():
    lat = EventLatencies()
    a0, a1, b0, b1 = (FakeEvent() for _ in range(4))
    a0.at, a1.at, b0.at, b1.at = 0.0, 0.004, 0.001, 0.002
    lat.add((a0, a1))
    lat.add((b0, b1))
    lat.add(0.5)
    b1.done = True
    assert lat.poll() == [pytest.approx(0.001), 0.5]
    a1.done = True
    assert lat.poll() == [pytest.approx(0.004)]


@pytest.mark.cuda
def test_cuda_values_arrive_without_host_sync():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    copies = HostCopies()
    x = torch.arange(4, device="cuda", dtype=torch.float64)
    torch.cuda._sleep(10 ** 7)  # keep the stream busy: the copy cannot have completed yet
    copies.submit("x", x * 2)
    early = copies.poll()
    torch.cuda.synchronize()
    assert early == [] and [v.tolist() for _, v in copies.poll()] == [[0.0, 2.0, 4.0, 6.0]]


@pytest.mark.parametrize("module", ["sink", "quant_error", "host_copy", "layout", "aggregate", "sources", "training",
                                    "metrics", "prometheus"])
def test_docstring_examples(module):
    mod = importlib.import_module(f"pagedopt.telemetry.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
