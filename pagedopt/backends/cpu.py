"""The native CPU backend: fused C++/OpenMP kernels (``native/cpu``) behind ctypes.

The package install compiles ``native/cpu`` into ``libpagedopt_cpu.so`` next to this file
(see ``setup.py``): one library for every x86-64 CPU, holding the kernels compiled once per
instruction-set level (``avx512``, ``avx2``, ``baseline``). It runs the best level this CPU
supports; ``PAGEDOPT_CPU_ISA=avx2`` (or ``baseline``) selects a lower one, and asking for a
level the CPU lacks is an error naming the missing features. Every level computes the same
bits. :func:`native_info` reports what is in use (``pagedopt env`` shows it). Importing :mod:`pagedopt` registers :func:`load` for CPU tensors with
:func:`pagedopt.functional.dispatch.register_backend`; the first CPU step loads the library.
When it is missing, was built for another CPU, or fails to load, pagedopt keeps working on
the pure-torch reference path and warns once with the reason and how to rebuild.
``PAGEDOPT_BACKEND=reference`` skips the library altogether.

The kernels compute exactly what :mod:`pagedopt.functional.reference` computes (same float32
operations in the same order, bit for bit; float64 norms up to summation order). This module
only marshals tensors: strided parameters, gradients and states are copied to contiguous
buffers and back, items the kernels do not take (float64 parameters) go to the reference.

Example:
    >>> import torch, pagedopt
    >>> from pagedopt.functional.dispatch import backend_for
    >>> backend_for(torch.device("cpu")).name in ("cpu", "reference")
    True
    >>> from pagedopt.backends import cpu
    >>> lib = cpu.library()          # None when the native library is unavailable
    >>> lib is None or lib.abi_version == cpu.ABI_VERSION
    True
    >>> sorted(cpu.native_info())
    ['available', 'code_search', 'isa', 'native_library', 'prefetch_chunks', 'reason', 'threads']
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from pathlib import Path
from typing import Sequence

import torch

from ..functional import dispatch, nonfinite_tally, reference
from ..functional.items import PrepareResult, UpdateItem
from ..functional.kinds import UpdateKind
from ..functional.qmap import decision_thresholds, dynamic_map
from . import cpu_tuning, install_info
from .cpu_items import (  # noqa: F401  (_CItem, _c_scalars: tests reach them here too)
    DTYPE_CODES, _c_item, _c_scalars, _CItem, _CPrepareOut, _ptr, _Staging, _supported, prepare_columns,
)

ABI_VERSION = 5  # PO_ABI_VERSION in native/cpu/pagedopt_cpu.h
LIBRARY_FILE = "libpagedopt_cpu.so"
LIBRARY_ENV = "PAGEDOPT_CPU_LIBRARY"  # load this file instead of the packaged one
ISA_ENV = "PAGEDOPT_CPU_ISA"  # run this instruction-set level instead of the best one
ISA_LEVELS = ("baseline", "avx2", "avx512")  # index = level id of native/cpu/isa.h

class NativeUnavailable(RuntimeError):
    """The native library cannot be used (the message says why)."""


class NativeError(RuntimeError):
    """A native call rejected its arguments or failed (the message is the library's)."""


class CpuIsaError(ValueError):
    """``PAGEDOPT_CPU_ISA`` names an unknown level, or one this CPU or library lacks."""


# ---- the library ---------------------------------------------------------------------------


def default_library_path() -> Path:
    """Where the library is looked for (``$PAGEDOPT_CPU_LIBRARY`` overrides)."""
    override = os.environ.get(LIBRARY_ENV)
    return Path(override) if override else Path(__file__).with_name(LIBRARY_FILE)


def _cpu_flags() -> set[str] | None:
    """This machine's CPU feature flags (Linux), or None when they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


class NativeLibrary:
    """The loaded ``libpagedopt_cpu.so`` with typed entry points, initialised with the maps."""

    def __init__(self, path: Path):
        if not path.exists():
            raise NativeUnavailable(f"{path} does not exist")
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise NativeUnavailable(f"loading {path} failed: {e}") from e
        self.path = path
        self._lib = lib
        self._declare()
        self.abi_version = int(lib.po_abi_version())
        if self.abi_version != ABI_VERSION:
            raise NativeUnavailable(f"{path} has ABI version {self.abi_version}, this pagedopt needs {ABI_VERSION}")
        self.build_info = lib.po_build_info().decode()
        self.required_cpu_flags = lib.po_required_cpu_flags().decode().split()
        have = _cpu_flags()
        missing = sorted(set(self.required_cpu_flags) - have) if have is not None else []
        if missing:
            raise NativeUnavailable(f"{path} was built for a CPU with {', '.join(missing)}, which this CPU lacks")
        self._init_tables()
        requested = os.environ.get(ISA_ENV, "").strip().lower()
        if requested:
            self.select_isa(requested, source=ISA_ENV)
        self._choose_code_search()

    # ---- instruction-set levels -----------------------------------------------------------

    @property
    def isa(self) -> str:
        """The instruction-set level the kernels run at (``avx512``, ``avx2`` or ``baseline``)."""
        return ISA_LEVELS[int(self._lib.po_isa())]

    def compiled_isas(self) -> list[str]:
        """The levels built into this library, best first."""
        return [name for i, name in reversed(list(enumerate(ISA_LEVELS))) if self._lib.po_isa_compiled(i)]

    def missing_cpu_features(self, level: str) -> list[str]:
        """CPU features the level needs that this CPU lacks (empty: it can run)."""
        return self._lib.po_isa_missing_features(ISA_LEVELS.index(level)).decode().split()

    def supported_isas(self) -> list[str]:
        """The levels this library can run on this CPU, best first."""
        return [name for name in self.compiled_isas() if not self.missing_cpu_features(name)]

    def select_isa(self, level: str, source: str = "select_isa") -> None:
        """Run the kernels at ``level`` from now on (process-wide; results are the same bits).

        Raises :class:`CpuIsaError` naming ``source`` (the variable or argument that asked) for
        an unknown level, one this library was built without, or one this CPU lacks.
        """
        if level not in ISA_LEVELS:
            raise CpuIsaError(f"{source}={level!r}: unknown instruction-set level; expected one of "
                              f"{', '.join(reversed(ISA_LEVELS))}")
        if level not in self.compiled_isas():
            raise CpuIsaError(f"{source}={level}: {self.path} was built without the {level} level (built: "
                              f"{', '.join(self.compiled_isas())}); rebuild without PAGEDOPT_CPU_LEVELS")
        missing = self.missing_cpu_features(level)
        if missing:
            raise CpuIsaError(f"{source}={level}: this CPU lacks the {level} level (missing CPU features: "
                              f"{', '.join(missing)}); levels this CPU supports: {', '.join(self.supported_isas())}")
        self.check(self._lib.po_select_isa(ISA_LEVELS.index(level)), "select_isa")

    # ---- the 8-bit code search (speed only: every search gives the same codes) ------------

    @property
    def code_search(self) -> str:
        """The avx512 level's code search (:mod:`pagedopt.backends.cpu_tuning`)."""
        return cpu_tuning.CODE_SEARCHES.get(int(self._lib.po_code_search()), "unknown")

    def select_code_search(self, name: str, source: str = "select_code_search") -> None:
        """Quantize with code search ``name`` from now on (process-wide). Raises
        :class:`~pagedopt.backends.cpu_tuning.CpuTuningError` naming ``source`` for an unknown
        search or one this CPU (VBMI) or the maps cannot run."""
        status = self._lib.po_set_code_search(cpu_tuning.code_search_id(name, source))
        if status != 0:
            raise cpu_tuning.CpuTuningError(f"{source}={name}: {self.last_error()}")

    def _choose_code_search(self) -> None:
        """``PAGEDOPT_CPU_CODE_SEARCH`` if set, else the fastest search for this CPU."""
        requested = cpu_tuning.requested_code_search()
        if requested is not None:
            self.select_code_search(requested, source=cpu_tuning.CODE_SEARCH_ENV)
            return
        preferred = cpu_tuning.preferred_code_search(
            cpu_tuning.cpu_vendor(), cpu_tuning.gather_sampling_status(), native_default=self.code_search)
        if preferred != self.code_search:
            self.select_code_search(preferred)

    def _declare(self) -> None:
        lib = self._lib
        c_int, c_i64, vp = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
        signatures = {
            "po_abi_version": (c_int, []),
            "po_build_info": (ctypes.c_char_p, []),
            "po_required_cpu_flags": (ctypes.c_char_p, []),
            "po_last_error": (ctypes.c_char_p, []),
            "po_isa": (c_int, []),
            "po_isa_compiled": (c_int, [ctypes.c_int32]),
            "po_isa_missing_features": (ctypes.c_char_p, [ctypes.c_int32]),
            "po_select_isa": (c_int, [ctypes.c_int32]),
            "po_set_dequantize_vbmi": (c_int, [ctypes.c_int32]),
            "po_set_code_search": (c_int, [ctypes.c_int32]),
            "po_set_code_search_vbmi": (c_int, [ctypes.c_int32]),
            "po_set_prefetch": (c_int, [ctypes.c_int32]),
            "po_get_prefetch": (c_int, []),
            "po_code_search": (c_int, []),
            "po_init": (c_int, [vp, vp, vp, vp]),
            "po_update": (c_int, [ctypes.c_int32, vp, c_i64, ctypes.c_int32, vp]),
            "po_prepare": (c_int, [ctypes.c_int32, vp, c_i64, ctypes.c_int32, vp, ctypes.c_int32]),
            "po_grad_norm_sq": (c_int, [vp, vp, vp, c_i64, vp, ctypes.c_int32]),
            "po_check_code_search": (c_i64, [ctypes.c_int32, ctypes.c_uint32, ctypes.c_uint32, vp, ctypes.c_int32]),
            "po_quantize_normalized": (c_int, [ctypes.c_int32, vp, vp, c_i64]),
            "po_dequantize": (c_int, [ctypes.c_int32, vp, c_i64, ctypes.c_float, vp]),
            "po_convert_from_float": (c_int, [ctypes.c_int32, vp, vp, c_i64]),
            "po_convert_to_float": (c_int, [ctypes.c_int32, vp, vp, c_i64]),
            "po_count_conversion_mismatches": (c_i64, [ctypes.c_int32, vp, vp, c_i64]),
        }
        for name, (restype, argtypes) in signatures.items():
            try:
                fn = getattr(lib, name)
            except AttributeError as e:
                raise NativeUnavailable(f"{self.path} lacks the entry point {name} (stale build?)") from e
            fn.restype, fn.argtypes = restype, argtypes

    def _init_tables(self) -> None:
        tensors = [dynamic_map(True), dynamic_map(False), decision_thresholds(True), decision_thresholds(False)]
        tensors = [t.contiguous() for t in tensors]
        status = self._lib.po_init(*[t.data_ptr() for t in tensors])
        if status != 0:
            raise NativeUnavailable(f"{self.path}: po_init failed: {self.last_error()}")

    def last_error(self) -> str:
        return self._lib.po_last_error().decode(errors="replace")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise NativeError(f"pagedopt native {what} failed: {self.last_error()}")

    # raw entry points (pointers and counts; the backend below builds them)
    def __getattr__(self, name: str):
        if name.startswith("po_"):
            return getattr(self._lib, name)
        raise AttributeError(name)


_lock = threading.Lock()
_library: NativeLibrary | None = None
_failure: str | None = None
_warned = False


def _warn_unavailable(reason: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"pagedopt: the native CPU kernels are unavailable ({reason}); CPU optimizer steps use the "
        f"pure-torch reference path, which computes the same results much more slowly. To fix: {install_info.cpu_rebuild_hint()}.",
        RuntimeWarning,
        stacklevel=3,
    )


def library() -> NativeLibrary | None:
    """The loaded native library (loaded once per process), or None when it is unavailable.

    Raises :class:`CpuIsaError` when ``PAGEDOPT_CPU_ISA`` asks for a level that cannot run here
    (a configuration error, not a missing build: it is not hidden behind the fallback).
    """
    global _library, _failure
    with _lock:
        if _library is None and _failure is None:
            try:
                _library = NativeLibrary(default_library_path())
            except NativeUnavailable as e:
                _failure = str(e)
        return _library


def unavailable_reason() -> str | None:
    """Why the native library could not be loaded (None when it loaded or was not tried)."""
    return _failure


def native_info() -> dict:
    """What the CPU backend runs: the keys ``isa`` (``"avx512"``, ``"avx2"``, ``"baseline"``, or
    None without a library), ``native_library`` (path or None), ``available``, ``reason`` (why
    not, else None), ``threads`` (``torch.get_num_threads()``, the kernels' thread count), and
    (None without a library) ``code_search`` (the 8-bit code search of the avx512 level, chosen
    per CPU by :mod:`~pagedopt.backends.cpu_tuning`: ``"table"`` (a gather per 16 values) where
    gathers are fast, at the other levels, or where the maps' lattice is not proven, else
    ``"lattice"`` (or ``"arithmetic"``) on VBMI CPUs and ``"lattice_table"`` - the lattice with
    the bucket table as the fallback for rare unsure groups - on other AVX-512 CPUs) and
    ``prefetch_chunks`` (the kernels' software prefetch distance, chosen per CPU vendor).

    Example:
        >>> info = native_info()
        >>> info["isa"] in ("avx512", "avx2", "baseline", None) and isinstance(info["threads"], int)
        True
    """
    info: dict = {"isa": None, "native_library": None, "available": False, "reason": None,
                  "threads": torch.get_num_threads(), "code_search": None, "prefetch_chunks": None}
    try:
        lib = library()
    except (CpuIsaError, cpu_tuning.CpuTuningError) as e:
        info["reason"] = str(e)
        return info
    if lib is None:
        info["reason"] = unavailable_reason() or "unknown reason"
        return info
    info.update(isa=lib.isa, native_library=str(lib.path), available=True,
                code_search=lib.code_search if lib.isa == "avx512" else "table",
                prefetch_chunks=int(lib.po_get_prefetch()))
    return info


CODE_SEARCHES = cpu_tuning.CODE_SEARCHES  # po_code_search() ids -> names


def load() -> "CpuBackend | None":
    """The dispatch loader for ``"cpu"``: the native backend, or None (after one warning)."""
    lib = library()
    if lib is None:
        _warn_unavailable(_failure or "unknown reason")
        return None
    return CpuBackend(lib)


class CpuBackend:
    """:class:`~pagedopt.functional.dispatch.Backend` running the native kernels on CPU tensors.

    Every call handles all items in one native call (one OpenMP region), on
    ``torch.get_num_threads()`` threads; results do not depend on the thread count.
    """

    name = "cpu"

    def __init__(self, lib: NativeLibrary):
        self.lib = lib

    def grad_norm_sq(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = torch.zeros(len(grads), dtype=torch.float64)
        native = [i for i, g in enumerate(grads) if g.dtype in DTYPE_CODES and g.is_cpu]
        others = sorted(set(range(len(grads))) - set(native))
        if native:
            staging = _Staging()
            flat = [staging.read(grads[i]) for i in native]
            n = len(flat)
            ptrs = (ctypes.c_void_p * n)(*[_ptr(g) for g in flat])
            numels = (ctypes.c_int64 * n)(*[g.numel() for g in flat])
            dtypes = (ctypes.c_int32 * n)(*[DTYPE_CODES[g.dtype] for g in flat])
            result = torch.zeros(n, dtype=torch.float64)
            status = self.lib.po_grad_norm_sq(ptrs, numels, dtypes, n, result.data_ptr(), torch.get_num_threads())
            self.lib.check(status, "grad_norm_sq")
            out[native] = result
        results = list(out.unbind(0))
        for i, r in zip(others, reference.grad_norm_sq([grads[i] for i in others])):
            results[i] = r
        return results

    def prepare(self, kind: UpdateKind, items: Sequence[UpdateItem], want_norms: bool) -> list[PrepareResult]:
        native = [i for i, item in enumerate(items) if _supported(item)]
        results: list[PrepareResult | None] = [None] * len(items)
        if native:
            staging = _Staging()
            c_items = (_CItem * len(native))(*[_c_item(kind, items[i], staging, updating=False) for i in native])
            outs = (_CPrepareOut * len(native))()
            status = self.lib.po_prepare(
                int(kind.algorithm), c_items, len(native), int(want_norms), outs, torch.get_num_threads()
            )
            self.lib.check(status, "prepare")
            for i, r in zip(native, self._prepare_results(kind, [items[i] for i in native], outs, want_norms)):
                results[i] = r
        rest = [i for i in range(len(items)) if results[i] is None]
        for i, r in zip(rest, reference.prepare(kind, [items[i] for i in rest], want_norms)):
            results[i] = r
        return results  # type: ignore[return-value]

    @staticmethod
    def _prepare_results(kind: UpdateKind, items: Sequence[UpdateItem], outs: ctypes.Array,
                         want_norms: bool) -> list[PrepareResult]:
        """One PrepareResult per item, as views of two tables copied out of ``outs`` at once."""
        maxima, norms = prepare_columns(outs, len(items))
        results = [PrepareResult() for _ in items]
        tensor_wise = [r for r, item in zip(results, items) if item.quantized and not item.block_wise]
        if tensor_wise:
            max1 = maxima[:, : kind.state1_moments].unbind(0)
            max2 = maxima[:, 2:3].unbind(0)
            for i, (r, item) in enumerate(zip(results, items)):
                if item.quantized and not item.block_wise:
                    r.max1 = max1[i]
                    r.max2 = max2[i] if kind.num_states == 2 else None
        if want_norms:
            for r, unorm_sq, pnorm_sq in zip(results, norms[:, 0].unbind(0), norms[:, 1].unbind(0)):
                r.unorm_sq, r.pnorm_sq = unorm_sq, pnorm_sq
        return results

    @torch.no_grad()
    def update(self, kind: UpdateKind, items: Sequence[UpdateItem]) -> None:
        native = [item for item in items if _supported(item)]
        if native:
            staging = _Staging()
            c_items = (_CItem * len(native))(*[_c_item(kind, item, staging, updating=True) for item in native])
            skipped = ctypes.c_int64(0)
            status = self.lib.po_update(int(kind.algorithm), c_items, len(native), torch.get_num_threads(),
                                        ctypes.addressof(skipped))
            self.lib.check(status, "update")
            staging.finish()
            nonfinite_tally.report(skipped.value)
        rest = [item for item in items if not _supported(item)]
        if rest:
            reference.update(kind, rest)


dispatch.register_backend("cpu", load)
