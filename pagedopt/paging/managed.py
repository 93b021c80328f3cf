"""CUDA managed memory through cuda-python, shown to torch as ordinary CUDA tensors.

* :func:`allocate` calls ``cuMemAllocManaged`` and wraps the pointer in an object exposing
  ``__cuda_array_interface__``; ``torch.as_tensor`` turns it into a zero-copy CUDA tensor that
  keeps the object alive. ``torch.from_dlpack`` cannot be used: it rejects managed memory.
* The memory is freed (``cuMemFree``) by a finalizer when the last tensor using it dies. The
  finalizer never runs at interpreter exit (the driver may already be gone; the process's
  memory is released with it anyway).
* :func:`prefetch` and :func:`advise` use the CUDA 13 location-struct forms of
  ``cuMemPrefetchAsync`` / ``cuMemAdvise``; :func:`last_prefetch_location` reads back what
  was requested with ``cuMemRangeGetAttribute`` (the GPU tests compare it with the pager).

Nothing here runs at import time: importing works without cuda-python or a driver, and
:func:`availability` says why managed memory cannot be used.

Example:
    >>> from pagedopt.paging import managed
    >>> ok, reason = managed.availability(0)
    >>> isinstance(ok, bool) and isinstance(reason, str)
    True
"""

from __future__ import annotations

import sys
import weakref
from functools import lru_cache
from typing import Any

import torch

from .memory import _count_live

_TYPESTR = {torch.uint8: "|u1", torch.float32: "<f4", torch.float16: "<f2", torch.int32: "<i4", torch.float64: "<f8"}


class ManagedMemoryError(RuntimeError):
    """A CUDA driver call on managed memory failed (the message names the call and error).

    Example:
        >>> from pagedopt.paging.managed import ManagedMemoryError
        >>> str(ManagedMemoryError("cuMemAllocManaged(4096) failed: CUDA_ERROR_OUT_OF_MEMORY"))
        'cuMemAllocManaged(4096) failed: CUDA_ERROR_OUT_OF_MEMORY'
    """


