"""The CUDA kernels against the pure-torch reference, on a GPU (``pytest -m cuda``).

Tolerance tiers (DESIGN.md "Numerics contract"):

* **exact** - parameters, float32 states, 8-bit codes and absmax of the strict kernels
  (``numerics="strict"``; the fast ones are held to the tiers of tests/test_cuda_fast.py). They run the
  reference's float32 operations in the same order, compiled without FMA contraction and
  with IEEE division/sqrt, so every bit must match the reference run on the CPU (the oracle;
  torch's own CUDA kernels divide by a scalar through its reciprocal, so the reference is
  not run on the GPU).
* **float64 order** - gradient, update and parameter norms: float64 sums in another order,
  relative error <= 1e-10.
* **optimizer** - full optimizers whose step depends on such a norm (percentile clipping,
  trust ratio): the float32 scale may differ in its last bit, so parameters agree to 1e-6.

Every test here needs an NVIDIA GPU; each skips with the reason otherwise.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cuda_helpers import (
    DTYPES, HP, KINDS, MODES, SIZES, SKIP_REASON, assert_bit_equal, assert_items_equal, make_item, run_prepare_and_update,
    to_device,
)
from pagedopt.functional import dispatch, reference
from pagedopt.functional.items import UpdateItem
from pagedopt.functional.kinds import kind_for
from pagedopt.functional.quantization import codes_for, num_blocks
from pagedopt.functional.scalars import step_scalars


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

@pytest.fixture(scope="module")
def backend():
    from pagedopt.backends.cuda import CudaBackend

    return CudaBackend()


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda", torch.cuda.current_device())


# --- every kernel against the reference ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kind_name", KINDS)
def test_kernels_match_reference_exactly(backend, device, kind_name, dtype, mode):
    """Tier exact (norms: float64 order). One multi-tensor launch over odd sizes, with
    NaN/Inf/zero gradients, and percentile/trust-ratio scales on every other tensor."""
    kind = kind_for(kind_name)
    cpu = [make_item(kind_name, n, dtype, mode, seed=n, scales=i % 2 == 1)[1] for i, n in enumerate(SIZES)]
    gpu = [to_device(it, device) for it in cpu]
    cpu, gpu = run_prepare_and_update(backend, kind, cpu, gpu)
    for i, (g, c) in enumerate(zip(gpu, cpu)):
        assert_items_equal(g, c, f"{kind_name}/{dtype}/{mode} n={SIZES[i]}")


@pytest.mark.parametrize("kind_name", ("adamw", "momentum", "lion", "rmsprop"))
def test_first_step_skip_zeros_and_empty_tensors(backend, device, kind_name):
    """Tier exact: step 1 (SGD's buffer starts as the gradient), skip_zeros, and 0-element
    parameters in the same launch as real ones. (AdEMAMix is left out: the reference cannot
    reshape its empty two-moment state.)"""
    kind = kind_for(kind_name)
    cpu = [make_item(kind_name, n, torch.float32, mode, seed=7, step=1, skip_zeros=True)[1]
           for n in (0, 5000, 0) for mode in ("state32", "block8")]
    gpu = [to_device(it, device) for it in cpu]
    reference.update(kind, cpu)
    backend.update(kind, gpu)
    for g, c in zip(gpu, cpu):
        assert_items_equal(g, c, kind_name)


def test_multi_tensor_launch_with_misaligned_and_strided_tensors(backend, device):
    """Tier exact: 40 tensors of mixed sizes, dtypes and modes in one call, some not 16-byte
    aligned (scalar path) and some non-contiguous (staged copies)."""
    kind = kind_for("adamw")
    cpu, gpu = [], []
    for i in range(40):
        n = [1, 17, 300, 4096, 4099, 9000, 33_000][i % 7]
        dtype = DTYPES[i % 3]
        mode = ("block8", "state32", "block8", "tensor8")[i % 4]
        _, item = make_item("adamw", n, dtype, mode, seed=100 + i, scales=i % 3 == 0)
        g_item = to_device(item, device)
        if i % 5 == 1:  # shift the parameter one element into a larger buffer
            host = torch.zeros(n + 1, dtype=dtype, device=device)
            host[1:].copy_(g_item.param)
            g_item = dataclasses.replace(g_item, param=host[1:])
        if i % 5 == 2 and n > 1:  # strided parameter and gradient
            wide = torch.zeros(n, 2, dtype=dtype, device=device)
            wide[:, 1].copy_(g_item.param)
            g_grad = torch.zeros(n, 3, dtype=dtype, device=device)
            g_grad[:, 2].copy_(g_item.grad)
            g_item = dataclasses.replace(g_item, param=wide[:, 1], grad=g_grad[:, 2])
        cpu.append(item)
        gpu.append(g_item)
    cpu, gpu = run_prepare_and_update(backend, kind, cpu, gpu, want_norms=False)
    for i, (g, c) in enumerate(zip(gpu, cpu)):
        assert_items_equal(g, c, f"tensor {i}")


@pytest.mark.parametrize("mode", MODES)
def test_many_steps_without_resync(backend, device, mode):
    """Tier exact over 20 steps: GPU and CPU states evolve independently and never drift."""
    kind = kind_for("ademamix")
    _, c = make_item("ademamix", 10_000, torch.bfloat16, mode, seed=3, step=1, specials=False)
    g = to_device(c, device)
    for step in range(1, 21):
        scalars = step_scalars(kind, HP["ademamix"], step)
        grad = (torch.randn(10_000, generator=torch.Generator().manual_seed(step)) * 0.01).to(torch.bfloat16)
        c = dataclasses.replace(c, scalars=scalars, grad=grad, new_absmax1=None, new_absmax2=None)
        g = dataclasses.replace(g, scalars=scalars, grad=grad.to(device), new_absmax1=None, new_absmax2=None)
        (c,), (g,) = run_prepare_and_update(backend, kind, [c], [g], want_norms=False)
        assert_items_equal(g, c, f"step {step}")


def test_tensorwise_update_without_prepared_maxima(backend, device):
    """A direct caller may omit new_absmax; the backend runs the prepare pass itself."""
    kind = kind_for("adam")
    _, c = make_item("adam", 5000, torch.float16, "tensor8", seed=11)
    g = to_device(c, device)
    reference.update(kind, [c])
    backend.update(kind, [g])
    assert_items_equal(g, c, "tensor-wise")


def test_mismatched_gradient_dtype_runs_the_reference(backend, device):
    kind = kind_for("lion")
    _, c = make_item("lion", 3000, torch.float32, "block8", seed=5)
    c = dataclasses.replace(c, grad=c.grad.to(torch.bfloat16))
    g = to_device(c, device)
    reference.update(kind, [c])
    backend.update(kind, [g])
    torch.testing.assert_close(g.param.cpu(), c.param, rtol=0, atol=1e-6)  # reference on CUDA: reciprocal division


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_grad_norm_sq(backend, device, dtype):
    """Tier float64 order: squared norms of the finite elements, one launch for all."""
    grads = []
    for i, n in enumerate((0, 1, 5, 4097, 40_000, 300_000)):
        g = (torch.randn(n, generator=torch.Generator().manual_seed(i)) * 10 ** (i - 3)).to(dtype)
        if n > 3:
            g[1], g[2] = float("nan"), float("inf")
        grads.append(g)
    want = reference.grad_norm_sq(grads)
    got = backend.grad_norm_sq([g.to(device) for g in grads])
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.float64 and a.dim() == 0 and a.device == device
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=0.0, msg=f"grad {i}")


# --- the code search --------------------------------------------------------------------------


def _raw_kernel(backend, device, spec):
    from pagedopt.backends import cuda_catalog

    dev = backend._device(device)
    return dev, dev.kernel(cuda_catalog.quant_program(), spec)


@pytest.mark.parametrize("signed", (True, False))
def test_code_search_is_exact_for_every_float32(backend, device, signed):
    """Tier exact: the table search equals quant.h's binary search for all 2^32 inputs."""
    from pagedopt.backends import cuda_catalog

    dev, kernel = _raw_kernel(backend, device, cuda_catalog.check_search_kernel(signed))
    result = torch.tensor([0, 0xFFFFFFFF], dtype=torch.int64, device=device)
    count = 2**32
    dev.launch(kernel, count // 256, None, (0, count, dev.maps.data_ptr(), dev.luts.data_ptr(), result.data_ptr()))
    mismatches, first = result.tolist()
    assert mismatches == 0, f"{mismatches} inputs get another code; first bit pattern {first:#010x}"


@pytest.mark.parametrize("signed", (True, False))
def test_quantize_kernel_matches_reference_codes(backend, device, signed):
    from pagedopt.backends import cuda_catalog
    from pagedopt.functional.qmap import decision_thresholds

    gen = torch.Generator().manual_seed(1)
    t = decision_thresholds(signed)
    near = torch.cat([t, -t])
    bits = near.view(torch.int32)
    x = torch.cat([
        torch.cat([(bits + k).view(torch.float32) for k in range(-2, 3)]),
        torch.rand(1_000_000, generator=gen) * 2 - 1,
        (torch.rand(1_000_000, generator=gen) * 2 - 1) * 1e-5,
        torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30]),
    ])
    if not signed:
        x = x.abs()
    dev, kernel = _raw_kernel(backend, device, cuda_catalog.quantize_kernel(signed))
    xs = x.to(device)
    codes = torch.empty(x.numel(), dtype=torch.uint8, device=device)
    dev.launch(kernel, x.numel() // 256 + 1, None, (xs.data_ptr(), x.numel(), codes.data_ptr(), dev.maps.data_ptr(), dev.luts.data_ptr()))
    assert_bit_equal(codes, codes_for(x, signed), "codes")


# --- optimizers, streams, syncs, size ------------------------------------------------------------


def _model_params(device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(512, 300), (300,), (64, 64), (4097,), (7,), (2, 3, 257)]
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype).to(device)) for s in shapes]


