"""CUDA kernel compilation without a GPU: every kernel compiles, the catalog is complete, the
``pagedopt kernels`` command reports and fails loudly, and the kernel cache, the compiler's
layout/offset checks, signature check, PTX/ptxas parsers and arch names behave.

The compile test is the CI gate for ``native/cuda``: every kernel instantiation through pip's
NVRTC for sm_80 and sm_90, a clean compiler log, no local memory (ptxas reports spills and
stack frames per kernel), and parameter sizes that match what the launcher packs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cuda_compile_helpers import REPO
from pagedopt.functional.kinds import Algorithm

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (pip install pagedopt[cuda]) is not installed")

from pagedopt.backends import cuda_catalog, cuda_compiler, cuda_layout  # noqa: E402

ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """Every program for sm_80 and sm_90, compiled fresh into a private cache."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv(cuda_compiler.CACHE_ENV, str(cache))
    try:
        programs = cuda_compiler.compile_all(list(ARCHS))
    finally:
        mp.undo()
    return cache, programs


# --- compilation -----------------------------------------------------------------------------


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    _, programs = compiled
    assert {(p.spec.slug, p.arch) for p in programs} == {
        (spec.slug, arch) for spec in cuda_catalog.all_programs() for arch in ARCHS
    }
    for p in programs:
        assert not p.from_cache
        assert p.cubin[:4] == b"\x7fELF", f"{p.spec.slug}/{p.arch}: NVRTC did not return a cubin"
        for kernel in p.spec.kernels:
            lowered = p.symbols[kernel.name]
            assert lowered in p.resources, f"{kernel.name} ({p.arch}) missing from the ptxas report"
    distinct = {k.name for p in programs for k in p.spec.kernels}
    assert len(distinct) == len(cuda_catalog.distinct_kernels()) == 225  # 117 strict + 108 fast


def test_compile_logs_have_no_warnings(compiled):
    _, programs = compiled
    problems = [f"{p.spec.slug}/{p.arch}: {w}" for p in programs for w in p.warnings()]
    assert problems == []


def test_no_kernel_uses_local_memory(compiled):
    """Spills and stack frames would put per-thread arrays in DRAM - ptxas reports both."""
    _, programs = compiled
    bad = {
        f"{p.arch} {name}": r
        for p in programs
        for name, r in p.resources.items()
        if r["spill_stores"] or r["spill_loads"] or r["stack_bytes"]
    }
    assert bad == {}
    registers = [r["registers"] for p in programs for r in p.resources.values()]
    assert max(registers) <= 128  # __launch_bounds__(256, 2): two CTAs per SM always fit


def test_kernel_parameters_match_the_launcher(compiled):
    """PTX parameter sizes of every kernel equal the ctypes sizes the launcher packs."""
    _, programs = compiled
    for p in programs:
        cuda_compiler.check_signatures(p)  # raises on mismatch
        for kernel in p.spec.kernels:
            assert p.ptx_params[p.symbols[kernel.name]] == [ctypes.sizeof(t) for t in kernel.params]


def test_catalog_covers_every_algorithm_dtype_and_mode():
    names = {k.name for k in cuda_catalog.distinct_kernels()}
    for algorithm in Algorithm:
        for elem in cuda_catalog.ELEM_CODES:
            for mode in cuda_catalog.MODE_CODES:
                for numerics in cuda_catalog.NUMERICS_CODES:
                    assert cuda_catalog.update_kernel(algorithm, elem, mode, numerics).name in names
                    assert cuda_catalog.prepare_kernel(algorithm, elem, mode, numerics).name in names
    assert cuda_catalog.update_kernel(Algorithm.ADAM, "f32", "block8", "fast").name.endswith("<0, 0, 1, 1>")
    with pytest.raises(ValueError, match="numerics='exact' is not one of"):
        cuda_catalog.optimizer_program(Algorithm.ADAM, "f32", "exact")
    for elem in cuda_catalog.ELEM_CODES:
        assert cuda_catalog.grad_norm_kernel(elem).name in names


