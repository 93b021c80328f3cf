"""``pagedopt env``: what this installation can do here, for bug reports and first checks.

Prints the versions (pagedopt, Python, torch, cuda-python, NVRTC, the CUDA driver), the CPU
kernels in use (instruction-set level and library path, or why the pure-torch path runs), the
GPUs with their architecture and managed-memory support, whether the CUDA kernel sources
are present, the kernel cache (path, size, cached programs) and the paging backends usable
here. ``--json`` prints the same as one JSON object with the nested objects ``cpu``, ``cuda``,
``kernel_cache`` and ``paging``. It never fails because a driver, a GPU or cuda-python is
missing: each probe that cannot run reports ``None`` and, under ``error``, why.

Example:
    >>> from pagedopt.commands.env import collect
    >>> info = collect()
    >>> sorted(k for k in ("version", "torch", "cpu", "cuda", "kernel_cache") if k in info)
    ['cpu', 'cuda', 'kernel_cache', 'torch', 'version']
    >>> isinstance(info["cuda"]["available"], bool) and isinstance(info["kernel_cache"]["bytes"], int)
    True
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import platform
import sys
from typing import Any, Callable

DISTRIBUTIONS = ("cuda-python", "cuda-bindings", "cuda-core", "nvidia-cuda-nvrtc", "bitsandbytes")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "env",
        help="print versions, CPU/GPU kernels, kernel cache and paging backends (for bug reports)",
        description="Report what pagedopt can use on this machine: versions, the native CPU library, "
        "GPUs, CUDA kernel sources, the kernel cache and the paging backends. Paste it into bug reports.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=False, default=str))
    else:
        print(format_text(info))
    return 0


def _guarded(probe: Callable[[], dict[str, Any]], fallback: dict[str, Any]) -> dict[str, Any]:
    """Run one probe; an unexpected failure becomes ``error`` in its section, never a crash.

    The report is what users run when something is broken, so a broken piece (a half-installed
    cuda-python, an odd driver) must show up in the output instead of stopping it.
    """
    try:
        return probe()
    except Exception as exc:  # noqa: BLE001 - see the docstring: report, do not crash
        return {**fallback, "error": f"{type(exc).__name__}: {exc}"}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    """The report as a JSON-ready dict (see the module docstring for the sections)."""
    import torch

    from .._version import __version__

    cpu = _guarded(_cpu_info, {"isa": None, "native_library": None, "available": False})
    cuda = _guarded(_cuda_info, {"available": False, "kernel_sources": None, "gpus": []})
    return {
        "version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in DISTRIBUTIONS},
        "cpu": cpu,
        "cuda": cuda,
        "kernel_cache": _guarded(_kernel_cache_info, {"path": None, "bytes": 0, "programs": 0, "cached": []}),
        "paging": _guarded(lambda: _paging_info(cuda), {"usable": ["host", "simulated"]}),
    }


# --- CPU --------------------------------------------------------------------------------------


def _cpu_info() -> dict[str, Any]:
    import torch

    from ..backends import cpu
    from ..functional import dispatch

    info = dict(cpu.native_info())
    info.setdefault("threads", torch.get_num_threads())
    info["backend"] = dispatch.backend_for(torch.device("cpu")).name
    if info.get("native_library"):
        # Which binary runs, for bug reports and for checking that one build (a wheel, CI's)
        # is the same file on another machine: the build is byte-reproducible (BENCHMARKS.md).
        info["native_library_sha256"] = _sha256(info["native_library"])
        lib = cpu.library()
        info["native_build"] = lib.build_info if lib is not None else None
    return info


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- CUDA -------------------------------------------------------------------------------------


def _cuda_info() -> dict[str, Any]:
    import torch

    from ..backends import cuda as cuda_backend
    from ..backends import cuda_compiler

    info: dict[str, Any] = {"available": False, "reason": None, "torch_cuda": torch.version.cuda}
    errors: dict[str, str] = {}
    try:
        info["kernel_sources"] = str(cuda_compiler.native_dir())
    except FileNotFoundError as exc:
        info["kernel_sources"] = None
        errors["kernel_sources"] = str(exc)
    try:
        info["nvrtc"] = "%d.%d" % cuda_compiler.nvrtc_version()
    except cuda_compiler.NvrtcUnavailableError as exc:
        info["nvrtc"] = None
        errors["nvrtc"] = str(exc)
    info["driver"], info["gpus"] = _driver_and_gpus(errors)
    missing = cuda_backend._missing_piece()
    info["available"] = missing is None
    info["reason"] = missing
    if errors:
        info["errors"] = errors
    return info


def _driver_and_gpus(errors: dict[str, str]) -> tuple[str | None, list[dict[str, Any]]]:
    """The driver's CUDA version and one row per GPU (torch's view plus driver attributes)."""
    import torch

    from ..backends import cuda_driver

    driver_version = None
    driver = None
    try:
        version = cuda_driver.init_driver()
        driver_version = f"{version // 1000}.{version % 1000 // 10}"
        driver = cuda_driver._driver()
    except (cuda_driver.DriverUnavailableError, cuda_driver.DriverError) as exc:
        errors["driver"] = str(exc)
    gpus = []
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        gpu: dict[str, Any] = {
            "index": index, "name": props.name, "arch": f"sm_{props.major}{props.minor}",
            "memory_bytes": int(props.total_memory), "managed_memory": None, "concurrent_managed_access": None,
        }
        if driver is not None:
            try:
                (device,) = cuda_driver.check(driver.cuDeviceGet(index), "cuDeviceGet")
                attr = driver.CUdevice_attribute
                for key, name in (("managed_memory", "CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY"),
                                  ("concurrent_managed_access", "CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS")):
                    (value,) = cuda_driver.check(driver.cuDeviceGetAttribute(getattr(attr, name), device), name)
                    gpu[key] = bool(value)
            except cuda_driver.DriverError as exc:
                gpu["error"] = str(exc)
        gpus.append(gpu)
    return driver_version, gpus


# --- kernel cache and paging ------------------------------------------------------------------


def _kernel_cache_info() -> dict[str, Any]:
    from ..backends import kernel_cache

    directory = kernel_cache.cache_dir()
    entries = kernel_cache.entries(directory)
    info: dict[str, Any] = {"path": str(directory), "bytes": kernel_cache.total_bytes(directory)}
    try:
        info["max_bytes"] = kernel_cache.max_bytes()
    except ValueError as exc:
        info["max_bytes"] = None
        info["error"] = str(exc)
    info["programs"] = len(entries)
    info["cached"] = [e.describe() for e in reversed(entries)]  # most recently used first
    return info


def _paging_info(cuda: dict[str, Any]) -> dict[str, Any]:
    backends: dict[str, dict[str, Any]] = {
        "host": {"usable": True, "reason": None},
        "simulated": {"usable": True, "reason": None},
    }
    gpus = cuda.get("gpus") or []
    if not gpus:
        backends["managed"] = {"usable": False, "reason": "no CUDA device visible to torch"}
    else:
        from ..paging import managed

        verdicts = [managed.availability(gpu["index"]) for gpu in gpus]
        reasons = [why for ok, why in verdicts if not ok]
        backends["managed"] = {"usable": any(ok for ok, _ in verdicts), "reason": "; ".join(reasons) or None}
    return {"usable": [name for name, b in backends.items() if b["usable"]], "backends": backends}


# --- text -------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def format_text(info: dict[str, Any]) -> str:
    """The report as aligned ``key: value`` lines, one section per concern."""
    lines: list[str] = []

    def row(key: str, value: Any) -> None:
        lines.append(f"  {key:<24} {_fmt(value)}")

    lines.append("pagedopt")
    row("version", info["version"])
    row("python", f"{info['python']} ({info['python_executable']})")
    row("platform", info["platform"])
    row("torch", info["torch"])
    for name, version in info["packages"].items():
        row(name, version if version else "not installed")

    cpu = info["cpu"]
    lines.append("CPU kernels")
    row("backend", cpu.get("backend"))
    row("isa", cpu.get("isa"))
    if cpu.get("code_search"):
        row("code search", f"{cpu['code_search']} (prefetch {cpu.get('prefetch_chunks')} chunks)")
    row("native library", cpu.get("native_library"))
    if cpu.get("native_library_sha256"):
        row("library sha256", cpu["native_library_sha256"])
        row("library build", cpu.get("native_build"))
    row("threads", cpu.get("threads"))
    if not cpu.get("available"):
        row("why not native", cpu.get("reason") or cpu.get("error"))

    cuda = info["cuda"]
    lines.append("CUDA")
    row("kernels usable", cuda.get("available"))
    if cuda.get("reason"):
        row("why not", cuda["reason"])
    row("torch built for CUDA", cuda.get("torch_cuda"))
    row("driver (CUDA version)", cuda.get("driver"))
    row("NVRTC", cuda.get("nvrtc"))
    row("kernel sources", cuda.get("kernel_sources"))
    for name, text in (cuda.get("errors") or {}).items():
        row(f"{name} error", text)
    if cuda.get("error"):
        row("error", cuda["error"])
    for gpu in cuda.get("gpus") or []:
        row(f"GPU {gpu['index']}", f"{gpu['name']} {gpu['arch']}, {gpu['memory_bytes'] / 2**30:.1f} GiB, managed memory "
            f"{_fmt(gpu['managed_memory'])}, concurrent managed access {_fmt(gpu['concurrent_managed_access'])}")
    if not cuda.get("gpus"):
        row("GPUs", "none visible")

    cache = info["kernel_cache"]
    lines.append("kernel cache")
    row("path", cache.get("path"))
    limit = cache.get("max_bytes")
    row("size", f"{cache.get('bytes', 0) / 2**20:.1f} MiB of {limit / 2**20:.0f} MiB" if limit else cache.get("bytes"))
    by_arch: dict[str, int] = {}
    for entry in cache.get("cached") or []:
        by_arch[entry["arch"]] = by_arch.get(entry["arch"], 0) + 1
    row("cached programs", ", ".join(f"{n} for {arch}" for arch, n in sorted(by_arch.items())) or "none")
    if cache.get("error"):
        row("error", cache["error"])

    paging = info["paging"]
    lines.append("paging backends")
    for name, backend in (paging.get("backends") or {}).items():
        row(name, "usable" if backend["usable"] else f"not usable: {backend['reason']}")
    if paging.get("error"):
        row("error", paging["error"])
    return "\n".join(lines)
