"""Prepared CUDA launches of the step plan (pagedopt/backends/cuda_prepared.py), run on the CPU
through the kernel emulation (tests/cuda_emulation.py): the CUDA backend serves CPU tensors
with an emulated launcher, so the host code - descriptor packing once per plan, per-step
scalar and gradient-pointer rewrites, launch arguments - is checked without a GPU.

Tolerance tier: ``EXACT`` - the emulator runs the reference per chunk on the descriptors the
host code uploaded, so the planned and per-item paths must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import pagedopt
from cuda_emulation import EmulatedLauncher
from pagedopt.backends import cuda_plan
from pagedopt.backends.cuda import CudaBackend
from pagedopt.functional import dispatch


@pytest.fixture
def emulated(monkeypatch):
    launchers = []

    def factory(device):
        launchers.append(EmulatedLauncher())
        return launchers[-1]

    backend = CudaBackend(launcher_factory=factory)
    monkeypatch.setitem(dispatch._resolved, "cpu", backend)
    yield launchers
    dispatch.reset_backends()


def params():
    g = torch.Generator().manual_seed(0)
    specs = [((300, 20), torch.float32), ((4097,), torch.bfloat16), ((1,), torch.float32), ((0,), torch.float32),
             ((513,), torch.float16), ((2048,), torch.float32)]
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(d)) for s, d in specs]


def run(name: str, prepared: bool = True, steps: int = 3, seed: int = 100, spike_at: int | None = None,
        **kwargs):
    """Train :func:`params` for ``steps`` steps under a learning-rate schedule; the gradients
    of step ``spike_at`` are 30x larger (moves trust ratios and tensor-wise scales)."""
    ps = params()
    small = {"min_8bit_size": 0} if name.endswith("8bit") else {}
    opt = pagedopt.optim.get_optimizer_class(name)(ps, **small, **kwargs)
    opt.prepared_launches = prepared
    for t in range(steps):
        g = torch.Generator().manual_seed(seed + t)
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * 0.01 * (30.0 if t == spike_at else 1.0)).to(p.dtype)
        opt.param_groups[0]["lr"] = 1e-3 / (t + 1)
        opt.step()
    return ps, opt


STATE_KEYS = ("state1", "state2", "absmax1", "absmax2", "unorm_vec", "gnorm_vec")


def assert_same(a_params, a, b_params, b) -> None:
    """Bit-identical parameters and states (the exact tier)."""
    for x, y in zip(a_params, b_params):
        assert torch.equal(x, y)
        for key in STATE_KEYS:
            if key in a.state[x]:
                assert torch.equal(a.state[x][key], b.state[y][key]), key


@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW32bit", "Lion8bit", "AdEMAMix8bit"])
def test_prepared_cuda_launches_match_the_per_item_path(emulated, name):
    planned_params, planned = run(name, True)
    assert_same(planned_params, planned, *run(name, False))
    assert planned.plan_builds == 1 and not planned._plan.per_item


@pytest.mark.parametrize("name,extra", [
    ("LAMB8bit", dict(max_unorm=0.3)),  # tensor-wise (LAMB's default) and a trust ratio
    ("LAMB8bit", dict(max_unorm=0.3, block_wise=True)),
    ("LAMB32bit", dict(max_unorm=0.3)),
    ("LARS8bit", dict(lr=1e-2, momentum=0.9, max_unorm=0.05, percentile_clipping=50)),
    ("AdamW8bit", dict(block_wise=False)),  # tensor-wise alone: one moment, two states
    ("AdEMAMix8bit", dict(block_wise=False)),  # two state1 moments
])
def test_prepare_pass_runs_in_prepared_cuda_launches(emulated, name, extra):
    """Trust ratios and tensor-wise state in the prepared CUDA launches: the prepare pass is a
    prepared launch of its own (CudaPrepareLaunch) whose maxima and norms fill the buffers the
    update launch reads, and tensor-wise scales are copied into the state after the update
    kernel. Bit-identical to the per-item path (exact tier), one plan, no per-item entries."""
    pa, a = run(name, True, steps=4, spike_at=2, **extra)
    assert_same(pa, a, *run(name, False, steps=4, spike_at=2, **extra))
    plan = a._plan
    assert a.plan_builds == 1 and not plan.per_item
    assert all(lg.prepare_launch is not None for lg in plan.launch_groups)
    prepares = [n for launcher in emulated for n, _, _ in launcher.launches if "prepare" in n]
    assert prepares, "no prepare kernel ran"


@pytest.mark.parametrize("name,extra", [("AdamW8bit", {}), ("LAMB8bit", dict(max_unorm=0.3))])
def test_prepared_cuda_launches_keep_no_gradient_alive(emulated, name, extra):
    """Every step's gradients are freed once the user drops them: the prepared CUDA launches
    (and the plan's items, prepare buffers, graph bookkeeping) hold only pointers."""
    import gc
    import weakref

    ps = params()
    opt = pagedopt.optim.get_optimizer_class(name)(ps, min_8bit_size=0, **extra)
    refs = []
    for t in range(4):
        gen = torch.Generator().manual_seed(100 + t)
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype)
            refs.append(weakref.ref(p.grad))
        opt.step()
        opt.zero_grad(set_to_none=True)
    gc.collect()
    assert opt._plan.launch_groups and not opt._plan.per_item
    assert [r() is None for r in refs] == [True] * len(refs)


