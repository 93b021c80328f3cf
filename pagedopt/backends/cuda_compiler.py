"""NVRTC compilation of the CUDA kernels into cubins, with an on-disk cache and statistics.

Nothing here needs a GPU or a driver: only cuda-python's NVRTC bindings and the NVRTC
library (pip ``nvidia-cuda-nvrtc``). That is what lets CI and air-gapped clusters compile
every kernel ahead of time (``pagedopt kernels --arch sm_80,sm_90``).

* **Cubins, not PTX.** A newer NVRTC emits PTX an older driver rejects; a cubin of any
  13.x NVRTC loads on any 13.x driver (``shared/notes/cuda-python.md``).
* **Bit-exact math.** ``--fmad=false`` (no multiply-add contraction), IEEE division and
  square root, no flush-to-zero: each operation rounds like the pure-torch reference.
* **Cache.** ``$PAGEDOPT_KERNEL_CACHE`` (default ``~/.cache/pagedopt/kernels``), one cubin
  plus a JSON sidecar (symbols, PTX parameter sizes, ptxas resource usage, compile log) per
  program and architecture, keyed by the SHA-256 of the pagedopt version, the sources (kernel
  file, every header under ``native/include`` and ``native/cuda``, the generated prelude), the
  architecture, the NVRTC version, the options and the requested kernels. Writes are atomic
  (:mod:`pagedopt.fileio`); a file lock keeps several ranks on one node from compiling the
  same program at once; the cache is pruned to ``$PAGEDOPT_KERNEL_CACHE_MAX`` (1 GiB) least
  recently used first (:mod:`pagedopt.backends.kernel_cache`).
* **Statistics.** :data:`STATS` counts compiles, compile seconds, cache hits and misses (the
  telemetry exporter reads :func:`kernel_stats`).

Example:
    >>> from pagedopt.backends.cuda_compiler import compile_program, kernel_stats  # doctest: +SKIP
    >>> from pagedopt.backends.cuda_catalog import norm_program  # doctest: +SKIP
    >>> prog = compile_program(norm_program(), "sm_90")  # doctest: +SKIP
    >>> sorted(prog.symbols)[0], kernel_stats()["cache_misses"]  # doctest: +SKIP
    ('pagedopt::cuda::finalize_sums', 1)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

from .._version import __version__
from ..fileio import atomic_write_bytes
from . import cuda_layout, kernel_cache
from .cuda_catalog import ProgramSpec
from .kernel_cache import CACHE_ENV, cache_dir

NATIVE_DIR_ENV = "PAGEDOPT_NATIVE_DIR"
CACHE_FORMAT = "pagedopt-cubin-v1"
INSTALL_HINT = "pip install pagedopt[cuda]"

# Options that fix the numerics (see the module docstring) and make ptxas report resources.
NUMERIC_OPTIONS = ("--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false")
BASE_OPTIONS = ("-std=c++17",) + NUMERIC_OPTIONS + ("-Xptxas=-v",)


class KernelCompileError(RuntimeError):
    """NVRTC rejected a program; the message carries the full compiler log."""


class NvrtcUnavailableError(RuntimeError):
    """cuda-python's NVRTC bindings or the NVRTC library cannot be loaded."""


# --- statistics ----------------------------------------------------------------------------------


@dataclass
class KernelStats:
    """Process-wide counters of kernel compilation and loading (read by telemetry).

    ``compile_seconds`` is NVRTC time of cache misses; ``load_seconds`` the time spent
    loading cubins into a CUDA context.

    Example:
        >>> stats = KernelStats()
        >>> stats.add(cache_hits=2, compile_seconds=0.5)
        >>> stats.snapshot()["cache_hits"], stats.snapshot()["compile_seconds"]
        (2, 0.5)
    """

    programs_compiled: int = 0
    compile_seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    modules_loaded: int = 0
    load_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


STATS = KernelStats()


def kernel_stats() -> dict[str, float]:
    """A copy of the compile/cache/load counters, e.g. ``{"cache_hits": 3, ...}``."""
    return STATS.snapshot()


# --- sources and cache location -----------------------------------------------------------------


