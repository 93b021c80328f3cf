"""``pagedopt env`` and ``pagedopt --version``: the report's keys, its behaviour without a
driver or cuda-python, and the single-sourced version."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pagedopt
from pagedopt.backends import cpu as cpu_backend
from pagedopt.backends import cuda_compiler, cuda_driver
from pagedopt.cli import main
from pagedopt.commands import env

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cuda_compiler.CACHE_ENV, str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def _json_report(capsys) -> dict:
    assert main(["env", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_report_has_the_documented_keys(cache, capsys):
    info = _json_report(capsys)
    assert info["version"] == pagedopt.__version__
    assert info["torch"] == torch.__version__
    assert info["python"].count(".") == 2
    for key in ("isa", "native_library", "available", "reason", "threads", "backend"):
        assert key in info["cpu"], key
    for key in ("available", "kernel_sources", "nvrtc", "driver", "gpus"):
        assert key in info["cuda"], key
    assert info["kernel_cache"]["path"] == str(cache)
    assert info["kernel_cache"]["bytes"] == 0 and info["kernel_cache"]["cached"] == []
    assert "host" in info["paging"]["usable"] and "simulated" in info["paging"]["usable"]
    assert info["packages"]["cuda-python"] is None or info["packages"]["cuda-python"].startswith("13")


def test_cpu_section_matches_the_loaded_library(cache, capsys):
    info = _json_report(capsys)["cpu"]
    lib = cpu_backend.library()
    if lib is None:
        assert info["isa"] is None and info["native_library"] is None and info["available"] is False
        assert info["reason"]
    else:
        assert info["native_library"] == str(lib.path) and info["available"] is True
        assert info["isa"] in ("avx512", "avx2", "baseline")
        # which binary: its hash (the build is byte-reproducible, BENCHMARKS.md) and build flags
        import hashlib

        assert info["native_library_sha256"] == hashlib.sha256(lib.path.read_bytes()).hexdigest()
        assert info["native_build"] == lib.build_info and "levels=" in info["native_build"]
        if "avx512f" in lib.required_cpu_flags:
            assert info["isa"] == "avx512"


def test_cuda_section_agrees_with_torch_and_finds_the_sources(cache, capsys):
    info = _json_report(capsys)["cuda"]
    assert info["kernel_sources"] == str(cuda_compiler.native_dir())
    if not torch.cuda.is_available():
        assert info["available"] is False and info["gpus"] == []
        assert "torch" in info["reason"]
    else:  # pragma: no cover - GPU machines
        assert len(info["gpus"]) == torch.cuda.device_count()
        assert all(g["arch"].startswith("sm_") for g in info["gpus"])


def test_kernel_cache_section_lists_cached_programs(cache, capsys):
    arch = cache / "sm_90"
    arch.mkdir(parents=True)
    (arch / ("quantization-" + "a" * 32 + ".cubin")).write_bytes(b"\x7fELF" + bytes(96))
    (arch / ("quantization-" + "a" * 32 + ".json")).write_text(json.dumps({"pagedopt": "0.1.0", "nvrtc": "13.0"}))
    info = _json_report(capsys)["kernel_cache"]
    assert info["programs"] == 1 and info["bytes"] == 100 + len(json.dumps({"pagedopt": "0.1.0", "nvrtc": "13.0"}))
    (entry,) = info["cached"]
    assert (entry["arch"], entry["program"], entry["key"], entry["nvrtc"]) == ("sm_90", "quantization", "a" * 32, "13.0")
    assert main(["env"]) == 0
    assert "1 for sm_90" in capsys.readouterr().out


def test_report_survives_missing_cuda_python(cache, monkeypatch, capsys):
    """No cuda-python (and so no NVRTC, no driver bindings): every CUDA field says so."""
    real_import = builtins.__import__

    def no_cuda(name, *args, **kwargs):
        if name == "cuda" or name.startswith("cuda."):
            raise ImportError(f"No module named {name!r} (hidden by the test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cuda)
    cuda_compiler.nvrtc_version.cache_clear()
    cuda_driver.init_driver.cache_clear()
    try:
        info = _json_report(capsys)["cuda"]
    finally:
        cuda_compiler.nvrtc_version.cache_clear()
        cuda_driver.init_driver.cache_clear()
    assert info["available"] is False
    assert info["nvrtc"] is None and "cuda-python is not installed" in info["errors"]["nvrtc"]
    assert info["driver"] is None and "cuda-python is not installed" in info["errors"]["driver"]


def test_a_broken_probe_is_reported_not_raised(cache, monkeypatch, capsys):
    def broken():
        raise OSError("simulated: /proc is not mounted")

    monkeypatch.setattr(env, "_cpu_info", broken)
    info = _json_report(capsys)
    assert info["cpu"]["isa"] is None and "simulated" in info["cpu"]["error"]
    assert main(["env"]) == 0
    assert "simulated" in capsys.readouterr().out


def test_native_info_without_the_library(cache, monkeypatch):
    monkeypatch.setattr(cpu_backend, "library", lambda: None)
    monkeypatch.setattr(cpu_backend, "unavailable_reason", lambda: "x.so does not exist")
    info = cpu_backend.native_info()
    assert info == {"isa": None, "native_library": None, "available": False, "reason": "x.so does not exist",
                    "threads": torch.get_num_threads(), "code_search": None, "prefetch_chunks": None}
    report = env._cpu_info()
    assert report["isa"] is None and report["reason"] == "x.so does not exist"


def test_version_is_single_sourced(capsys):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pagedopt._version.__version__"}
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"pagedopt {pagedopt.__version__}"


def test_env_runs_as_a_module_in_a_fresh_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pagedopt", "env", "--json"], capture_output=True, text=True, timeout=300,
        env={**_child_env(), cuda_compiler.CACHE_ENV: str(tmp_path / "kernels")}, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["kernel_cache"]["path"] == str(tmp_path / "kernels")


def _child_env() -> dict[str, str]:
    import os

    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), path) if p)}
