"""Skipped NaN/Inf gradient elements are counted (device-side, read at telemetry time),
warned about, or refused; paged optimizers leave no reference cycles behind."""

from __future__ import annotations

import gc
import os
import warnings
import weakref

import pytest
import torch

import pagedopt
from pagedopt.optim import nonfinite
from pagedopt.optim.nonfinite import NonfiniteGradError, NonfiniteGradWarning


def _grad(n: int, bad: dict[int, float]) -> torch.Tensor:
    g = torch.ones(n)
    for i, v in bad.items():
        g[i] = v
    return g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_elements_are_counted_and_still_skipped(dtype):
    w = torch.nn.Parameter(torch.ones(4097, dtype=dtype))
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    empty = torch.nn.Parameter(torch.ones(0))
    opt = pagedopt.AdamW8bit([w, frozen, empty], lr=0.1)
    w.grad = _grad(4097, {0: float("nan"), 7: float("inf"), 4096: -float("inf")}).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonfiniteGradWarning)
        opt.step()
        assert w[0] == 1 and w[7] == 1 and w[4096] == 1  # skipped elements unchanged (documented behaviour)
        assert w[1] != 1
        w.grad = _grad(4097, {5: float("nan")}).to(dtype)
        opt.step()
    assert opt.nonfinite.total() == 4


def test_warning_is_rate_limited(monkeypatch):
    monkeypatch.setattr(nonfinite, "CHECK_EVERY_STEPS", 1)
    w = torch.nn.Parameter(torch.ones(16))
    opt = pagedopt.SGD8bit([w], lr=0.1, momentum=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            w.grad = _grad(16, {3: float("nan")})
            opt.step()
    mine = [c for c in caught if issubclass(c.category, NonfiniteGradWarning)]
    assert len(mine) == 1 and "1 non-finite gradient elements" in str(mine[0].message)
    assert opt.nonfinite.total() == 5


def test_raise_mode_refuses_the_step_before_any_change(monkeypatch):
    monkeypatch.setenv("PAGEDOPT_NONFINITE", "raise")
    w = torch.nn.Parameter(torch.ones(64))
    opt = pagedopt.AdamW8bit([{"params": [w], "param_names": ["fc.weight"]}])
    w.grad = _grad(64, {2: float("inf")})
    with pytest.raises(NonfiniteGradError, match="1 non-finite gradient elements .* first: fc.weight"):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(64)) and not opt.state[w]
    w.grad = torch.ones(64)
    opt.step()  # a clean gradient goes through
    assert not torch.equal(w.detach(), torch.ones(64))


def test_off_mode_and_bad_environment_value(monkeypatch):
    monkeypatch.setenv("PAGEDOPT_NONFINITE", "off")
    w = torch.nn.Parameter(torch.ones(8))
    opt = pagedopt.Lion8bit([w])
    w.grad = _grad(8, {0: float("nan")})
    opt.step()
    assert opt.nonfinite.total() == 0
    monkeypatch.setenv("PAGEDOPT_NONFINITE", "loud")
    with pytest.raises(ValueError, match="PAGEDOPT_NONFINITE='loud'"):
        pagedopt.Lion8bit([w])


def test_prometheus_counter_reads_the_device_count():
    prometheus_client = pytest.importorskip("prometheus_client")
    from pagedopt.telemetry import start_exporter

    w = torch.nn.Parameter(torch.ones(300))
    opt = pagedopt.AdamW8bit([w])
    with start_exporter(opt, port=0) as exporter, warnings.catch_warnings():
        warnings.simplefilter("ignore", NonfiniteGradWarning)
        for _ in range(3):
            w.grad = _grad(300, {1: float("nan"), 2: float("nan")})
            opt.step()
        import urllib.request

        text = urllib.request.urlopen(exporter.url + "/metrics", timeout=30).read().decode()
    values = [line for line in text.splitlines() if line.startswith("pagedopt_nonfinite_grad_elements_total")]
    assert values and float(values[0].split()[-1]) == 6.0, values
    assert prometheus_client is not None


# ---- the CPU count comes from the update kernels ----------------------------------------------