def native_dir() -> Path:
    """The ``native/`` source tree: ``$PAGEDOPT_NATIVE_DIR``, a copy installed inside the
    package (``pagedopt/_native``), or the repository checkout next to the package."""
    override = os.environ.get(NATIVE_DIR_ENV)
    package = Path(__file__).resolve().parent.parent
    candidates = [Path(override)] if override else [package / "_native", package.parent / "native"]
    for path in candidates:
        if (path / "cuda").is_dir() and (path / "include" / "pagedopt").is_dir():
            return path
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"pagedopt's kernel sources (native/cuda, native/include) were not found in {where}; "
        f"reinstall pagedopt or set {NATIVE_DIR_ENV} to the native/ directory"
    )


def _header_files(root: Path) -> list[Path]:
    files = sorted((root / "include").rglob("*.h")) + sorted((root / "cuda").glob("*.cuh"))
    return [f for f in files if f.is_file()]


def program_source(spec: ProgramSpec, root: Path | None = None) -> str:
    """The exact text NVRTC compiles: prelude, the ``.cu`` file, layout checks."""
    root = root or native_dir()
    path = root / "cuda" / spec.source
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} (program {spec.slug!r}) does not exist")
    body = path.read_text()
    return f"{cuda_layout.prelude()}#line 1 \"{spec.source}\"\n{body}\n{cuda_layout.layout_checks()}"


# --- NVRTC ---------------------------------------------------------------------------------------


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise NvrtcUnavailableError(
            f"cuda-python is not installed ({exc}); install it with `{INSTALL_HINT}`"
        ) from exc
    return nvrtc