def test_descriptors_are_packed_once_per_plan(emulated, monkeypatch):
    packed = []
    real = cuda_plan.pack_update_descs

    def counting(kind, items):
        packed.append(len(items))
        return real(kind, items)

    monkeypatch.setattr(cuda_plan, "pack_update_descs", counting)
    ps, opt = run("AdamW8bit", True, steps=4)
    # three element types (f32, bf16, f16), one state mode: three launches, packed at plan time only
    assert len(packed) == 3 and sum(packed) == 5  # the empty parameter is never launched
    updates = [name for launcher in emulated for name, _, _ in launcher.launches if "update" in name]
    assert len(updates) == 3 * 4


def test_misaligned_new_gradient_clears_the_vector_flag(emulated):
    # a gradient that is a view at an odd offset: not 16-byte aligned, so vector loads must be off
    def go(prepared):
        p = torch.nn.Parameter(torch.randn(1000, generator=torch.Generator().manual_seed(9)) * 0.1)
        opt = pagedopt.AdamW32bit([p])
        opt.prepared_launches = prepared
        for t in range(4):
            base = torch.randn(1001, generator=torch.Generator().manual_seed(t)) * 0.01
            p.grad = base[1:] if t in (0, 2) else base[:1000].clone()  # plan built with a misaligned one
            opt.step()
        return p
    assert torch.equal(go(True), go(False))


# -- CUDA graph bookkeeping ----------------------------------------------------------------------


class FakeGraph:
    """Replays exactly what was recorded at capture: the descriptor copies (same source and
    destination buffers), the kernel launches (same arguments) and the tensor-wise scale
    copies that follow them (same tensors) - no Python of the step."""

    def __init__(self, copies, launches, after=()):
        self.copies, self.launches, self.after = copies, launches, list(after)

    def replay(self):
        for dst, src in self.copies:
            dst.copy_(src)
        for launcher, args in self.launches:
            launcher.launch(*args)
        for dst, src in self.after:
            torch._foreach_copy_(dst, src)