def test_kernels_command_compiles_everything_and_reports(compiled, monkeypatch, capsys):
    from pagedopt.cli import main

    cache, _ = compiled
    monkeypatch.setenv(cuda_compiler.CACHE_ENV, str(cache))
    assert main(["kernels", "--arch", "sm_80,sm_90"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("compiled 450 kernels for sm_80,sm_90")
    assert "76 of 76 programs from the cache" in out


def _broken_native_tree(tmp_path: Path) -> Path:
    root = tmp_path / "native"
    shutil.copytree(REPO / "native", root)
    header = root / "include" / "pagedopt" / "update.h"
    header.write_text(header.read_text().replace("return d;", "return d  // missing semicolon"))
    return root


def test_kernels_command_fails_loudly_with_the_compiler_log(tmp_path, monkeypatch, capsys):
    from pagedopt.cli import main

    monkeypatch.setenv(cuda_compiler.NATIVE_DIR_ENV, str(_broken_native_tree(tmp_path)))
    monkeypatch.setenv(cuda_compiler.CACHE_ENV, str(tmp_path / "cache"))
    assert main(["kernels", "--arch", "sm_90"]) == 1
    err = capsys.readouterr().err
    assert "NVRTC failed to compile" in err and "update.h" in err and "error" in err


def test_kernels_command_rejects_unknown_arch(capsys):
    from pagedopt.cli import main

    assert main(["kernels", "--arch", "sm_42"]) == 1
    assert "cannot compile for sm_42" in capsys.readouterr().err


# --- the cache ---------------------------------------------------------------------------------


def test_cache_key_covers_headers_arch_and_kernels(tmp_path, monkeypatch):
    root = tmp_path / "native"
    shutil.copytree(REPO / "native", root)
    spec = cuda_catalog.norm_program()
    key = cuda_compiler.cache_key(spec, "sm_90", root)
    assert key == cuda_compiler.cache_key(spec, "sm_90", root)
    assert key != cuda_compiler.cache_key(spec, "sm_80", root)
    fewer = dataclasses.replace(spec, kernels=spec.kernels[:1])
    assert key != cuda_compiler.cache_key(fewer, "sm_90", root)
    for header in ("include/pagedopt/convert.h", "cuda/tiling.cuh"):
        path = root / header
        original = path.read_text()
        path.write_text(original + "\n// changed\n")
        assert cuda_compiler.cache_key(spec, "sm_90", root) != key, header
        path.write_text(original)
    assert cuda_compiler.cache_key(spec, "sm_90", root) == key
    monkeypatch.setattr(cuda_compiler, "BASE_OPTIONS", cuda_compiler.BASE_OPTIONS + ("-DX=1",))
    assert cuda_compiler.cache_key(spec, "sm_90", root) != key


def test_cache_hits_misses_and_stats(tmp_path, monkeypatch):
    monkeypatch.setenv(cuda_compiler.CACHE_ENV, str(tmp_path))
    spec = cuda_catalog.quant_program()
    before = cuda_compiler.kernel_stats()
    first = cuda_compiler.compile_program(spec, "sm_90")
    second = cuda_compiler.compile_program(spec, "sm_90")
    after = cuda_compiler.kernel_stats()
    assert not first.from_cache and second.from_cache
    assert second.cubin == first.cubin and second.symbols == first.symbols
    assert after["cache_misses"] - before["cache_misses"] == 1
    assert after["cache_hits"] - before["cache_hits"] == 1
    assert after["compile_seconds"] > before["compile_seconds"]
    files = sorted(p.name for p in (tmp_path / "sm_90").iterdir() if not p.name.startswith("."))
    assert len(files) == 2 and files[0].endswith(".cubin") and files[1].endswith(".json")
    # a corrupted cubin is detected (checksum) and recompiled
    cubin = next((tmp_path / "sm_90").glob("*.cubin"))
    cubin.write_bytes(b"garbage")
    assert not cuda_compiler.compile_program(spec, "sm_90").from_cache


def test_unwritable_cache_compiles_in_memory_with_a_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(cuda_compiler.CACHE_ENV, str(blocker / "cache"))
    monkeypatch.setattr(cuda_compiler, "_warned_dirs", set())
    with pytest.warns(RuntimeWarning, match="cannot use the kernel cache"):
        program = cuda_compiler.compile_program(cuda_catalog.quant_program(), "sm_90")
    assert not program.from_cache and program.cubin[:4] == b"\x7fELF"


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(cuda_compiler.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cuda_compiler.cache_dir() == tmp_path / "pagedopt" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cuda_compiler.cache_dir() == Path.home() / ".cache" / "pagedopt" / "kernels"


def test_struct_layout_mismatch_fails_compilation(tmp_path, monkeypatch):
    """The prelude's static_asserts catch a Python/C layout drift before anything runs."""
    if not cuda_compiler.nvrtc_has_builtin_offsetof():
        pytest.skip("this NVRTC has no __builtin_offsetof, so only sizeof is checked (see next test)")
    monkeypatch.setenv(cuda_compiler.CACHE_ENV, str(tmp_path))
    swapped = np.dtype([(n, cuda_layout.NORM_DESC.fields[n][0]) for n in ("numel", "data", "flags", "reserved")], align=True)
    monkeypatch.setitem(cuda_layout._C_STRUCTS, "pagedopt::cuda::NormDesc", swapped)
    with pytest.raises(cuda_compiler.KernelCompileError, match="offset of pagedopt::cuda::NormDesc::data"):
        cuda_compiler.compile_program(cuda_catalog.quant_program(), "sm_90")


def test_offset_checks_are_on_wherever_nvrtc_allows():
    """NVRTC 13.0 rejects __builtin_offsetof, so the offset checks are conditional; the NVRTC
    that CI installs (13.5+) must run them, or the mismatch test above proves nothing."""
    supported = cuda_compiler.nvrtc_has_builtin_offsetof()
    options = cuda_compiler.compile_options("sm_90", cuda_compiler.native_dir())
    assert (f"-D{cuda_layout.OFFSET_CHECKS_MACRO}=1" in options) == supported
    if cuda_compiler.nvrtc_version() >= (13, 5):
        assert supported
    assert f"#ifdef {cuda_layout.OFFSET_CHECKS_MACRO}" in cuda_layout.layout_checks()


def test_signature_mismatch_is_reported():
    spec = cuda_catalog.ProgramSpec("t", "x.cu", (cuda_catalog.KernelSpec("k", (ctypes.c_void_p, ctypes.c_int32)),))
    program = cuda_compiler.CompiledProgram(
        spec=spec, arch="sm_90", key="", cubin=b"", symbols={"k": "_Z1k"}, ptx_params={"_Z1k": [8, 8]},
        resources={}, log="", compile_seconds=0.0, from_cache=False,
    )
    with pytest.raises(cuda_compiler.KernelCompileError, match=r"\[8, 8\] bytes.*\[8, 4\]"):
        cuda_compiler.check_signatures(program)


def test_ptx_and_ptxas_parsers():
    ptx = """.visible .entry _Z1kPfxi(
        .param .u64 _Z1kPfxi_param_0,
        .param .u64 _Z1kPfxi_param_1,
        .param .u32 _Z1kPfxi_param_2,
        .param .align 8 .b8 _Z1kPfxi_param_3[168]
    )"""
    assert cuda_compiler.parse_ptx_params(ptx) == {"_Z1kPfxi": [8, 8, 4, 168]}
    log = textwrap.dedent("""\
        ptxas info    : Function properties for _Z1k
        ptxas         .     16 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
        ptxas info    : Used 64 registers, used 1 barriers, 16 bytes cumulative stack size, 10560 bytes smem
        """)
    assert cuda_compiler.parse_ptxas_report(log) == {
        "_Z1k": {"registers": 64, "stack_bytes": 16, "spill_stores": 12, "spill_loads": 16, "smem_bytes": 10560}
    }


def test_arch_names():
    assert cuda_compiler.normalize_arch("90") == "sm_90"
    assert cuda_compiler.normalize_arch("8.0") == "sm_80"
    assert cuda_compiler.normalize_arch("SM_90a") == "sm_90a"
    with pytest.raises(ValueError, match="arch='volta'"):
        cuda_compiler.normalize_arch("volta")
