"""Build of pagedopt's native CPU library (metadata lives in pyproject.toml).

``pip install .`` and ``pip install -e .`` compile ``native/cpu/*.cpp`` with g++ (C++17,
OpenMP) into ``pagedopt/backends/libpagedopt_cpu.so``, a plain C-ABI library that
``pagedopt/backends/cpu.py`` loads with ctypes (no torch headers, no Python extension API).

For development, rebuild in place after editing ``native/``::

    python setup.py build_ext --inplace

Environment variables:

* ``PAGEDOPT_CXX`` - the C++ compiler (default ``$CXX`` or ``g++``).
* ``PAGEDOPT_MARCH`` - the ``-march`` target (default ``native``: the library is built on the
  machine that runs it; use e.g. ``x86-64-v3`` to build for a fleet). The loader refuses a
  library whose instruction set this CPU lacks and falls back to the reference path.
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
float32 operation rounded exactly like the torch reference. ``-fno-math-errno`` (sqrt never
sets errno) and ``-fno-trapping-math`` (we never read floating-point exception flags) change
no result; they let the compiler vectorize sqrt and the branch-free skip logic.
"""

from __future__ import annotations

import os
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


def _required_cpu_flags(cxx: str, march: str) -> list[str]:
    """The cpuinfo flags implied by ``-march`` (what the compiled code may use)."""
    try:
        out = subprocess.run(
            [cxx, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
            check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    macros = set(re.findall(r"#define (__\w+__) 1", out))
    return sorted({flag for macro, flag in _MACRO_FLAGS.items() if macro in macros})


def _compile_flags(cxx: str, march: str) -> list[str]:
    flags = [
        "-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fvisibility=hidden",
        "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
        f"-march={march}", "-Wall", "-Wextra",
        f"-I{ROOT / 'native' / 'include'}", f"-I{ROOT / 'native' / 'cpu'}",
    ]
    flags += shlex.split(os.environ.get("PAGEDOPT_CXXFLAGS", ""))
    return flags


def _newest_mtime(paths: list[str]) -> float:
    return max((ROOT / p).stat().st_mtime for p in paths)


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
        march = os.environ.get("PAGEDOPT_MARCH", "native")
        required = _required_cpu_flags(cxx, march)
        flags = _compile_flags(cxx, march)
        objdir = Path(self.build_temp) / "pagedopt_native"
        objdir.mkdir(parents=True, exist_ok=True)
        stamp = objdir / (target.name + ".flags")
        signature = shlex.join([cxx, *flags, *required])
        if (
            not self.force
            and target.exists()
            and stamp.exists()
            and stamp.read_text() == signature
            and target.stat().st_mtime >= _newest_mtime(CPU_SOURCES + HEADERS)
        ):
            print(f"pagedopt: {target} is up to date")
            return
        defines = [
            f'-DPO_BUILD_INFO="{cxx} -march={march} {" ".join(shlex.split(os.environ.get("PAGEDOPT_CXXFLAGS", "")))}"',
            f'-DPO_REQUIRED_CPU_FLAGS="{" ".join(required)}"',
        ]
        jobs = []
        for src in CPU_SOURCES:
            obj = objdir / (Path(src).stem + ".o")
            jobs.append(([cxx, *flags, *defines, "-c", str(ROOT / src), "-o", str(obj)], obj))
        print(f"pagedopt: compiling {len(jobs)} native sources with {cxx} -march={march}")
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            results = list(pool.map(lambda job: subprocess.run(job[0], capture_output=True, text=True), jobs))
        for (cmd, _), result in zip(jobs, results):
            if result.returncode != 0:
                sys.stderr.write(result.stdout + result.stderr)
                raise RuntimeError(
                    f"pagedopt: compiling the native CPU library failed: {shlex.join(cmd)}\n"
                    "Install a C++17 compiler with OpenMP (g++), or set PAGEDOPT_NO_NATIVE=1 to install "
                    "without it (pagedopt then uses its slower pure-torch path on CPU)."
                )
        tmp = target.with_name(target.name + ".tmp")
        link = [cxx, "-shared", "-fopenmp", *[str(obj) for _, obj in jobs], "-o", str(tmp)]
        subprocess.run(link, check=True)
        os.replace(tmp, target)  # atomic: a running process keeps its mapped copy
        stamp.write_text(signature)
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
