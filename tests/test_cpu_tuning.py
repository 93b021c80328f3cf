"""The per-CPU code search choice (pagedopt/backends/cpu_tuning.py) and its override.

The choice changes speed only: every code search gives the same codes (exact tier; the searches
themselves are checked over all floats in tests/test_native_cpu_isa.py), so a fresh process
forced to each search must end a step with the same parameters.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pagedopt.backends import cpu, cpu_tuning
from native_cpu_helpers import fresh_python

LIB = cpu.library()
needs_avx512 = pytest.mark.skipif(LIB is None or "avx512" not in LIB.supported_isas(),
                                  reason="needs the native library at the avx512 level")


@pytest.mark.parametrize("vendor,status,expected", [
    ("GenuineIntel", "Not affected", "table"),
    ("GenuineIntel", "Vulnerable", "table"),  # mitigation off: gathers at full speed
    ("GenuineIntel", "Vulnerable: No microcode", "table"),
    ("GenuineIntel", "Mitigation: Microcode", "lattice"),
    ("GenuineIntel", "Mitigation: AVX disabled, no microcode", "lattice"),
    ("GenuineIntel", None, "lattice"),  # unknown: assume the mitigation
    ("AuthenticAMD", "Not affected", "lattice"),  # Zen 4 gathers are slow without it
    (None, "Not affected", "lattice"),
])
def test_gather_table_only_where_gathers_are_fast(vendor, status, expected):
    assert cpu_tuning.preferred_code_search(vendor, status, native_default="lattice") == expected
    assert cpu_tuning.gathers_are_fast(vendor, status) == (expected == "table")


def test_gather_sampling_status_reads_the_kernel_file(tmp_path):
    f = tmp_path / "gather_data_sampling"
    f.write_text("Mitigation: Microcode\n")
    assert cpu_tuning.gather_sampling_status(f) == "Mitigation: Microcode"
    assert cpu_tuning.gather_sampling_status(tmp_path / "missing") is None


def test_this_machine_reports_a_vendor():
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    vendor = cpu_tuning.cpu_vendor()
    assert vendor is None or (isinstance(vendor, str) and vendor)


def test_unknown_code_search_name_is_refused_by_name():
    with pytest.raises(cpu_tuning.CpuTuningError, match=r"PAGEDOPT_CPU_CODE_SEARCH='bisect': unknown code search; "
                                                        r"expected one of table, arithmetic, lattice, lattice_table"):
        cpu_tuning.code_search_id("bisect")
    assert [cpu_tuning.code_search_id(n) for n in ("table", "arithmetic", "lattice", "lattice_table")] == [0, 1, 2, 3]


@needs_avx512
def test_select_code_search_refuses_what_the_cpu_cannot_run():
    if "avx512vbmi" in (cpu._cpu_flags() or set()):
        pytest.skip("this CPU has VBMI (every search runs)")
    before = LIB.code_search
    with pytest.raises(cpu_tuning.CpuTuningError, match=r"my_arg=lattice: .*avx512vbmi"):
        LIB.select_code_search("lattice", source="my_arg")
    assert LIB.code_search == before


def _fresh_process(search: str | None) -> subprocess.CompletedProcess:
    code = ("import json, torch, pagedopt\n"
            "from pagedopt.backends import cpu, cpu_tuning\n"
            "info = cpu.native_info()\n"
            "info['preferred'] = cpu_tuning.preferred_code_search(cpu_tuning.cpu_vendor(),\n"
            "    cpu_tuning.gather_sampling_status(), 'lattice' if 'avx512vbmi' in cpu._cpu_flags() else 'lattice_table')\n"
            "print(json.dumps(info))\n"
            "torch.manual_seed(0)\n"
            "p = torch.nn.Parameter(torch.randn(20000)); p.grad = torch.randn(20000)\n"
            "opt = pagedopt.AdamW8bit([p])\n"
            "for _ in range(3): opt.step()\n"
            "print(json.dumps(p.detach()[::97].tolist()))\n")
    return fresh_python(code, cpu_tuning.CODE_SEARCH_ENV, search)


@needs_avx512
def test_default_is_the_choice_for_this_cpu_and_every_override_gives_the_same_bits():
    """Without the variable a fresh process runs the search cpu_tuning prefers for this CPU;
    with it, the named search (native_info reports it); all end three AdamW8bit steps with the
    same parameters (exact tier)."""
    run = _fresh_process(None)
    assert run.returncode == 0, run.stderr
    info_line, default_params = run.stdout.strip().splitlines()[-2:]
    info = json.loads(info_line)
    assert info["code_search"] == info["preferred"]
    searches = ["table", "lattice_table"] + (["arithmetic", "lattice"] if "avx512vbmi" in cpu._cpu_flags() else [])
    for search in searches:
        run = _fresh_process(search)
        assert run.returncode == 0, (search, run.stderr)
        info_line, params = run.stdout.strip().splitlines()[-2:]
        assert json.loads(info_line)["code_search"] == search
        assert params == default_params, search


@needs_avx512
def test_override_errors_name_the_variable():
    run = _fresh_process("fastest")
    assert run.returncode != 0
    assert "CpuTuningError" in run.stderr
    assert "PAGEDOPT_CPU_CODE_SEARCH='fastest': unknown code search" in run.stderr