def _driver() -> Any:
    from cuda.bindings import driver  # deferred: cuda-python is an optional dependency

    return driver


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-bindings ``(err, *values)`` tuple, raising on error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    driver = _driver()
    if err != driver.CUresult.CUDA_SUCCESS:
        name = getattr(err, "name", str(err))
        raise ManagedMemoryError(f"{what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@lru_cache(maxsize=None)
def availability(device_index: int) -> tuple[bool, str]:
    """``(True, "")`` when ``cuda:device_index`` supports concurrent managed access (needed
    for prefetching and oversubscription), else ``(False, why)``."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available to torch"
    try:
        driver = _driver()
    except ImportError as exc:
        return False, f"cuda-python is not installed ({exc}); pip install 'pagedopt[cuda]'"
    try:
        torch.cuda.init()
        _check(driver.cuInit(0), "cuInit")
        dev = _check(driver.cuDeviceGet(device_index), "cuDeviceGet")
        attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS
        concurrent = _check(driver.cuDeviceGetAttribute(attr, dev), "cuDeviceGetAttribute")
    except RuntimeError as exc:  # ManagedMemoryError, or the driver library missing
        return False, f"CUDA driver query failed: {exc}"
    if not concurrent:
        return False, f"cuda:{device_index} lacks concurrent managed access (device attribute 89)"
    return True, ""


class ManagedAllocation:
    """One ``cuMemAllocManaged`` block, exposed through ``__cuda_array_interface__``.

    torch keeps this object alive as long as any tensor uses the memory; the finalizer frees
    it afterwards.

    Example (needs a GPU):
        >>> import torch
        >>> from pagedopt.paging.managed import ManagedAllocation
        >>> if torch.cuda.is_available():  # doctest: +SKIP
        ...     raw = torch.as_tensor(ManagedAllocation(4096, 0), device="cuda:0")  # 4096 uint8
    """

    def __init__(self, nbytes: int, device_index: int) -> None:
        driver = _driver()
        self.nbytes = int(nbytes)
        self.device_index = device_index
        with torch.cuda.device(device_index):  # the primary context torch uses
            ptr = _check(
                driver.cuMemAllocManaged(max(self.nbytes, 1), driver.CUmemAttach_flags.CU_MEM_ATTACH_GLOBAL.value),
                f"cuMemAllocManaged({self.nbytes})",
            )
        self.ptr = int(ptr)
        _count_live("managed", self.nbytes)
        self._finalizer = weakref.finalize(self, _free, self.ptr, self.nbytes)
        self._finalizer.atexit = False

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": None}


def _free(ptr: int, nbytes: int) -> None:
    _count_live("managed", -nbytes)
    if sys.is_finalizing():
        return
    try:
        driver = _driver()
        driver.cuMemFree(driver.CUdeviceptr(ptr))
    except (ImportError, RuntimeError, TypeError, AttributeError):
        # Late in shutdown or after a driver failure: the process's memory goes with it.
        pass


def allocate(shape: tuple[int, ...], dtype: torch.dtype, device_index: int) -> torch.Tensor:
    """An uninitialised CUDA tensor of ``shape``/``dtype`` in managed memory on ``cuda:device_index``."""
    if dtype not in _TYPESTR:
        raise TypeError(f"managed state of dtype {dtype} is not supported (use one of {sorted(map(str, _TYPESTR))})")
    numel = 1
    for s in shape:
        numel *= int(s)
    block = ManagedAllocation(numel * torch.empty((), dtype=dtype).element_size(), device_index)
    raw = torch.as_tensor(block, device=f"cuda:{device_index}")
    return raw.view(dtype).view(tuple(shape))


def _location(where: str, device_index: int) -> Any:
    driver = _driver()
    loc = driver.CUmemLocation()
    if where == "device":
        loc.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        loc.id = device_index
    else:
        loc.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST
        loc.id = 0
    return loc


def prefetch(tensor: torch.Tensor, where: str, stream: torch.cuda.Stream) -> None:
    """Enqueue migration of ``tensor``'s bytes to ``"device"`` (its GPU) or ``"host"`` on ``stream``."""
    driver = _driver()
    nbytes = tensor.numel() * tensor.element_size()
    _check(
        driver.cuMemPrefetchAsync(
            driver.CUdeviceptr(tensor.data_ptr()), nbytes, _location(where, tensor.device.index), 0,
            driver.CUstream(stream.cuda_stream),
        ),
        f"cuMemPrefetchAsync(to {where})",
    )


def advise(tensor: torch.Tensor, preferred: str | None) -> None:
    """Mark ``tensor`` as accessed by its GPU (a mapping, so no fault storms when its pages
    are on the host) and set the preferred location (``"host"``/``"device"``/``None``)."""
    driver = _driver()
    ptr, nbytes = driver.CUdeviceptr(tensor.data_ptr()), tensor.numel() * tensor.element_size()
    advice = driver.CUmem_advise
    _check(driver.cuMemAdvise(ptr, nbytes, advice.CU_MEM_ADVISE_SET_ACCESSED_BY, _location("device", tensor.device.index)),
           "cuMemAdvise(SET_ACCESSED_BY)")
    if preferred is not None:
        _check(
            driver.cuMemAdvise(ptr, nbytes, advice.CU_MEM_ADVISE_SET_PREFERRED_LOCATION,
                               _location(preferred, tensor.device.index)),
            "cuMemAdvise(SET_PREFERRED_LOCATION)",
        )


def last_prefetch_location(tensor: torch.Tensor) -> str:
    """``"device"``, ``"host"`` or ``"invalid"``: where ``tensor`` was last prefetched
    (``cuMemRangeGetAttribute``; says nothing about whether the migration finished)."""
    driver = _driver()
    attrs = driver.CUmem_range_attribute
    ptr, nbytes = driver.CUdeviceptr(tensor.data_ptr()), tensor.numel() * tensor.element_size()
    try:
        value = _check(
            driver.cuMemRangeGetAttribute(4, attrs.CU_MEM_RANGE_ATTRIBUTE_LAST_PREFETCH_LOCATION_TYPE, ptr, nbytes),
            "cuMemRangeGetAttribute(LAST_PREFETCH_LOCATION_TYPE)",
        )
    except TypeError:
        # cuda-bindings 13.3 (seen on an H200 image) rejects the CUDA 13 location-type
        # attribute in its argument check; the older attribute gives a device ordinal, with
        # CU_DEVICE_CPU (-1) for the host and CU_DEVICE_INVALID (-2) for "never prefetched".
        value = _check(
            driver.cuMemRangeGetAttribute(4, attrs.CU_MEM_RANGE_ATTRIBUTE_LAST_PREFETCH_LOCATION, ptr, nbytes),
            "cuMemRangeGetAttribute(LAST_PREFETCH_LOCATION)",
        )
        ordinal = _as_int32(value)
        return "device" if ordinal >= 0 else ("host" if ordinal == -1 else "invalid")
    kind = _as_int32(value)
    types = driver.CUmemLocationType
    if kind == int(types.CU_MEM_LOCATION_TYPE_DEVICE):
        return "device"
    if kind in (int(types.CU_MEM_LOCATION_TYPE_HOST), int(types.CU_MEM_LOCATION_TYPE_HOST_NUMA)):
        return "host"
    return "invalid"


def _as_int32(value: object) -> int:
    """cuMemRangeGetAttribute's 4-byte result, whichever form the binding returns it in."""
    if isinstance(value, (bytes, bytearray, list, tuple)):
        return int.from_bytes(bytes(value)[:4], "little", signed=True)
    return int(value)


def device_free_bytes(device_index: int) -> int:
    """Free memory on the GPU (``cudaMemGetInfo``: a driver query, no stream synchronization)."""
    free, _total = torch.cuda.mem_get_info(device_index)
    return int(free)
