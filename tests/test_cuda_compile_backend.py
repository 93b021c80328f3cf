"""The CUDA backend without a GPU: a clear error (or the opt-in reference fallback) when torch,
NVRTC or the driver is missing, importing pagedopt without cuda-python, and the backend's host
code end to end with the kernels emulated on the CPU.

Tolerance tiers of the emulated runs: exact (norms: float64 order) against the reference;
fast kernels against the fast replay; the optimizer chain over 3 steps is exact for strict
kernels except where a float64 norm feeds the step (1e-6), and tier fast-optimizer
(tests/test_fast_numerics.py: 1e-5 relative + 1e-6 absolute) for the default fast kernels.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch

from cuda_compile_helpers import REPO, _item
from pagedopt.functional import dispatch
from pagedopt.functional.kinds import kind_for

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (pip install pagedopt[cuda]) is not installed")

from pagedopt.backends import cuda as cuda_backend  # noqa: E402
from pagedopt.backends import cuda_catalog, cuda_compiler  # noqa: E402


# --- behaviour without CUDA ---------------------------------------------------------------------


@pytest.fixture
def fresh_dispatch():
    dispatch.reset_backends()
    yield
    dispatch.reset_backends()


def test_cuda_backend_is_registered_lazily():
    assert dispatch._loaders["cuda"] is cuda_backend.load_backend


class _Raises:
    """A stand-in for cuda-python's nvrtc/driver modules whose library cannot be loaded."""

    def __init__(self, message: str):
        self.message = message

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise RuntimeError(self.message)

        return fail


@pytest.fixture
def uncached_probes():
    from pagedopt.backends import cuda_driver

    cuda_compiler.nvrtc_version.cache_clear()
    cuda_driver.init_driver.cache_clear()
    yield
    cuda_compiler.nvrtc_version.cache_clear()
    cuda_driver.init_driver.cache_clear()


@pytest.mark.parametrize(
    "broken,expected",
    [
        ("torch", "torch reports no usable CUDA device (torch.cuda.is_available() is False)"),
        ("nvrtc", "the NVRTC library could not be loaded (libnvrtc.so.13: cannot open shared object file)"),
        ("driver", "the CUDA driver library (libcuda) could not be loaded (libcuda.so.1: cannot open"),
    ],
)
def test_cuda_tensors_get_a_clear_error_when_something_is_missing(
    broken, expected, monkeypatch, fresh_dispatch, uncached_probes
):
    from pagedopt.backends import cuda_driver

    monkeypatch.setattr(torch.cuda, "is_available", lambda: broken != "torch")
    monkeypatch.delenv(cuda_backend.FALLBACK_ENV, raising=False)
    if broken == "nvrtc":
        monkeypatch.setattr(cuda_compiler, "_nvrtc", lambda: _Raises("libnvrtc.so.13: cannot open shared object file"))
    if broken == "driver":
        monkeypatch.setattr(cuda_driver, "_driver", lambda: _Raises("libcuda.so.1: cannot open shared object file"))
    backend = dispatch.backend_for(torch.device("cuda", 0))
    assert backend.name == "cuda-unavailable"
    _, item = _item("adamw", 8)
    for call in (lambda: backend.update(kind_for("adamw"), [item]),
                 lambda: backend.prepare(kind_for("adamw"), [item], True),
                 lambda: backend.grad_norm_sq([item.grad])):
        with pytest.raises(cuda_backend.CudaUnavailableError) as info:
            call()
        assert expected in str(info.value) and "pip install pagedopt[cuda]" in str(info.value)
        assert "PAGEDOPT_CUDA_FALLBACK=reference" in str(info.value)


