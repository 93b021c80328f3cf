"""A thin layer over the CUDA driver API (cuda-python): load cubins into torch's context, launch.

Only the long-stable driver entry points are used (``cuModuleLoadData``,
``cuModuleGetFunction``, ``cuLaunchKernel``, ``cuOccupancyMaxActiveBlocksPerMultiprocessor``),
so the module works with every cuda-bindings 12.x/13.x. Kernels are loaded into the device's
*primary* context, the one torch's runtime uses, and launched on the stream torch hands out
(``torch.cuda.current_stream()``), so they order with the surrounding torch work without any
synchronization.

Kernel arguments are packed by hand: each value becomes a ctypes object of the type the
catalog declares (checked against the kernel's PTX signature at compile time), and
``cuLaunchKernel`` gets the address of an array of pointers to them (the ``void**`` form).

Example:
    >>> from pagedopt.backends.cuda_driver import DeviceContext  # doctest: +SKIP
    >>> ctx = DeviceContext(0)  # doctest: +SKIP
    >>> ctx.arch  # doctest: +SKIP
    'sm_90'
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .cuda_catalog import KernelSpec
from .cuda_compiler import STATS, CompiledProgram
from .cuda_layout import THREADS_PER_BLOCK


class DriverUnavailableError(RuntimeError):
    """The CUDA driver (libcuda) or cuda-python's driver bindings cannot be used."""


class DriverError(RuntimeError):
    """A driver call returned an error."""


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise DriverUnavailableError(f"cuda-python is not installed ({exc})") from exc
    return driver


def check(result: Any, what: str) -> tuple:
    """Unpack a ``(CUresult, *values)`` tuple, raising :class:`DriverError` on failure."""
    driver = _driver()
    err = result[0] if isinstance(result, tuple) else result
    if err != driver.CUresult.CUDA_SUCCESS:
        name = driver.cuGetErrorName(err)[1]
        text = driver.cuGetErrorString(err)[1]
        name = name.decode() if isinstance(name, bytes) else name
        text = text.decode() if isinstance(text, bytes) else text
        raise DriverError(f"{what} failed: {name} ({text})")
    return result[1:] if isinstance(result, tuple) else ()


@functools.lru_cache(maxsize=1)
def init_driver() -> int:
    """``cuInit`` once; returns the driver's CUDA version (e.g. 13000)."""
    driver = _driver()
    try:
        result = driver.cuInit(0)
    except RuntimeError as exc:  # libcuda missing: cuda-pathfinder raises DynamicLibNotFoundError
        raise DriverUnavailableError(f"the CUDA driver library (libcuda) could not be loaded ({exc})") from exc
    if result[0] != driver.CUresult.CUDA_SUCCESS:
        raise DriverUnavailableError(f"cuInit failed with {result[0]}: no usable CUDA driver")
    (version,) = check(driver.cuDriverGetVersion(), "cuDriverGetVersion")
    return int(version)


@dataclass
class Kernel:
    """A loaded kernel: its driver handle, declared parameter types and occupancy."""

    spec: KernelSpec
    function: Any  # CUfunction
    blocks_per_sm: int


class DeviceContext:
    """One CUDA device as the kernels see it: primary context, architecture, loaded modules."""

    def __init__(self, index: int):
        driver = _driver()
        init_driver()
        self.index = int(index)
        (self.device,) = check(driver.cuDeviceGet(self.index), f"cuDeviceGet({index})")
        (self.context,) = check(driver.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        attr = driver.CUdevice_attribute
        self.sm_count = self._attribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        major = self._attribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        minor = self._attribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        self.arch = f"sm_{major}{minor}"
        self._modules: list[Any] = []
        self._lock = threading.Lock()

    def _attribute(self, attribute: Any) -> int:
        (value,) = check(_driver().cuDeviceGetAttribute(attribute, self.device), f"cuDeviceGetAttribute({attribute})")
        return int(value)

    def make_current(self) -> None:
        """Make this device's primary context current on the calling thread if it is not.

        Callers enter ``torch.cuda.device(index)`` first, which already does this through the
        runtime; this covers threads where the runtime has not bound a context yet.
        """
        driver = _driver()
        (current,) = check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(current) != int(self.context):
            check(driver.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def load(self, program: CompiledProgram) -> dict[str, Kernel]:
        """Load a cubin into the primary context; returns its kernels by name expression."""
        driver = _driver()
        if program.arch != self.arch:
            raise DriverError(f"program {program.spec.slug} was compiled for {program.arch}, device {self.index} is {self.arch}")
        started = time.perf_counter()
        with self._lock:
            self.make_current()
            image = np.frombuffer(program.cubin, dtype=np.uint8)
            (module,) = check(driver.cuModuleLoadData(image.ctypes.data), f"cuModuleLoadData({program.spec.slug})")
            self._modules.append(module)
            kernels = {}
            for spec in program.spec.kernels:
                lowered = program.symbols[spec.name].encode()
                (function,) = check(driver.cuModuleGetFunction(module, lowered), f"cuModuleGetFunction({spec.name})")
                (blocks,) = check(
                    driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(function, THREADS_PER_BLOCK, 0),
                    f"cuOccupancyMaxActiveBlocksPerMultiprocessor({spec.name})",
                )
                kernels[spec.name] = Kernel(spec, function, max(1, int(blocks)))
        STATS.add(modules_loaded=1, load_seconds=time.perf_counter() - started)
        return kernels

    def grid_for(self, kernel: Kernel, work_units: int) -> int:
        """CTAs for a grid-stride launch: one full wave of resident CTAs, at most one per unit."""
        return max(1, min(int(work_units), kernel.blocks_per_sm * self.sm_count))

    def launch(self, kernel: Kernel, grid: int, args: Sequence[int | float], stream_handle: int) -> None:
        """Launch ``kernel`` on ``grid`` x 256 threads on the stream with handle ``stream_handle``."""
        driver = _driver()
        types = kernel.spec.params
        if len(args) != len(types):
            raise DriverError(f"{kernel.spec.name} takes {len(types)} arguments, got {len(args)}")
        if not 0 < grid < 2**31:
            raise DriverError(f"{kernel.spec.name}: grid size {grid} out of range")
        values = [ctype(value) for ctype, value in zip(types, args)]
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        check(
            driver.cuLaunchKernel(
                kernel.function, grid, 1, 1, THREADS_PER_BLOCK, 1, 1, 0,
                driver.CUstream(stream_handle), ctypes.addressof(pointers), 0,
            ),
            f"cuLaunchKernel({kernel.spec.name})",
        )