@pytest.mark.parametrize(
    "name,kwargs,exact",
    [
        ("AdamW8bit", {}, True),
        ("AdamW32bit", {}, True),
        ("AdEMAMix8bit", {"t_alpha": 5, "t_beta3": 5}, True),
        ("Lion8bit", {"block_wise": False}, True),
        ("RMSprop8bit", {"weight_decay": 0.1}, True),
        ("Adagrad8bit", {}, True),
        ("SGD8bit", {"lr": 0.01, "momentum": 0.9}, True),
        ("AdamW8bit", {"percentile_clipping": 50}, False),
        ("LAMB8bit", {}, False),
        ("LARS8bit", {"lr": 0.01, "momentum": 0.9}, False),
    ],
)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("f32", "bf16"))
def test_optimizer_on_cuda_matches_cpu(device, name, kwargs, exact, dtype):
    """CUDA (numerics="strict") vs CPU (whatever backend serves the CPU) over 5 steps with
    min_8bit_size=1000, so small tensors take 32-bit state in the same steps. Tier exact, or
    tier optimizer where a float64 norm feeds the step."""
    import pagedopt

    dispatch.reset_backends()
    cls = getattr(pagedopt, name)
    kwargs = {**kwargs, "numerics": "strict"}
    cpu_params = _model_params("cpu", dtype)
    gpu_params = _model_params(device, dtype)
    opts = [cls(ps, min_8bit_size=1000, **kwargs) for ps in (cpu_params, gpu_params)]
    for step in range(5):
        gen = torch.Generator().manual_seed(step)
        for pc, pg in zip(cpu_params, gpu_params):
            grad = (torch.randn(pc.shape, generator=gen) * 0.01).to(dtype)
            pc.grad, pg.grad = grad, grad.to(device)
        for opt in opts:
            opt.step()
    assert dispatch.backend_for(device).name == "cuda"
    for i, (pc, pg) in enumerate(zip(cpu_params, gpu_params)):
        if exact:
            assert_bit_equal(pg, pc, f"{name} param {i}")
            for key in ("state1", "state2", "absmax1", "absmax2"):
                if key in opts[0].state[pc]:
                    assert_bit_equal(opts[1].state[pg][key], opts[0].state[pc][key], f"{name} param {i} {key}")
        else:  # one float32 ulp of a scale can move a bf16 result by one bf16 ulp
            tol = 1e-6 if dtype == torch.float32 else 2.0**-7
            torch.testing.assert_close(pg.detach().cpu().float(), pc.detach().float(), rtol=tol, atol=1e-6)