def test_fallback_env_uses_the_reference_with_a_warning(monkeypatch, fresh_dispatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(cuda_backend.FALLBACK_ENV, "reference")
    monkeypatch.setattr(cuda_backend, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="pure-torch reference"):
        backend = dispatch.backend_for(torch.device("cuda", 0))
    assert backend is dispatch.REFERENCE


def test_import_pagedopt_without_cuda_python():
    """A machine without cuda-python (blocked here) imports pagedopt and trains on CPU; CUDA
    tensors would get the install hint."""
    code = textwrap.dedent("""
        import sys
        sys.modules["cuda"] = None  # any `import cuda...` now raises ImportError
        import torch, pagedopt
        from pagedopt.backends import cuda_compiler
        p = torch.nn.Parameter(torch.ones(8)); p.grad = torch.ones(8)
        pagedopt.AdamW([p], lr=0.1).step()
        assert p.detach().lt(1).all()
        try:
            cuda_compiler.nvrtc_version()
        except cuda_compiler.NvrtcUnavailableError as e:
            print("ERR", e)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ERR cuda-python is not installed" in result.stdout and "pip install pagedopt[cuda]" in result.stdout


# --- the backend's host code, end to end, with the kernels emulated on the CPU ------------------


@pytest.fixture
def emulated():
    from cuda_emulation import EmulatedLauncher

    launcher = EmulatedLauncher()
    return cuda_backend.CudaBackend(launcher_factory=lambda device: launcher), launcher


def _copies(items):
    from cuda_helpers import to_device

    return [to_device(it, "cpu") for it in items]


@pytest.mark.parametrize("numerics", ("strict", "fast"))
@pytest.mark.parametrize("mode", ("state32", "block8", "tensor8"))
@pytest.mark.parametrize("kind_name", ("adam", "adamw", "lamb", "ademamix", "momentum", "lars", "lion", "rmsprop", "adagrad"))
def test_host_code_drives_every_kernel_correctly(emulated, kind_name, mode, numerics):
    """Tier exact (norms: float64 order): the emulated kernels decode the descriptors the
    backend packed and run the reference (fast kernels: the fast replay) per chunk, so any
    packing, prefix, argument, result-layout or numerics-variant error changes the result.
    One update launch serves all sizes."""
    import fast_numerics
    from cuda_helpers import SIZES, assert_items_equal, make_item, run_prepare_and_update
    from pagedopt.functional import reference

    backend, launcher = emulated
    kind = kind_for(kind_name)
    dtype = (torch.float32, torch.float16, torch.bfloat16)[len(kind_name) % 3]
    ref = [make_item(kind_name, n, dtype, mode, seed=n, scales=i % 2 == 1, numerics=numerics)[1]
           for i, n in enumerate(SIZES)]
    got = _copies(ref)
    oracle = fast_numerics if numerics == "fast" else reference
    ref, got = run_prepare_and_update(backend, kind, ref, got, oracle=oracle)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_items_equal(g, r, f"{kind_name}/{mode}/{numerics} n={SIZES[i]}")
    names = [name.split("<")[0].split("::")[-1] for name, _, _ in launcher.launches]
    assert names == ["prepare_kernel", "finalize_prepare", "update_kernel"]
    code = cuda_catalog.NUMERICS_CODES[numerics]
    assert launcher.numerics_launched == [code, None, code]


def test_host_code_launches_once_per_numerics_mode(emulated):
    """Items of one (dtype, mode) group with different numerics modes take one launch each
    (strict items bit-exact against the reference, fast ones against the fast replay)."""
    import fast_numerics
    from cuda_helpers import assert_items_equal, make_item
    from pagedopt.functional import reference

    backend, launcher = emulated
    kind = kind_for("adamw")
    ref = [make_item("adamw", n, torch.bfloat16, "block8", seed=n, numerics=("fast", "strict")[i % 2])[1]
           for i, n in enumerate((300, 4097, 5000, 1))]
    got = _copies(ref)
    backend.update(kind, got)
    for r in ref:
        (fast_numerics if r.numerics == "fast" else reference).update(kind, [r])
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_items_equal(g, r, f"item {i} ({r.numerics})")
    assert sorted(launcher.numerics_launched) == [0, 1]
    with pytest.raises(ValueError, match="numerics='fastest' is not one of 'strict', 'fast'"):
        backend.update(kind, [dataclasses.replace(got[0], numerics="fastest")])


def test_host_code_with_mixed_misaligned_strided_and_empty_tensors(emulated):
    """Tier exact: 36 tensors, three dtypes, three modes, misaligned views, strided views
    (staged and written back) and empty tensors - one launch per (dtype, mode) group."""
    from cuda_helpers import assert_items_equal, make_item, run_prepare_and_update

    backend, launcher = emulated
    kind = kind_for("adamw")
    ref, got = [], []
    for i in range(36):
        n = [0, 1, 17, 300, 4096, 4099, 9000, 33_000, 70_000][i % 9]
        dtype = (torch.float32, torch.float16, torch.bfloat16)[i % 3]
        mode = ("block8", "state32", "block8", "tensor8")[i % 4]
        _, item = make_item("adamw", n, dtype, mode, seed=100 + i, scales=i % 3 == 0)
        (mine,) = _copies([item])
        if i % 5 == 1:
            shifted = torch.zeros(n + 1, dtype=dtype)
            shifted[1:].copy_(mine.param)
            mine = dataclasses.replace(mine, param=shifted[1:])
        if i % 5 == 2 and n > 1:
            wide = torch.zeros(n, 2, dtype=dtype)
            wide[:, 1].copy_(mine.param)
            mine = dataclasses.replace(mine, param=wide[:, 1])
        ref.append(item)
        got.append(mine)
    ref, got = run_prepare_and_update(backend, kind, ref, got, want_norms=True)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_items_equal(g, r, f"tensor {i}")
    updates = [name for name, _, _ in launcher.launches if "update_kernel" in name]
    assert len(updates) == len(set(updates)) == 9  # 3 dtypes x 3 modes, one launch each


def test_host_code_fills_tensorwise_maxima_itself(emulated):
    from cuda_helpers import assert_items_equal, make_item

    backend, _ = emulated
    kind, ref = make_item("ademamix", 5000, torch.bfloat16, "tensor8", seed=2)
    (got,) = _copies([ref])
    from pagedopt.functional import reference

    reference.update(kind, [ref])
    backend.update(kind, [got])
    assert_items_equal(got, ref, "tensor-wise")


def test_host_code_grad_norms(emulated):
    """Tier float64 order: chunked partials summed per tensor."""
    from pagedopt.functional import reference

    backend, launcher = emulated
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dt)
             for n in (0, 1, 5000, 100_000) for dt in (torch.float32, torch.bfloat16)]
    grads[5][7] = float("nan")
    grads.append(torch.randn(64, 3)[:, 1])  # strided
    got = backend.grad_norm_sq(grads)
    for g, w in zip(got, reference.grad_norm_sq(grads)):
        assert g.dtype == torch.float64 and g.dim() == 0
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0.0)
    assert sum("grad_norm_partials" in name for name, _, _ in launcher.launches) == 2  # f32, bf16


@pytest.mark.parametrize(
    "name,kwargs",
    [("AdamW8bit", {"percentile_clipping": 90}), ("LAMB8bit", {"block_wise": False}), ("Lion32bit", {}),
     ("AdEMAMix8bit", {}), ("LARS8bit", {"lr": 0.01, "momentum": 0.9, "block_wise": False})],
)
@pytest.mark.parametrize("numerics", ("default", "strict"))
def test_optimizers_through_the_host_code(emulated, monkeypatch, name, kwargs, numerics):
    """The optimizer -> dispatch -> CUDA backend -> launches chain (CPU tensors, emulated
    kernels) against the reference backend over 3 steps. Strict kernels: tier exact, except
    where a float64 norm feeds the step (1e-6). Default (fast) kernels: tier fast-optimizer
    (tests/test_fast_numerics.py): parameters within 1e-5 relative + 1e-6 absolute."""
    import pagedopt

    backend, launcher = emulated
    cls = getattr(pagedopt, name)
    if numerics == "strict":
        kwargs = {**kwargs, "numerics": "strict"}
    params = {}
    for tag in ("ref", "emu"):
        gen = torch.Generator().manual_seed(0)
        params[tag] = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in ((300, 40), (40,), (5000,))]
    opts = {tag: cls(ps, min_8bit_size=1000, **kwargs) for tag, ps in params.items()}
    for step in range(3):
        gen = torch.Generator().manual_seed(100 + step)
        grads = [torch.randn(p.shape, generator=gen) * 0.01 for p in params["ref"]]
        for tag in ("ref", "emu"):
            for p, g in zip(params[tag], grads):
                p.grad = g.clone()
            dispatch.reset_backends()
            if tag == "emu":
                monkeypatch.setitem(dispatch._resolved, "cpu", backend)
            opts[tag].step()
    dispatch.reset_backends()
    assert any("update_kernel" in launched for launched, _, _ in launcher.launches)
    exact = kwargs.get("percentile_clipping", 100) == 100 and name not in ("LAMB8bit", "LARS8bit")
    for a, b in zip(params["emu"], params["ref"]):
        if numerics != "strict":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        elif exact:
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
