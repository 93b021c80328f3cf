"""Build of pagedopt's native CPU library (metadata lives in pyproject.toml).

``pip install .`` and ``pip install -e .`` compile ``native/cpu/*.cpp`` with g++ (C++17,
OpenMP) into ``pagedopt/backends/libpagedopt_cpu.so``, a plain C-ABI library that
``pagedopt/backends/cpu.py`` loads with ctypes (no torch headers, no Python extension API).

One library runs on every x86-64 CPU: the library itself is compiled for generic x86-64
(``-march=x86-64 -mtune=generic``, SSE2), and the kernel sources (``kernels_*.cpp``,
``isa_ops.cpp``) are compiled once more per instruction-set level into the same library:

* ``avx512`` - AVX-512 F/BW/VL/DQ/CD on top of ``avx2`` (VBMI is used at run time where present),
* ``avx2`` - AVX2, FMA, F16C, BMI1/2, POPCNT (x86-64-v3 class; FMA is never contracted),
* ``baseline`` - the generic flags.

At load time the library picks the best level the CPU supports (CPUID);
``PAGEDOPT_CPU_ISA=avx512|avx2|baseline`` selects a lower one (see ``pagedopt/backends/cpu.py``).
Every level computes the same bits. On other architectures (aarch64) only ``baseline`` is
built, with the compiler's default target (NEON where it vectorizes).

For development, rebuild in place after editing ``native/`` (objects whose sources and flags
did not change are reused)::

    python setup.py build_ext --inplace

Environment variables:

* ``PAGEDOPT_CXX`` - the C++ compiler (default ``$CXX`` or ``g++``).
* ``PAGEDOPT_MARCH`` - opt-in override of the generic base target for a source build that
  runs only where it was built (e.g. ``native``); the levels are still compiled on top of it,
  and the loader refuses the library on a CPU that lacks what this target implies.
* ``PAGEDOPT_CPU_LEVELS`` - comma-separated levels to compile (default: all of this
  architecture; ``baseline`` is always built). For quicker development builds.
* ``PAGEDOPT_CXXFLAGS`` - extra compiler flags.
* ``PAGEDOPT_NO_NATIVE=1`` - skip the native build (pagedopt then runs the pure-torch
  reference on CPU and warns once).

Packaging (``python -m build`` makes the sdist and the wheel): ``build_py`` copies
``native/cuda`` and ``native/include`` into ``pagedopt/_native`` of the build tree, so the wheel
carries the CUDA kernel sources and headers NVRTC compiles at run time; ``native/`` stays the
only copy in the repository. Without a working compiler the install still succeeds, without
the CPU library (pagedopt then warns once and uses its pure-torch path); set
``PAGEDOPT_REQUIRE_NATIVE=1`` to make a failed CPU build fail the install (CI, images).

Numerics flags: ``-ffp-contract=off`` (no FMA contraction) and no ``-ffast-math`` keep every
float32 operation rounded exactly like the torch reference, at every level. ``-fno-math-errno``
(sqrt never sets errno) and ``-fno-trapping-math`` (we never read floating-point exception
flags) change no result; they let the compiler vectorize sqrt and the branch-free skip logic.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
NATIVE_EXT = "pagedopt.backends.libpagedopt_cpu"
LIBRARY_FILE = "libpagedopt_cpu.so"
CPU_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "native" / "cpu").glob("*.cpp"))
HEADERS = sorted(
    str(p.relative_to(ROOT)) for d in ("native/include/pagedopt", "native/cpu") for p in (ROOT / d).glob("*.h")
)

# Compiler macros of -march=... -> /proc/cpuinfo flag names, for the loader's ISA check.
_MACRO_FLAGS = {
    "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2", "__POPCNT__": "popcnt", "__AVX__": "avx",
    "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c", "__BMI__": "bmi1", "__BMI2__": "bmi2",
    "__LZCNT__": "abm", "__MOVBE__": "movbe", "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd",
    "__AVX512BW__": "avx512bw", "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl",
    "__AVX512VBMI__": "avx512vbmi", "__AVX512IFMA__": "avx512ifma", "__AVX512VBMI2__": "avx512_vbmi2",
    "__AVX512VNNI__": "avx512_vnni", "__AVX512BITALG__": "avx512_bitalg",
    "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq", "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16", "__AVXVNNI__": "avx_vnni", "__GFNI__": "gfni",
}


def _compiler() -> str:
    return os.environ.get("PAGEDOPT_CXX") or os.environ.get("CXX") or "g++"


def _required_cpu_flags(cxx: str, march: str | None) -> list[str]:
    """The cpuinfo flags implied by ``-march`` (what the compiled code may use)."""
    if not march:
        return []
    try:
        out = subprocess.run(
            [cxx, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
            check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    macros = set(re.findall(r"#define (__\w+__) 1", out))
    return sorted({flag for macro, flag in _MACRO_FLAGS.items() if macro in macros})


def _is_x86(cxx: str) -> bool:
    """Whether the compiler targets x86 (it may be a cross compiler)."""
    try:
        out = subprocess.run([cxx, "-dM", "-E", "-x", "c++", os.devnull], check=True, capture_output=True,
                             text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return "__x86_64__" in out or "__i386__" in out


# Instruction-set levels (native/cpu/isa.h): extra flags on top of the base target. The CPU
# features behind these flags are what native/cpu/api.cpp checks before running a level.
_AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mpopcnt"]
LEVEL_FLAGS = {
    "baseline": [],
    "avx2": _AVX2_FLAGS,
    "avx512": [*_AVX2_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512cd"],
}


def _levels(x86: bool) -> list[str]:
    if not x86:
        return ["baseline"]
    wanted = os.environ.get("PAGEDOPT_CPU_LEVELS", "").strip()
    if not wanted:
        return list(LEVEL_FLAGS)
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [n for n in names if n not in LEVEL_FLAGS]
    if unknown:
        raise RuntimeError(f"PAGEDOPT_CPU_LEVELS: unknown level(s) {', '.join(unknown)}; known: {', '.join(LEVEL_FLAGS)}")
    return [n for n in LEVEL_FLAGS if n in names or n == "baseline"]


def _base_flags(march: str | None, x86: bool) -> list[str]:
    flags = [
        "-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fvisibility=hidden",
        "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wextra",
        f"-I{ROOT / 'native' / 'include'}", f"-I{ROOT / 'native' / 'cpu'}",
    ]
    if march:
        flags.append(f"-march={march}")
    elif x86:
        flags += ["-march=x86-64", "-mtune=generic"]
    flags += shlex.split(os.environ.get("PAGEDOPT_CXXFLAGS", ""))
    return flags


def _is_level_source(src: str) -> bool:
    name = Path(src).name
    return name.startswith("kernels_") or name.startswith("isa_")


def _newest_mtime(paths: list[str]) -> float:
    return max((ROOT / p).stat().st_mtime for p in paths)


def _compile_jobs(cxx: str, march: str | None, x86: bool, objdir: Path) -> list[tuple[list[str], Path]]:
    base = _base_flags(march, x86)
    levels = _levels(x86)
    required = _required_cpu_flags(cxx, march)
    build_info = f"{cxx} {'-march=' + march if march else ('-march=x86-64' if x86 else 'default target')}"
    extra = " ".join(shlex.split(os.environ.get("PAGEDOPT_CXXFLAGS", "")))
    jobs = []
    for src in CPU_SOURCES:
        if _is_level_source(src):
            for level in levels:
                obj = objdir / f"{Path(src).stem}.{level}.o"
                cmd = [cxx, *base, *LEVEL_FLAGS[level], f"-DPO_ISA_NS=isa_{level}", "-c", str(ROOT / src), "-o", str(obj)]
                jobs.append((cmd, obj))
        else:
            defines = [
                f'-DPO_BUILD_INFO="{build_info} levels={",".join(levels)} {extra}"'.replace("  ", " "),
                f'-DPO_REQUIRED_CPU_FLAGS="{" ".join(required)}"',
                *[f"-DPO_LEVEL_{level.upper()}=1" for level in levels if level != "baseline"],
            ]
            obj = objdir / f"{Path(src).stem}.o"
            jobs.append(([cxx, *base, *defines, "-c", str(ROOT / src), "-o", str(obj)], obj))
    return jobs


def _up_to_date(cmd: list[str], obj: Path, src: str) -> bool:
    """The object exists, was built by exactly this command and is newer than its inputs."""
    stamp = obj.with_suffix(".cmd")
    return (
        obj.exists() and stamp.exists() and stamp.read_text() == shlex.join(cmd)
        and obj.stat().st_mtime >= _newest_mtime([src, *HEADERS])
    )


def _check_level_symbols(obj: Path, level: str) -> None:
    """Fail the build when a level object defines a linkable symbol outside its namespace.

    The linker keeps one copy of each weak (inline / template) symbol; a copy compiled with
    AVX-512 flags that shared its name with the generic code's could be picked for both and
    crash on an older CPU. native/cpu/isa.h prevents that by namespace; this checks it.
    """
    try:
        out = subprocess.run(["nm", "-C", "--defined-only", str(obj)], check=True, capture_output=True,
                             text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return  # no binutils nm: nothing to check with
    leaks = []
    for line in out.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) < 3 or parts[1].islower() or parts[1] == "N":
            continue  # local symbol (or debug)
        name = parts[2]
        if f"::isa_{level}::" in name or name.startswith("DW.ref."):
            continue
        leaks.append(name)
    if leaks:
        raise RuntimeError(f"pagedopt: {obj.name} defines symbols outside pagedopt::cpu::isa_{level} "
                           f"(see native/cpu/isa.h): {', '.join(leaks[:5])}")


class BuildNative(build_ext):
    """build_ext that compiles the native CPU library with g++ (other extensions: default)."""

    def get_ext_filename(self, fullname: str) -> str:
        # A plain shared library name, not a Python module name (setuptools asks for both the
        # dotted full name and its last component).
        parts = fullname.split(".")
        if parts[-1] == NATIVE_EXT.rsplit(".", 1)[-1]:
            return os.path.join(*parts[:-1], LIBRARY_FILE)
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if ext.name != NATIVE_EXT:
            super().build_extension(ext)
            return
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        cxx = _compiler()
        march = os.environ.get("PAGEDOPT_MARCH") or None
        x86 = _is_x86(cxx)
        objdir = Path(self.build_temp) / "pagedopt_native"
        objdir.mkdir(parents=True, exist_ok=True)
        jobs = _compile_jobs(cxx, march, x86, objdir)
        srcs = {str(obj): cmd[cmd.index("-c") + 1] for cmd, obj in jobs}
        todo = [(cmd, obj) for cmd, obj in jobs if self.force or not _up_to_date(cmd, obj, srcs[str(obj)])]
        if not todo and target.exists() and target.stat().st_mtime >= max(obj.stat().st_mtime for _, obj in jobs):
            print(f"pagedopt: {target} is up to date")
            return
        print(f"pagedopt: compiling {len(todo)} of {len(jobs)} native objects with {cxx} "
              f"(levels: {', '.join(_levels(x86))})")
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            results = list(pool.map(lambda job: subprocess.run(job[0], capture_output=True, text=True), todo))
        for (cmd, obj), result in zip(todo, results):
            if result.returncode != 0:
                sys.stderr.write(result.stdout + result.stderr)
                raise RuntimeError(
                    f"pagedopt: compiling the native CPU library failed: {shlex.join(cmd)}\n"
                    "Install a C++17 compiler with OpenMP (g++), or set PAGEDOPT_NO_NATIVE=1 to install "
                    "without it (pagedopt then uses its slower pure-torch path on CPU)."
                )
            level = next((a.split("=isa_", 1)[1] for a in cmd if a.startswith("-DPO_ISA_NS=")), None)
            if level:
                _check_level_symbols(obj, level)
            obj.with_suffix(".cmd").write_text(shlex.join(cmd))
        tmp = target.with_name(target.name + ".tmp")
        link = [cxx, "-shared", "-fopenmp", *[str(obj) for _, obj in jobs], "-o", str(tmp)]
        subprocess.run(link, check=True)
        os.replace(tmp, target)  # atomic: a running process keeps its mapped copy
        print(f"pagedopt: built {target}")


def _extensions() -> list[Extension]:
    if os.environ.get("PAGEDOPT_NO_NATIVE", "") not in ("", "0"):
        print("pagedopt: PAGEDOPT_NO_NATIVE is set; not building the native CPU library")
        return []
    return [Extension(NATIVE_EXT, sources=CPU_SOURCES, depends=HEADERS, language="c++")]


# ---- packaging: kernel sources as package data; a build that survives a missing compiler ------

# Where a built package carries native/cuda and native/include (NVRTC compiles them at run
# time). native/ stays the one source of truth: the copies exist only inside build trees.
NATIVE_PACKAGE_DIR = Path("pagedopt") / "_native"
NATIVE_NOTE = "libpagedopt_cpu.missing.txt"  # pagedopt/backends/install_info.py reads it
REQUIRE_NATIVE_ENV = "PAGEDOPT_REQUIRE_NATIVE"  # 1: a failed CPU build fails the install (CI, images)


def native_package_files() -> list[tuple[Path, Path]]:
    """(source in native/, destination inside the package) for every CUDA source and header."""
    files = []
    for sub in ("cuda", "include"):
        for src in sorted((ROOT / "native" / sub).rglob("*")):
            if src.is_file() and src.suffix in (".cu", ".cuh", ".h"):
                files.append((src, NATIVE_PACKAGE_DIR / src.relative_to(ROOT / "native")))
    return files


class BuildPyWithNative(build_py):
    """build_py that also copies the kernel sources into ``pagedopt/_native`` of the build tree."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads native/ from the checkout next to the package
        for src, rel in native_package_files():
            target = Path(self.build_lib) / rel
            self.mkpath(str(target.parent))
            self.copy_file(str(src), str(target), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        extra = [] if getattr(self, "editable_mode", False) else [
            str(Path(self.build_lib) / rel) for _, rel in native_package_files()
        ]
        return super().get_outputs(include_bytecode) + extra


def _missing_compiler_message(cxx: str, reason: str) -> str:
    return (
        f"pagedopt: the native CPU library was not built ({reason}).\n"
        "pagedopt installs without it and runs CPU optimizer steps on its pure-torch reference path, "
        "which gives the same results much more slowly (it warns once at run time).\n"
        f"To build it, install a C++17 compiler with OpenMP (e.g. `apt-get install g++`; compiler: {cxx}, "
        "set PAGEDOPT_CXX to choose another) and reinstall; set "
        f"{REQUIRE_NATIVE_ENV}=1 to make this an error, PAGEDOPT_NO_NATIVE=1 to skip the build quietly."
    )


class BuildNativeOptional(BuildNative):
    """BuildNative that, without a working compiler, installs pagedopt without the library.

    It says why on stderr and leaves the reason in ``pagedopt/backends/{NATIVE_NOTE}`` so the
    run-time fallback warning can repeat it; ``PAGEDOPT_REQUIRE_NATIVE=1`` fails instead.
    """

    def build_extension(self, ext: Extension) -> None:
        if ext.name != NATIVE_EXT:
            super().build_extension(ext)
            return
        note = Path(self.get_ext_fullpath(ext.name)).with_name(NATIVE_NOTE)
        cxx = _compiler()
        try:
            if shutil.which(cxx) is None:
                raise FileNotFoundError(f"the C++ compiler {cxx!r} was not found")
            super().build_extension(ext)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            if os.environ.get(REQUIRE_NATIVE_ENV, "") not in ("", "0"):
                raise
            reason = str(exc).splitlines()[0]
            message = _missing_compiler_message(cxx, reason)
            sys.stderr.write(message + "\n")
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(f"the native CPU library was not built: {reason}\n", encoding="utf-8")
            return
        if note.exists():
            note.unlink()


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildNativeOptional, "build_py": BuildPyWithNative},
)