def test_step_never_syncs_the_host(device):
    """After a warm-up step (compiling, loading), steps run under CUDA sync debug mode."""
    import pagedopt

    params = _model_params(device, torch.bfloat16)
    opt = pagedopt.AdamW8bit(params, min_8bit_size=1000, percentile_clipping=95)
    lamb = pagedopt.LAMB8bit(_model_params(device, torch.float32, seed=1), min_8bit_size=1000, block_wise=False)
    grads = [torch.randn_like(p) * 0.01 for p in params]
    for o in (opt, lamb):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.randn_like(p) * 0.01
        o.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            lamb.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graph", "eager"])
@pytest.mark.parametrize("prepared", [True, False], ids=["planned", "per-item"])
def test_update_kernels_count_nonfinite_gradient_elements(device, cuda_graph, prepared, monkeypatch):
    """The CUDA update kernels add their NaN/Inf count to the watch's device counter (in a
    replayed graph too), exactly, and the watch launches nothing of its own per gradient."""
    import warnings

    import pagedopt
    from pagedopt.optim.nonfinite import NonfiniteGradWarning

    params = _model_params(device, torch.bfloat16)
    opt = pagedopt.AdamW8bit(params, min_8bit_size=1000, cuda_graph=cuda_graph)
    opt.prepared_launches = prepared
    expected = 0
    calls = []
    real_isfinite = torch.isfinite
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonfiniteGradWarning)
        for step in range(6):
            for i, p in enumerate(params):
                g = torch.randn_like(p) * 0.01
                flat = g.view(-1)
                spots = {k for k in (0, 3 + step, flat.numel() - 1) if k < flat.numel()}
                for k in spots:
                    flat[k] = float("nan") if (i + k) % 2 else float("inf")
                expected += len(spots)
                p.grad = g
            if step == 3:  # from here on, no isfinite() launches of the watch
                monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(t) or real_isfinite(t))
            opt.step()
        monkeypatch.setattr(torch, "isfinite", real_isfinite)
        assert opt.nonfinite.total() == expected
    assert not calls


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graph", "eager"])
@pytest.mark.parametrize("name,extra", [
    ("LAMB8bit", dict(max_unorm=0.3)),  # tensor-wise state and a trust ratio
    ("LARS8bit", dict(lr=1e-2, momentum=0.9, max_unorm=0.05)),
    ("AdamW8bit", dict(block_wise=False)),
], ids=["lamb", "lars", "adamw-tensorwise"])
def test_prepare_pass_in_planned_launches_matches_per_item(device, name, extra, cuda_graph):
    """Trust ratios and tensor-wise state in the prepared launches (the prepare pass a prepared
    launch of its own, eager before the update's launch or graph replay): the same parameters
    and states as the per-item passes, bit for bit (strict numerics: the same kernels either way)."""
    import pagedopt

    def go(prepared):
        params = _model_params(device, torch.float32)
        cls = pagedopt.optim.get_optimizer_class(name)
        opt = cls(params, min_8bit_size=1000, numerics="strict", cuda_graph=cuda_graph, **extra)
        opt.prepared_launches = prepared
        for step in range(6):
            g = torch.Generator(device=device).manual_seed(50 + step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, device=device) * (0.3 if step == 4 else 0.01)
            opt.param_groups[0]["lr"] = extra.get("lr", 1e-3) / (step + 1)
            opt.step()
        torch.cuda.synchronize()
        return params, opt

    (pa, a), (pb, b) = go(True), go(False)
    assert a._plan.launch_groups and not a._plan.per_item
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        for key in ("state1", "state2", "absmax1", "absmax2", "unorm_vec"):
            if key in a.state[x]:
                assert torch.equal(a.state[x][key], b.state[y][key]), key


