"""The compiled-kernel cache: size bound with LRU pruning, ``--list``/``--clear``, keys that
change with the pagedopt version, and eight processes compiling one kernel at once.

Pruning and listing need no NVRTC (fake entries with controlled times); the compile tests
use the real NVRTC and skip with a reason without cuda-python.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagedopt.backends import kernel_cache
from pagedopt.cli import main
from pagedopt.fileio import TEMP_PREFIX

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "kernels"
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(root))
    monkeypatch.delenv(kernel_cache.MAX_ENV, raising=False)
    return root


def _fake_entry(root: Path, program: str, arch: str = "sm_90", size: int = 1000, used: float = 0.0) -> Path:
    """A cubin of ``size - 100`` bytes and a 100-byte sidecar, last used at ``used``."""
    key = hashlib.sha256(program.encode()).hexdigest()[:32]
    directory = root / arch
    directory.mkdir(parents=True, exist_ok=True)
    cubin = directory / f"{program}-{key}.cubin"
    sidecar = cubin.with_suffix(".json")
    cubin.write_bytes(b"\x7fELF" + bytes(size - 104))
    sidecar.write_text(json.dumps({"nvrtc": "13.0", "pad": "x" * 71})[:100].ljust(100))
    os.utime(sidecar, (used, used))
    return sidecar


# --- sizes and limits -------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("1073741824", 1 << 30), ("512MiB", 512 << 20), ("2GiB", 2 << 30), ("1.5GB", 1_500_000_000),
    ("0", 0), (" 64 kib ", 64 << 10),
])
def test_parse_size(text, expected):
    assert kernel_cache.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "12 parsecs", "1e9"])
def test_bad_size_names_the_variable(text):
    with pytest.raises(ValueError, match=kernel_cache.MAX_ENV):
        kernel_cache.parse_size(text)


def test_default_limit_is_one_gib_and_the_variable_overrides(cache, monkeypatch):
    assert kernel_cache.max_bytes() == 1 << 30
    monkeypatch.setenv(kernel_cache.MAX_ENV, "512MiB")
    assert kernel_cache.max_bytes() == 512 << 20


# --- pruning ----------------------------------------------------------------------------------


def test_prune_removes_least_recently_used_first(cache):
    now = time.time()
    sidecars = {name: _fake_entry(cache, name, used=now - 100 + i) for i, name in enumerate("abcde")}
    kernel_cache.mark_used(sidecars["a"])  # "a" was oldest; a cache hit makes it the newest
    assert [e.program for e in kernel_cache.entries()] == ["b", "c", "d", "e", "a"]
    removed = kernel_cache.prune(3200)
    assert [e.program for e in removed] == ["b", "c"]
    assert sorted(e.program for e in kernel_cache.entries()) == ["a", "d", "e"]
    assert kernel_cache.total_bytes() == 3000
    assert not sidecars["b"].exists() and not sidecars["b"].with_suffix(".cubin").exists()


def test_prune_keeps_the_entry_just_written_even_over_the_limit(cache):
    now = time.time()
    old = _fake_entry(cache, "old", used=now - 50)
    new = _fake_entry(cache, "new", arch="sm_80", used=now - 100)  # older time, but just written
    removed = kernel_cache.prune(0, keep=(new,))
    assert [e.program for e in removed] == ["old"]
    assert not old.exists() and new.exists()


def test_prune_within_the_limit_removes_nothing(cache):
    for name in "xyz":
        _fake_entry(cache, name)
    assert kernel_cache.prune(3000) == [] and len(kernel_cache.entries()) == 3
    assert kernel_cache.prune(2999) != []


def test_prune_removes_only_stale_temporaries(cache):
    _fake_entry(cache, "a")
    stale = cache / "sm_90" / f"{TEMP_PREFIX}a.cubin.dead"
    fresh = cache / "sm_90" / f"{TEMP_PREFIX}a.cubin.live"
    stale.write_bytes(bytes(10))
    fresh.write_bytes(bytes(10))
    old = time.time() - kernel_cache.STALE_TEMP_SECONDS - 10
    os.utime(stale, (old, old))
    kernel_cache.prune()
    assert not stale.exists() and fresh.exists()  # a live writer's temporary is not touched


def test_incomplete_entries_are_not_listed(cache):
    _fake_entry(cache, "whole")
    (cache / "sm_90" / ("half-" + "0" * 32 + ".json")).write_text("{}")  # cubin missing
    assert [e.program for e in kernel_cache.entries()] == ["whole"]


# --- the command ------------------------------------------------------------------------------


def test_list_and_clear(cache, capsys):
    _fake_entry(cache, "quantization", used=time.time() - 10)
    _fake_entry(cache, "norms", arch="sm_80", used=time.time())
    (cache / "sm_90" / ".quantization.lock").write_bytes(b"")
    assert main(["kernels", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"kernel cache {cache}: 2 programs")
    lines = out.splitlines()
    assert "norms-" in lines[2] and "sm_80" in lines[2]  # most recently used first
    assert "quantization-" in lines[3] and "13.0" in lines[3]
    assert main(["kernels", "--clear"]) == 0
    assert capsys.readouterr().out.startswith(f"removed 2 cached programs (0.0 MiB) from {cache}")
    assert kernel_cache.entries() == [] and kernel_cache.total_bytes() == 0
    assert main(["kernels", "--list"]) == 0
    assert ": 0 programs" in capsys.readouterr().out


def test_list_and_clear_of_a_missing_cache(cache, capsys):
    assert main(["kernels", "--list"]) == 0 and ": 0 programs" in capsys.readouterr().out
    assert main(["kernels", "--clear"]) == 0 and "removed 0 cached programs" in capsys.readouterr().out


def test_list_reports_a_bad_limit(cache, monkeypatch, capsys):
    monkeypatch.setenv(kernel_cache.MAX_ENV, "huge")
    assert main(["kernels", "--list"]) == 0
    assert "invalid" in capsys.readouterr().out


# --- with NVRTC -------------------------------------------------------------------------------


def _nvrtc_or_skip():
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (pip install pagedopt[cuda]) is not installed")
    from pagedopt.backends import cuda_compiler

    try:
        cuda_compiler.nvrtc_version()
    except cuda_compiler.NvrtcUnavailableError as exc:
        pytest.skip(f"NVRTC is unavailable: {exc}")
    return cuda_compiler


def _program(name: str):
    from pagedopt.backends.cuda_catalog import all_programs

    return next(p for p in all_programs() if p.slug == name)


def test_key_changes_with_the_pagedopt_version(cache, monkeypatch):
    cuda_compiler = _nvrtc_or_skip()
    spec = _program("quantization")
    key = cuda_compiler.cache_key(spec, "sm_90")
    monkeypatch.setattr(cuda_compiler, "__version__", "99.0.0")
    assert cuda_compiler.cache_key(spec, "sm_90") != key


def test_compiling_prunes_to_the_limit_and_hits_refresh_use(cache, monkeypatch):
    cuda_compiler = _nvrtc_or_skip()
    spec = _program("quantization")
    first = cuda_compiler.compile_program(spec, "sm_80")
    (entry,) = kernel_cache.entries()
    os.utime(entry.sidecar, (1.0, 1.0))  # pretend it was last used long ago
    assert cuda_compiler.compile_program(spec, "sm_80").from_cache
    assert kernel_cache.entries()[0].last_used > 1.0  # the hit refreshed it
    monkeypatch.setenv(kernel_cache.MAX_ENV, str(entry.bytes + 10))  # room for one entry
    second = cuda_compiler.compile_program(spec, "sm_90")
    assert not second.from_cache
    assert [(e.arch, e.program) for e in kernel_cache.entries()] == [("sm_90", "quantization")]
    assert len(first.cubin) > 0


_RACE = r"""
import hashlib, json, os, sys, time
from pathlib import Path
from pagedopt.backends import cuda_compiler
from pagedopt.backends.cuda_catalog import all_programs
spec = next(p for p in all_programs() if p.slug == "quantization")
cuda_compiler.nvrtc_version(), cuda_compiler.supported_archs()  # load NVRTC before the race
start = Path(sys.argv[1])
(start.parent / f"ready-{os.getpid()}").write_text("")
while not start.exists():
    time.sleep(0.002)