@functools.lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library cuda-python loads."""
    nvrtc = _nvrtc()
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except RuntimeError as exc:  # the library itself is missing (cuda-pathfinder raises)
        raise NvrtcUnavailableError(
            f"the NVRTC library could not be loaded ({exc}); install it with `{INSTALL_HINT}` "
            "(it brings nvidia-cuda-nvrtc)"
        ) from exc
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise NvrtcUnavailableError(f"nvrtcVersion failed: {err}")
    return int(major), int(minor)


@functools.lru_cache(maxsize=1)
def supported_archs() -> tuple[int, ...]:
    nvrtc = _nvrtc()
    err, archs = nvrtc.nvrtcGetSupportedArchs()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise NvrtcUnavailableError(f"nvrtcGetSupportedArchs failed: {err}")
    return tuple(int(a) for a in archs)


_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(\d)\.?(\d+)([af]?)$")


def normalize_arch(arch: str) -> str:
    """``"sm_90"``, ``"90"``, ``"9.0"`` -> ``"sm_90"`` (``sm_90a`` keeps its suffix)."""
    text = str(arch).strip().lower()
    match = _ARCH_RE.match(text)
    if not match:
        raise ValueError(f"arch={arch!r} is not a GPU architecture like 'sm_80' or 'sm_90'")
    major, minor, suffix = match.groups()
    return f"sm_{major}{minor}{suffix}"


def check_arch(arch: str) -> str:
    arch = normalize_arch(arch)
    number = int(re.sub(r"\D", "", arch))
    archs = supported_archs()
    if number not in archs:
        major, minor = nvrtc_version()
        raise ValueError(
            f"NVRTC {major}.{minor} cannot compile for {arch} (it supports sm_"
            + ", sm_".join(str(a) for a in archs)
            + "); install an nvidia-cuda-nvrtc that matches the GPU"
        )
    return arch


def compile_options(arch: str, root: Path) -> list[str]:
    options = [f"-arch={arch}", *BASE_OPTIONS, f"-I{root / 'include'}", f"-I{root / 'cuda'}"]
    if nvrtc_has_builtin_offsetof():
        options.append(f"-D{cuda_layout.OFFSET_CHECKS_MACRO}=1")
    return options


@functools.lru_cache(maxsize=1)
def nvrtc_has_builtin_offsetof() -> bool:
    """Whether this NVRTC accepts ``__builtin_offsetof`` in a constant expression.

    The struct-layout checks (``cuda_layout.layout_checks``) compare member offsets with the
    Python-side layouts through it. NVRTC 13.5 accepts it; NVRTC 13.0 (seen on an H200 with
    the CUDA 13.0 toolkit) rejects it, and has no ``<cstddef>`` to get ``offsetof`` from. The
    offsets follow the C++ standard-layout rules, not the compiler version, so checking them
    wherever NVRTC allows (CI does) is enough; ``sizeof`` is checked everywhere.
    """
    nvrtc = _nvrtc()
    nvrtc_version()  # a missing library raises NvrtcUnavailableError here, not below
    source = b'struct PoProbe { int a; float b; };\nstatic_assert(__builtin_offsetof(PoProbe, b) == 4, "probe");\n'
    (prog,) = _check(nvrtc, nvrtc.nvrtcCreateProgram(source, b"offsetof_probe.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        options = [b"-std=c++17"]
        return nvrtc.nvrtcCompileProgram(prog, len(options), options)[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def cache_key(spec: ProgramSpec, arch: str, root: Path | None = None) -> str:
    """SHA-256 over everything that determines the cubin (paths excluded, contents included)."""
    root = root or native_dir()
    h = hashlib.sha256()

    def feed(label: str, data: str | bytes) -> None:
        raw = data.encode() if isinstance(data, str) else data
        h.update(f"{label}:{len(raw)}:".encode())
        h.update(raw)

    feed("format", CACHE_FORMAT)
    feed("pagedopt", __version__)
    feed("source", program_source(spec, root))
    for header in _header_files(root):
        feed(f"header {header.relative_to(root).as_posix()}", header.read_bytes())
    feed("arch", arch)
    feed("nvrtc", "%d.%d" % nvrtc_version())
    feed("options", " ".join(BASE_OPTIONS))
    feed("kernels", "\n".join(k.name for k in spec.kernels))
    return h.hexdigest()


@dataclass
class CompiledProgram:
    """A compiled program: the cubin and what the launcher and the checks need about it."""

    spec: ProgramSpec
    arch: str
    key: str
    cubin: bytes
    symbols: dict[str, str]  # name expression -> lowered (mangled) name
    ptx_params: dict[str, list[int]]  # lowered name -> parameter sizes in bytes
    resources: dict[str, dict[str, int]]  # lowered name -> ptxas report
    log: str
    compile_seconds: float
    from_cache: bool

    def warnings(self) -> list[str]:
        """Log lines that are not ptxas resource reports (a clean compile has none)."""
        return [line for line in self.log.splitlines() if line.strip() and not _is_ptxas_info(line)]


def _is_ptxas_info(line: str) -> bool:
    return line.startswith("ptxas info") or line.startswith("ptxas         .")


_ENTRY_RE = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)", re.S)
_PARAM_RE = re.compile(r"\.param\s+(?:\.align\s+\d+\s+)?\.([a-z]+)(\d+)\s+\w+(?:\[(\d+)\])?")


def parse_ptx_params(ptx: str) -> dict[str, list[int]]:
    """Parameter sizes (bytes) of every ``.entry`` in a PTX text."""
    out: dict[str, list[int]] = {}
    for name, params in _ENTRY_RE.findall(ptx):
        sizes = []
        for _kind, bits, count in _PARAM_RE.findall(params):
            sizes.append(int(count) if count else int(bits) // 8)
        out[name] = sizes
    return out


_FUNC_RE = re.compile(r"Function properties for (\S+)")
_STACK_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")
_SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas_report(log: str) -> dict[str, dict[str, int]]:
    """Per function: registers, stack frame, spill stores/loads, static shared memory."""
    out: dict[str, dict[str, int]] = {}
    current: str | None = None
    for line in log.splitlines():
        if m := _FUNC_RE.search(line):
            current = m.group(1)
            out[current] = {"registers": 0, "stack_bytes": 0, "spill_stores": 0, "spill_loads": 0, "smem_bytes": 0}
        elif current and (m := _STACK_RE.search(line)):
            out[current].update(stack_bytes=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current and (m := _REGS_RE.search(line)):
            out[current]["registers"] = int(m[1])
            if s := _SMEM_RE.search(line):
                out[current]["smem_bytes"] = int(s[1])
    return out


def _check(nvrtc, result, what: str) -> tuple:
    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, text = nvrtc.nvrtcGetErrorString(err)
        raise KernelCompileError(f"{what} failed: {text.decode() if isinstance(text, bytes) else text}")
    return result[1:]


def _get_bytes(nvrtc, prog, size_fn, get_fn, what: str) -> bytes:
    (size,) = _check(nvrtc, size_fn(prog), what)
    buf = b" " * size
    _check(nvrtc, get_fn(prog, buf), what)
    return buf


def _nvrtc_compile(spec: ProgramSpec, arch: str, root: Path) -> tuple[bytes, str, str, dict[str, str], float]:
    nvrtc = _nvrtc()
    source = program_source(spec, root).encode()
    options = [o.encode() for o in compile_options(arch, root)]
    started = time.perf_counter()
    (prog,) = _check(nvrtc, nvrtc.nvrtcCreateProgram(source, spec.source.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        for k in spec.kernels:
            _check(nvrtc, nvrtc.nvrtcAddNameExpression(prog, k.name.encode()), f"nvrtcAddNameExpression({k.name})")
        result = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        log = _get_bytes(nvrtc, prog, nvrtc.nvrtcGetProgramLogSize, nvrtc.nvrtcGetProgramLog, "nvrtcGetProgramLog")
        log_text = log.rstrip(b"\x00 ").decode(errors="replace")
        if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(
                f"NVRTC failed to compile {spec.source} (program {spec.slug!r}) for {arch} "
                f"with options {' '.join(o.decode() for o in options)}:\n{log_text}"
            )
        cubin = _get_bytes(nvrtc, prog, nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN, "nvrtcGetCUBIN")
        ptx = _get_bytes(nvrtc, prog, nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX, "nvrtcGetPTX")
        symbols = {}
        for k in spec.kernels:
            (lowered,) = _check(nvrtc, nvrtc.nvrtcGetLoweredName(prog, k.name.encode()), f"nvrtcGetLoweredName({k.name})")
            symbols[k.name] = lowered.decode() if isinstance(lowered, bytes) else str(lowered)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    seconds = time.perf_counter() - started
    return cubin, ptx.rstrip(b"\x00").decode(errors="replace"), log_text, symbols, seconds


# --- the cache -----------------------------------------------------------------------------------


def _paths(spec: ProgramSpec, arch: str, key: str) -> tuple[Path, Path]:
    stem = cache_dir() / arch / f"{spec.slug}-{key[:32]}"
    return stem.with_suffix(".cubin"), stem.with_suffix(".json")


def _read_cached(spec: ProgramSpec, arch: str, key: str) -> CompiledProgram | None:
    cubin_path, meta_path = _paths(spec, arch, key)
    try:
        meta = json.loads(meta_path.read_text())
        cubin = cubin_path.read_bytes()
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or hashlib.sha256(cubin).hexdigest() != meta.get("cubin_sha256"):
        return None
    kernel_cache.mark_used(meta_path)
    return CompiledProgram(
        spec=spec, arch=arch, key=key, cubin=cubin, symbols=meta["symbols"], ptx_params=meta["ptx_params"],
        resources=meta["resources"], log=meta["log"], compile_seconds=meta["compile_seconds"], from_cache=True,
    )


def _write_cached(program: CompiledProgram) -> None:
    cubin_path, meta_path = _paths(program.spec, program.arch, program.key)
    meta = {
        "key": program.key,
        "pagedopt": __version__,
        "program": program.spec.slug,
        "arch": program.arch,
        "nvrtc": "%d.%d" % nvrtc_version(),
        "options": list(BASE_OPTIONS),
        "symbols": program.symbols,
        "ptx_params": program.ptx_params,
        "resources": program.resources,
        "log": program.log,
        "compile_seconds": program.compile_seconds,
        "cubin_sha256": hashlib.sha256(program.cubin).hexdigest(),
    }
    # The cubin first: a reader that finds the sidecar also finds the complete cubin it names.
    atomic_write_bytes(cubin_path, program.cubin)
    atomic_write_bytes(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())


def check_signatures(program: CompiledProgram) -> None:
    """Raise if a kernel's declared ctypes parameters differ from its PTX signature."""
    for kernel in program.spec.kernels:
        lowered = program.symbols[kernel.name]
        declared = [ctypes.sizeof(t) for t in kernel.params]
        actual = program.ptx_params.get(lowered)
        if actual != declared:
            raise KernelCompileError(
                f"kernel {kernel.name} ({program.spec.slug}) takes parameters of {actual} bytes, "
                f"the launcher packs {declared}: fix pagedopt/backends/cuda_catalog.py"
            )