def test_kernels_run_on_the_current_stream(backend, device):
    """A launch queued behind a 1 s sleep on a side stream must not have run yet when the
    default stream reads the parameter."""
    kind, c = make_item("adamw", 100_000, torch.float32, "block8", seed=21)
    g = to_device(c, device)
    before = g.param.detach().cpu().clone()
    backend.update(kind, [to_device(c, device)])  # warm-up: compile and load outside the timing
    torch.cuda.synchronize()
    side = torch.cuda.Stream(device=device)
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000_000)
        backend.update(kind, [g])
    during = g.param.detach().cpu()  # default stream: does not wait for `side`
    side.synchronize()
    reference.update(kind, [c])
    assert torch.equal(during, before), "the kernel did not wait for the side stream: wrong stream"
    assert_items_equal(g, c, "after the side stream")


def test_update_of_a_tensor_over_2_31_elements(backend, device):
    """Tier exact on windows at the start, around element 2^31 and at the end of one
    bf16 8-bit AdamW update (64-bit indexing end to end)."""
    n = 2**31 + 4097
    blocks = num_blocks(n)
    need = n * (2 + 2 + 1 + 1) + 2 * blocks * 4 + 2**28 * 8  # + one float64 chunk of the check
    free, _ = torch.cuda.mem_get_info(device)
    if free < need * 1.15:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} GiB free")
    kind = kind_for("adamw")
    param = torch.randn(n, device=device, dtype=torch.bfloat16)
    grad = torch.randn(n, device=device, dtype=torch.bfloat16) * 0.01
    s1 = torch.randint(0, 256, (n,), device=device, dtype=torch.uint8)
    s2 = torch.randint(0, 256, (n,), device=device, dtype=torch.uint8)
    a1 = torch.rand(blocks, device=device) * 1e-3
    a2 = torch.rand(blocks, device=device) * 1e-5
    item = UpdateItem(param, grad, s1, s2, a1, a2, step_scalars(kind, HP["adamw"], 5))
    windows = [(0, 4096), (2**31 - 2048, 2**31 + 2048), ((n // 256) * 256 - 2048, n)]
    cpu_items = []
    for lo, hi in windows:
        b0, b1 = lo // 256, (hi + 255) // 256
        cpu_items.append(UpdateItem(
            param[lo:hi].cpu(), grad[lo:hi].cpu(), s1[lo:hi].cpu(), s2[lo:hi].cpu(), a1[b0:b1].cpu(), a2[b0:b1].cpu(),
            item.scalars,
        ))
    big_norm = backend.grad_norm_sq([grad])[0]
    backend.update(kind, [item])
    reference.update(kind, cpu_items)
    for (lo, hi), c in zip(windows, cpu_items):
        b0, b1 = lo // 256, (hi + 255) // 256
        got = UpdateItem(param[lo:hi], grad[lo:hi], s1[lo:hi], s2[lo:hi], a1[b0:b1], a2[b0:b1], item.scalars)
        assert_items_equal(got, c, f"window [{lo}, {hi})")
    want = sum(chunk.double().square().sum() for chunk in grad.split(2**28))
    torch.testing.assert_close(big_norm, want, rtol=1e-9, atol=0.0)


def test_compile_and_cache_statistics_are_recorded(backend, device):
    from pagedopt.backends.cuda_compiler import kernel_stats

    stats = kernel_stats()
    assert stats["modules_loaded"] >= 1 and stats["cache_hits"] + stats["cache_misses"] >= 1
    assert math.isfinite(stats["compile_seconds"]) and stats["load_seconds"] > 0
