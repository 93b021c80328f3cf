"""Every CUDA kernel pagedopt launches: which program it lives in and its parameter types.

A *program* is one NVRTC compilation (one ``.cu`` file and the template instantiations
requested from it); it is the unit of compiling, caching and loading. Optimizer kernels are
grouped per (algorithm, parameter dtype, numerics mode), so a job that trains with bf16
AdamW compiles only what it uses: the six Adam kernels for bf16 in its numerics mode (three
state modes, update and prepare) plus the shared norm kernels.

Numerics modes (``UpdateItem.numerics``): ``"strict"`` kernels compute exactly what the CPU
kernels and the reference compute, bit for bit; ``"fast"`` kernels (the CUDA default) use
fused multiply-adds, approximate square roots and divisions and an arithmetic dequantization
(``native/cuda/fast_math.cuh``). They are one template with a numerics parameter whose
default is strict, so the strict kernels keep their names.

Kernel parameter types are declared here once (as ctypes types); the compiler checks them
against the PTX signature of every kernel (``cuda_compiler``), so a launch can never pack
arguments of the wrong size.

Example:
    >>> from pagedopt.backends.cuda_catalog import all_programs, optimizer_program, update_kernel
    >>> from pagedopt.functional.kinds import Algorithm
    >>> prog = optimizer_program(Algorithm.ADAM, "bf16")
    >>> prog.slug, update_kernel(Algorithm.ADAM, "bf16", "block8").name
    ('optimizer-adam-bf16', 'pagedopt::cuda::update_kernel<0, 2, 1>')
    >>> optimizer_program(Algorithm.ADAM, "bf16", "fast").slug
    'optimizer-adam-bf16-fast'
    >>> update_kernel(Algorithm.ADAM, "bf16", "block8", "fast").name
    'pagedopt::cuda::update_kernel<0, 2, 1, 1>'
    >>> len(distinct_kernels())
    225
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

from ..functional.kinds import Algorithm

# Element types (native/include/pagedopt/common.h ElemType) and state modes
# (native/cuda/optimizer_kernels.cu StateMode).
ELEM_CODES = {"f32": 0, "f16": 1, "bf16": 2}
MODE_CODES = {"state32": 0, "block8": 1, "tensor8": 2}
# Numerics modes (native/cuda/fast_math.cuh Numerics); "fast" is the CUDA default.
NUMERICS_CODES = {"strict": 0, "fast": 1}
DEFAULT_NUMERICS = "fast"

_P = ctypes.c_void_p
_I32 = ctypes.c_int32
_I64 = ctypes.c_int64
_U64 = ctypes.c_uint64

# (descs, chunk_prefix, num_tensors, maps, luts, nonfinite): nonfinite is an int64 the kernel adds
# its count of NaN/Inf gradient elements to (atomically), or 0 for none
UPDATE_PARAMS = (_P, _P, _I32, _P, _P, _P)
# (descs, chunk_prefix, num_tensors, maps, luts, partials, want_norms)
PREPARE_PARAMS = (_P, _P, _I32, _P, _P, _P, _I32)
# (chunk_prefix, num_tensors, partials, norms, maxima)
FINALIZE_PREPARE_PARAMS = (_P, _I32, _P, _P, _P)
# (descs, chunk_prefix, num_tensors, partials)
GRAD_NORM_PARAMS = (_P, _P, _I32, _P)
# (chunk_prefix, num_tensors, partials, out)
FINALIZE_SUMS_PARAMS = (_P, _I32, _P, _P)
# (x, n, codes, maps, luts)
QUANTIZE_PARAMS = (_P, _I64, _P, _P, _P)
# (start, count, maps, luts, result)
CHECK_SEARCH_PARAMS = (_U64, _I64, _P, _P, _P)


@dataclass(frozen=True)
class KernelSpec:
    """One ``__global__`` instantiation: its NVRTC name expression and parameter types."""

    name: str
    params: tuple[type, ...]


@dataclass(frozen=True)
class ProgramSpec:
    """One NVRTC compilation: a source file under ``native/cuda`` and the kernels it exports."""

    slug: str
    source: str
    kernels: tuple[KernelSpec, ...]

    def kernel(self, name: str) -> KernelSpec:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(f"kernel {name!r} is not in program {self.slug!r}")


def _ns(name: str) -> str:
    return f"pagedopt::cuda::{name}"


def check_numerics(numerics: str) -> str:
    """``numerics`` if it names a mode, else a ValueError listing the modes."""
    if numerics not in NUMERICS_CODES:
        raise ValueError(f"numerics={numerics!r} is not one of {', '.join(repr(n) for n in NUMERICS_CODES)}")
    return numerics


def _template_args(algorithm: Algorithm, elem: str, mode: str, numerics: str) -> str:
    args = f"{int(algorithm)}, {ELEM_CODES[elem]}, {MODE_CODES[mode]}"
    code = NUMERICS_CODES[check_numerics(numerics)]
    return args if code == 0 else f"{args}, {code}"  # strict: the template's default


def update_kernel(algorithm: Algorithm, elem: str, mode: str, numerics: str = "strict") -> KernelSpec:
    return KernelSpec(_ns(f"update_kernel<{_template_args(algorithm, elem, mode, numerics)}>"), UPDATE_PARAMS)


def prepare_kernel(algorithm: Algorithm, elem: str, mode: str, numerics: str = "strict") -> KernelSpec:
    return KernelSpec(_ns(f"prepare_kernel<{_template_args(algorithm, elem, mode, numerics)}>"), PREPARE_PARAMS)


FINALIZE_PREPARE = KernelSpec(_ns("finalize_prepare"), FINALIZE_PREPARE_PARAMS)
FINALIZE_SUMS = KernelSpec(_ns("finalize_sums"), FINALIZE_SUMS_PARAMS)


def grad_norm_kernel(elem: str) -> KernelSpec:
    return KernelSpec(_ns(f"grad_norm_partials<{ELEM_CODES[elem]}>"), GRAD_NORM_PARAMS)


def quantize_kernel(signed: bool) -> KernelSpec:
    return KernelSpec(_ns(f"quantize_codes<{'true' if signed else 'false'}>"), QUANTIZE_PARAMS)


def check_search_kernel(signed: bool) -> KernelSpec:
    return KernelSpec(_ns(f"check_code_search<{'true' if signed else 'false'}>"), CHECK_SEARCH_PARAMS)


@functools.lru_cache(maxsize=None)
def optimizer_program(algorithm: Algorithm, elem: str, numerics: str = "strict") -> ProgramSpec:
    kernels = [update_kernel(algorithm, elem, m, numerics) for m in MODE_CODES]
    kernels += [prepare_kernel(algorithm, elem, m, numerics) for m in MODE_CODES]
    kernels.append(FINALIZE_PREPARE)
    slug = f"optimizer-{algorithm.name.lower()}-{elem}" + ("" if numerics == "strict" else f"-{numerics}")
    return ProgramSpec(slug, "optimizer_kernels.cu", tuple(kernels))


def split_by_numerics(items) -> dict[str, list[int]]:
    """Positions of ``items`` (objects with a ``numerics`` attribute) per numerics mode, in
    order of first appearance: one launch per mode. Raises ValueError for an unknown mode."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(check_numerics(getattr(item, "numerics", DEFAULT_NUMERICS)), []).append(i)
    return groups


@functools.lru_cache(maxsize=1)
def norm_program() -> ProgramSpec:
    kernels = tuple(grad_norm_kernel(e) for e in ELEM_CODES) + (FINALIZE_SUMS,)
    return ProgramSpec("norms", "norm_kernels.cu", kernels)


@functools.lru_cache(maxsize=1)
def quant_program() -> ProgramSpec:
    kernels = tuple(quantize_kernel(s) for s in (True, False)) + tuple(check_search_kernel(s) for s in (True, False))
    return ProgramSpec("quantization", "quant_kernels.cu", kernels)


def all_programs() -> list[ProgramSpec]:
    """Every program, in a stable order (what ``pagedopt kernels`` compiles)."""
    programs = [optimizer_program(a, e, n) for n in NUMERICS_CODES for a in Algorithm for e in ELEM_CODES]
    return programs + [norm_program(), quant_program()]


def distinct_kernels() -> list[KernelSpec]:
    """Every kernel once (``finalize_prepare`` is part of each optimizer program)."""
    seen: dict[str, KernelSpec] = {}
    for program in all_programs():
        for k in program.kernels:
            seen.setdefault(k.name, k)
    return list(seen.values())