def compile_program(spec: ProgramSpec, arch: str, *, use_cache: bool = True) -> CompiledProgram:
    """The compiled program for ``arch`` (``"sm_90"``), from the disk cache when possible."""
    arch = check_arch(arch)
    root = native_dir()
    key = cache_key(spec, arch, root)
    if use_cache:
        cached = _read_cached(spec, arch, key)
        if cached is not None:
            STATS.add(cache_hits=1)
            return cached
    directory = cache_dir() / arch
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _warn_uncached(directory, exc)
        return _compile_uncached(spec, arch, root, key)
    lock = directory / f".{spec.slug}.lock"
    with kernel_cache.file_lock(lock):
        if use_cache and (cached := _read_cached(spec, arch, key)) is not None:  # another rank won
            STATS.add(cache_hits=1)
            return cached
        cubin, ptx, log, symbols, seconds = _nvrtc_compile(spec, arch, root)
        program = CompiledProgram(
            spec=spec, arch=arch, key=key, cubin=cubin, symbols=symbols, ptx_params=parse_ptx_params(ptx),
            resources=parse_ptxas_report(log), log=log, compile_seconds=seconds, from_cache=False,
        )
        check_signatures(program)
        try:
            _write_cached(program)
        except OSError as exc:
            _warn_uncached(directory, exc)
        else:
            kernel_cache.prune(keep=(_paths(spec, arch, key)[1],))
    STATS.add(cache_misses=1, programs_compiled=1, compile_seconds=seconds)
    return program


