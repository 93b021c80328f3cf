"""Loading the native CPU library and choosing the CPU backend: a missing or broken library
file falls back to the reference with one warning, a library built for another CPU is refused,
importing pagedopt registers the native backend and ``PAGEDOPT_BACKEND=reference`` forces the
reference, and the library reports its build. No numerical comparisons (the kernels' tolerance
tiers are in test_native_cpu.py).

The library is built by ``pip install -e .`` (``setup.py``); these tests skip only when it was
not built at all, and fail when it exists but does not load (the import of native_cpu_helpers
does both).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import pagedopt
from pagedopt.backends import cpu
from pagedopt.functional import dispatch

from native_cpu_helpers import LIB, torch_on_one_thread

one_torch_thread = pytest.fixture(autouse=True)(torch_on_one_thread)


@pytest.fixture
def fresh_loader(monkeypatch):
    """Forget the loaded library and the one-warning flag for one test, then restore them."""
    saved = (cpu._library, cpu._failure, cpu._warned)
    cpu._library, cpu._failure, cpu._warned = None, None, False
    monkeypatch.delenv(dispatch.FORCE_ENV, raising=False)  # the suite may run with it set
    dispatch.reset_backends()
    yield
    cpu._library, cpu._failure, cpu._warned = saved
    dispatch.reset_backends()


def test_missing_library_falls_back_with_one_warning(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setenv(cpu.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.warns(RuntimeWarning, match=r"missing\.so does not exist.*pip install -e"):
        assert dispatch.backend_for(torch.device("cpu")).name == "reference"
    dispatch.reset_backends()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second resolution must not warn again
        assert cpu.load() is None
    # and the optimizers still work, on the reference path
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    pagedopt.AdamW8bit([p]).step()


def test_broken_library_file_falls_back(fresh_loader, monkeypatch, tmp_path):
    bogus = tmp_path / "libpagedopt_cpu.so"
    bogus.write_bytes(b"not an ELF file")
    monkeypatch.setenv(cpu.LIBRARY_ENV, str(bogus))
    with pytest.warns(RuntimeWarning, match="loading .* failed"):
        assert cpu.load() is None


def test_library_built_for_another_cpu_is_refused(fresh_loader, monkeypatch):
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: set())
    if not LIB.required_cpu_flags:
        pytest.skip("this build records no required CPU flags")
    with pytest.warns(RuntimeWarning, match="built for a CPU with"):
        assert cpu.load() is None


def test_import_registers_the_native_backend_and_env_forces_reference(fresh_loader, monkeypatch):
    assert dispatch.backend_for(torch.device("cpu")).name == "cpu"
    monkeypatch.setenv(dispatch.FORCE_ENV, "reference")
    dispatch.reset_backends()
    assert dispatch.backend_for(torch.device("cpu")).name == "reference"


def test_library_reports_its_build():
    assert LIB.abi_version == cpu.ABI_VERSION
    assert "levels=baseline" in LIB.build_info  # every build has the portable level
    assert LIB.isa in LIB.compiled_isas()
