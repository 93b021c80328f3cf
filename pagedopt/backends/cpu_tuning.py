"""Per-CPU choices of the native CPU kernels that change speed, never results: the code search.

The avx512 level quantizes 8-bit state with one of four code searches (``native/cpu/tables.h``
``CodeSearch``; all four give the same codes bit for bit, ``tests/test_native_cpu_isa.py``):

* ``table`` - one AVX-512 gather per 16 values from a bucket table;
* ``arithmetic`` and ``lattice`` - gather-free searches built on VBMI byte permutes;
* ``lattice_table`` - the lattice with the bucket table for the rare unsure group, for
  AVX-512 CPUs without VBMI.

Which is fastest depends on how fast the CPU gathers. The native library's own default is
gather-free (``lattice`` with VBMI, ``lattice_table`` without); on AMD Zen 4 the lattice is
0.78x the table's time. On Intel CPUs whose gathers run at full speed the table wins: on a
Sapphire-Rapids-class Xeon (KVM, 2 vCPUs, AdamW8bit, 32M parameters) the table took 0.92x
the lattice's time at 2 threads and 0.90x at 1 thread (BENCHMARKS.md, issue 15). Intel CPUs
that run the microcode mitigation for "Downfall" (Gather Data Sampling, CVE-2022-40982:
Skylake-SP through Ice Lake and Tiger Lake) gather several times slower, so they keep the
gather-free default. The kernel reports the mitigation in
``/sys/devices/system/cpu/vulnerabilities/gather_data_sampling``; where that file is missing
or unreadable the mitigation is assumed (the safe side: the lattice is at most ~10% slower
where gathers are fast, the table several times slower where they are not).

``PAGEDOPT_CPU_CODE_SEARCH=table|arithmetic|lattice|lattice_table`` overrides the choice (an
unknown name, or one this CPU or the maps cannot run, is an error naming the variable).

Example:
    >>> from pagedopt.backends.cpu_tuning import preferred_code_search
    >>> preferred_code_search("GenuineIntel", "Not affected", native_default="lattice")
    'table'
    >>> preferred_code_search("GenuineIntel", "Mitigation: Microcode", native_default="lattice")
    'lattice'
    >>> preferred_code_search("AuthenticAMD", "Not affected", native_default="lattice")
    'lattice'
"""

from __future__ import annotations

import os
from pathlib import Path

CODE_SEARCHES = {0: "table", 1: "arithmetic", 2: "lattice", 3: "lattice_table"}  # po_code_search() ids
CODE_SEARCH_ENV = "PAGEDOPT_CPU_CODE_SEARCH"
GDS_STATUS_FILE = Path("/sys/devices/system/cpu/vulnerabilities/gather_data_sampling")


class CpuTuningError(ValueError):
    """``PAGEDOPT_CPU_CODE_SEARCH`` names an unknown code search or one this CPU cannot run."""


def cpu_vendor() -> str | None:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...) from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def gather_sampling_status(path: Path = GDS_STATUS_FILE) -> str | None:
    """The kernel's Gather Data Sampling ("Downfall") status line, or None when unknown."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def gathers_are_fast(vendor: str | None, gds_status: str | None) -> bool:
    """Whether AVX-512 gathers run at full speed: an Intel CPU that is not affected by Gather
    Data Sampling, or runs without its mitigation ("Vulnerable")."""
    if vendor != "GenuineIntel" or gds_status is None:
        return False
    return gds_status.startswith("Not affected") or gds_status.startswith("Vulnerable")


def preferred_code_search(vendor: str | None, gds_status: str | None, native_default: str) -> str:
    """The code search to run: the gather ``table`` where gathers are fast, else the library's
    gather-free ``native_default`` (see the module docstring for the measurements)."""
    return "table" if gathers_are_fast(vendor, gds_status) else native_default


def code_search_id(name: str, source: str = CODE_SEARCH_ENV) -> int:
    """The native id of code search ``name`` (a :class:`CpuTuningError` naming ``source`` for
    an unknown name)."""
    for ident, known in CODE_SEARCHES.items():
        if known == name:
            return ident
    raise CpuTuningError(f"{source}={name!r}: unknown code search; expected one of {', '.join(CODE_SEARCHES.values())}")


def requested_code_search() -> str | None:
    """The code search ``PAGEDOPT_CPU_CODE_SEARCH`` asks for (None when it is unset or empty)."""
    value = os.environ.get(CODE_SEARCH_ENV, "").strip().lower()
    return value or None