def _compile_uncached(spec: ProgramSpec, arch: str, root: Path, key: str) -> CompiledProgram:
    cubin, ptx, log, symbols, seconds = _nvrtc_compile(spec, arch, root)
    program = CompiledProgram(
        spec=spec, arch=arch, key=key, cubin=cubin, symbols=symbols, ptx_params=parse_ptx_params(ptx),
        resources=parse_ptxas_report(log), log=log, compile_seconds=seconds, from_cache=False,
    )
    check_signatures(program)
    STATS.add(cache_misses=1, programs_compiled=1, compile_seconds=seconds)
    return program


_warned_dirs: set[Path] = set()


def _warn_uncached(directory: Path, exc: OSError) -> None:
    """A read-only or full cache location costs compile time, never correctness."""
    if directory not in _warned_dirs:
        _warned_dirs.add(directory)
        warnings.warn(
            f"pagedopt: cannot use the kernel cache {directory} ({exc}); kernels are compiled in memory "
            f"every run. Set {CACHE_ENV} to a writable directory.",
            RuntimeWarning,
            stacklevel=3,
        )


def compile_all(
    archs: list[str], programs: list[ProgramSpec] | None = None, *, workers: int | None = None, use_cache: bool = True
) -> list[CompiledProgram]:
    """Compile ``programs`` (default: every program) for every arch, in parallel threads
    (NVRTC releases the GIL). Raises the first :class:`KernelCompileError`."""
    from concurrent.futures import ThreadPoolExecutor

    from .cuda_catalog import all_programs

    archs = [check_arch(a) for a in archs]
    programs = list(programs) if programs is not None else all_programs()
    jobs = [(spec, arch) for arch in archs for spec in programs]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pagedopt-nvrtc") as pool:
        futures = [pool.submit(compile_program, spec, arch, use_cache=use_cache) for spec, arch in jobs]
        return [f.result() for f in futures]