program = cuda_compiler.compile_program(spec, "sm_90")
print(json.dumps({"from_cache": program.from_cache, "sha": hashlib.sha256(program.cubin).hexdigest(),
                  "symbols": sorted(program.symbols.values())}))
"""


def test_eight_processes_compiling_one_kernel_agree(cache, tmp_path):
    """Eight ranks start at once: one compiles, seven load its cubin; nobody reads a torn file."""
    _nvrtc_or_skip()
    start = tmp_path / "go"
    env = {**os.environ, kernel_cache.CACHE_ENV: str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACE, str(start)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    deadline = time.monotonic() + 600
    while len(list(tmp_path.glob("ready-*"))) < len(procs):  # every process has imported pagedopt
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process died early"
        time.sleep(0.05)
    start.write_text("go")  # release them together
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(not r["from_cache"] for r in results) == 1
    assert len({r["sha"] for r in results}) == 1 and len({tuple(r["symbols"]) for r in results}) == 1
    (entry,) = kernel_cache.entries()
    meta = json.loads(entry.sidecar.read_text())
    assert meta["cubin_sha256"] == results[0]["sha"] == hashlib.sha256(entry.cubin.read_bytes()).hexdigest()
    assert not list(cache.rglob(f"{TEMP_PREFIX}*"))  # every temporary was renamed into place