class FakeGraphs:
    def __init__(self):
        self.captures = 0
        self.fail = False
        self.user_capturing = False

    def available(self, device):
        return True

    def capturing(self, device):
        return self.user_capturing

    def capture(self, device, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        groups = fn.__self__.groups
        launchers = {id(g.launcher): g.launcher for g in groups}.values()
        launches, after = [], []
        for launcher in launchers:  # record the launches instead of running them (a capture runs nothing)
            launcher.launch = lambda *args, _l=launcher: launches.append((_l, args))
        real_foreach_copy = torch._foreach_copy_
        torch._foreach_copy_ = lambda dst, src: after.append((dst, src))  # (recorded, like a kernel)
        try:
            fn()
        finally:
            torch._foreach_copy_ = real_foreach_copy
            for launcher in launchers:
                del launcher.launch
        return FakeGraph([(g.device_buffer, g.pinned) for g in groups], launches, after)

    def event(self, device):
        return None


@pytest.fixture
def graphs(monkeypatch):
    from pagedopt.backends import cuda_prepared

    fake = FakeGraphs()
    monkeypatch.setattr(cuda_prepared, "GRAPHS", fake)
    return fake


def train_graph(prepared: bool, steps: int = 6, cuda_graph: bool = True, extra_group_at: int | None = None):
    ps = params()
    extra = torch.nn.Parameter(torch.randn(700, generator=torch.Generator().manual_seed(5)) * 0.1)
    opt = pagedopt.AdamW8bit(ps, min_8bit_size=0, cuda_graph=cuda_graph)
    opt.prepared_launches = prepared
    for t in range(steps):
        if t == extra_group_at:
            opt.add_param_group({"params": [extra]})
        g = torch.Generator().manual_seed(200 + t)
        for p in ps + ([extra] if extra_group_at is not None and t >= extra_group_at else []):
            p.grad = (torch.randn(p.shape, generator=g) * 0.01).to(p.dtype)  # new tensors: new pointers
        opt.param_groups[0]["lr"] = 1e-3 / (t + 1)  # new scalars every step
        opt.step()
    return ps + [extra], opt


def test_graph_replays_read_each_steps_scalars_and_pointers(emulated, graphs):
    graphed_params, graphed = train_graph(True)
    eager_params, _ = train_graph(False)
    for a, b in zip(graphed_params, eager_params):
        assert torch.equal(a, b)
    launch = graphed._plan.launch_groups[0].launch
    assert graphs.captures == 1 and launch.replays == 6 - 2  # two warm-up runs, then replays


@pytest.mark.parametrize("name", ["LAMB8bit", "AdamW8bit"])
def test_graph_replays_with_the_prepare_pass_eager_before_them(emulated, graphs, name):
    """Trust ratios and tensor-wise scales: the prepare pass runs eagerly each step into the
    buffers a replayed update graph reads, and the graph's own tensor-wise scale copies land
    after its kernels. Same parameters and states as without a graph."""
    extra = dict(max_unorm=0.3) if name == "LAMB8bit" else dict(block_wise=False)
    pa, a = run(name, steps=6, seed=300, spike_at=4, cuda_graph=True, **extra)
    assert_same(pa, a, *run(name, steps=6, seed=300, spike_at=4, cuda_graph=False, **extra))
    launches = [lg.launch for lg in a._plan.launch_groups]
    assert graphs.captures == len(launches) and all(launch.replays == 6 - 2 for launch in launches)


def test_recaptured_after_a_plan_change(emulated, graphs):
    graphed_params, graphed = train_graph(True, steps=8, extra_group_at=4)
    eager_params, _ = train_graph(False, steps=8, extra_group_at=4)
    for a, b in zip(graphed_params, eager_params):
        assert torch.equal(a, b)
    # the second plan has two launch groups (the new parameter's step count differs): each is
    # captured once after its warm-up, so three captures in all
    assert graphed.plan_builds == 2 and len(graphed._plan.launch_groups) == 2 and graphs.captures == 3


def test_capture_failure_falls_back_once_with_a_warning(emulated, graphs):
    graphs.fail = True
    with pytest.warns(RuntimeWarning, match="capturing the optimizer step as a CUDA graph failed"):
        graphed_params, graphed = train_graph(True)
    eager_params, _ = train_graph(False)
    for a, b in zip(graphed_params, eager_params):
        assert torch.equal(a, b)
    launch = graphed._plan.launch_groups[0].launch
    assert launch.graph is None and launch.replays == 0 and launch.graph_failed


def test_no_capture_inside_a_user_capture_or_when_turned_off(emulated, graphs):
    graphs.user_capturing = True
    _, opt = train_graph(True)
    assert graphs.captures == 0 and opt._plan.launch_groups[0].launch.replays == 0
    graphs.user_capturing = False
    _, opt = train_graph(True, cuda_graph=False)
    assert graphs.captures == 0 and opt._plan.launch_groups[0].launch.use_graph is False


# -- the kernels count non-finite gradient elements into the watch's device counter --------------


IGNORE_NONFINITE = pytest.mark.filterwarnings("ignore::pagedopt.optim.nonfinite.NonfiniteGradWarning")


def _nan_grads(ps, t):
    """Gradients with NaN/Inf at fixed places; returns how many."""
    g = torch.Generator().manual_seed(300 + t)
    bad = 0
    for p in ps:
        grad = (torch.randn(p.shape, generator=g) * 0.01).to(p.dtype)
        flat = grad.view(-1)
        for k, v in zip((0, 5, 777), (float("nan"), float("inf"), -float("inf"))):
            if k < flat.numel():
                flat[k] = v
                bad += 1
        p.grad = grad
    return bad


@IGNORE_NONFINITE
@pytest.mark.parametrize("prepared", [True, False], ids=["planned", "per-item"])
def test_update_kernels_count_nonfinite_into_the_watch_counter(emulated, graphs, prepared):
    """Every update launch (planned, graph-replayed, per item) passes the watch's running count
    on the device; the emulated kernel adds its NaN/Inf count there, and the watch's total is
    exact (no second count by a pass of its own or by the reference)."""
    ps = params()
    opt = pagedopt.AdamW8bit(ps, min_8bit_size=0)
    opt.prepared_launches = prepared
    expected = 0
    for t in range(5):
        expected += _nan_grads(ps, t)
        opt.step()
    counter = opt.nonfinite._counts[torch.device("cpu")]
    pointers = [p for launcher in emulated for p in launcher.nonfinite_pointers]
    assert pointers and set(pointers) == {counter.data_ptr()}
    assert opt.nonfinite.total() == expected
    if prepared:
        assert opt._plan.launch_groups[0].launch.replays == 5 - 2  # counted inside the graph too


@IGNORE_NONFINITE
def test_watch_mode_change_replans_and_stops_kernel_counting(emulated):
    ps = params()
    opt = pagedopt.AdamW8bit(ps, min_8bit_size=0)
    _nan_grads(ps, 0)
    opt.nonfinite.mode = "off"
    opt.step()
    assert opt.plan_builds == 1 and opt.nonfinite.total() == 0
    assert {p for launcher in emulated for p in launcher.nonfinite_pointers} == {0}
    opt.nonfinite.mode = "skip"
    bad = _nan_grads(ps, 1)
    opt.step()
    assert opt.plan_builds == 2 and opt.nonfinite.total() == bad


@IGNORE_NONFINITE
def test_update_in_backward_counts_through_the_kernels(emulated):
    w = torch.nn.Parameter(torch.ones(600))
    opt = pagedopt.AdamW8bit([w], min_8bit_size=0, update_in_backward=True)
    x = torch.ones(600)
    x[5], x[9] = float("nan"), float("inf")
    (w * x).sum().backward()
    assert opt.nonfinite.total() == 2 and w.grad is None
    assert any(p for launcher in emulated for p in launcher.nonfinite_pointers)