@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW", "LAMB8bit", "Lion8bit", "PagedAdEMAMix8bit"])
def test_cpu_skip_mode_counts_in_the_kernels_without_a_pass_of_its_own(monkeypatch, name):
    """On the CPU, "skip" mode reads no gradient before the update: the kernels (or the
    reference, for what they do not serve) report what they skipped. Optimizers with a prepare
    pass (LAMB's trust ratio) count each element once; 32-bit and paged optimizers count too."""
    from pagedopt.backends import cpu

    if cpu.library() is None:
        pytest.skip("the native CPU library is not available")

    def no_pass(*args, **kwargs):
        raise AssertionError("the watch made a pass over the gradients in skip mode")

    w = torch.nn.Parameter(torch.ones(5000))
    half = torch.nn.Parameter(torch.ones(300, dtype=torch.bfloat16))  # (kernels for bf16 too)
    tiny = torch.nn.Parameter(torch.ones(1))
    opt = getattr(pagedopt, name)([w, half, tiny], lr=0.01)
    monkeypatch.setattr(torch, "_foreach_norm", no_pass)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonfiniteGradWarning)
        for step in range(3):
            w.grad = _grad(5000, {0: float("nan"), 4999: float("inf")})
            half.grad = _grad(300, {7: -float("inf")}).to(torch.bfloat16)
            tiny.grad = _grad(1, {0: float("nan")} if step == 2 else {})
            opt.step()
    assert opt.nonfinite.total() == 3 * 3 + 1
    assert w[0] == 1 and w[4999] == 1 and half[7] == 1 and w[1] != 1


def test_reference_backend_counts_cpu_gradients(monkeypatch):
    """Without the native library (PAGEDOPT_BACKEND=reference) the reference's CPU updates count."""
    from pagedopt.functional import dispatch

    monkeypatch.setenv("PAGEDOPT_BACKEND", "reference")
    dispatch.reset_backends()
    try:
        w = torch.nn.Parameter(torch.ones(700))
        opt = pagedopt.AdamW8bit([w], min_8bit_size=0)
        w.grad = _grad(700, {1: float("nan"), 2: float("inf")})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonfiniteGradWarning)
            opt.step()
        assert opt.nonfinite.total() == 2
    finally:
        monkeypatch.delenv("PAGEDOPT_BACKEND")
        dispatch.reset_backends()


def test_update_in_backward_counts_and_warns_at_the_backward_call():
    """Updates made in backward count their NaN/Inf gradient elements too, and the warning
    points at the user's line (not inside pagedopt or torch)."""
    w = torch.nn.Parameter(torch.ones(600))
    opt = pagedopt.AdamW8bit([w], min_8bit_size=0, update_in_backward=True)
    x = torch.ones(600)
    x[5] = float("nan")
    x[9] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (w * x).sum().backward()
    mine = [c for c in caught if issubclass(c.category, NonfiniteGradWarning)]
    assert len(mine) == 1 and mine[0].filename == __file__, [(c.filename, c.lineno) for c in mine]
    assert opt.nonfinite.total() == 2 and w.grad is None
    assert w[5] == 1 and w[9] == 1 and w[0] != 1


def test_step_warning_points_at_the_callers_line():
    w = torch.nn.Parameter(torch.ones(64))
    opt = pagedopt.AdamW8bit([w])
    w.grad = _grad(64, {3: float("nan")})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    mine = [c for c in caught if issubclass(c.category, NonfiniteGradWarning)]
    assert len(mine) == 1 and mine[0].filename == __file__, [(c.filename, c.lineno) for c in mine]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux) to read the resident set")
def test_dropped_paged_optimizers_free_their_memory_without_the_cycle_collector():
    """The issue saw RSS grow 406 -> 694 MB over 50 PagedAdamW8bit until gc.collect() (a
    pager reference cycle). With gc disabled every optimizer must be freed by reference
    counting alone: all weakrefs dead, RSS back within a few MB (4 MB of state each)."""

    def make():
        p = torch.nn.Parameter(torch.randn(1024, 1024))
        opt = pagedopt.PagedAdamW8bit([p], paging={"backend": "simulated"}, min_8bit_size=0)
        p.grad = torch.randn(1024, 1024)
        opt.step()
        return opt

    make()  # warm up lazily imported modules and allocator pools
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        before = _rss_bytes()
        refs = []
        for _ in range(50):
            opt = make()
            refs.append((weakref.ref(opt), weakref.ref(opt.pager)))
            del opt
        grown = _rss_bytes() - before
    finally:
        if was_enabled:
            gc.enable()
    assert all(a() is None and b() is None for a, b in refs)
    assert grown < 64 * 2**20, grown  # 50 leaked optimizers would hold > 200 MB


def test_subclass_overriding_the_update_hook_is_counted_once():
    """A bitsandbytes-style subclass overriding update_step may not run pagedopt's kernels, so
    the watch counts those gradients itself - and the kernels (called through super()) do not
    count them a second time."""

    class Custom(pagedopt.AdamW8bit):
        def update_step(self, group, p, gindex, pindex):
            return super().update_step(group, p, gindex, pindex)

    w = torch.nn.Parameter(torch.ones(900))
    opt = Custom([w], min_8bit_size=0)
    assert opt._uses_hook_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonfiniteGradWarning)
        for _ in range(2):
            w.grad = _grad(900, {1: float("nan"), 800: float("inf")})
            opt.step()
    assert opt.nonfinite.total() == 4 and w[1] == 1 and w[0] != 1
