"""Values read when metrics are collected: pager counters, kernel compile statistics, device
memory and identity, build information.

Everything here is read defensively: the pager (``optimizer.pager``) and the CUDA backend
(``pagedopt.backends.cuda``) may be absent, older or newer; a missing source yields zeros or
nothing, never an exception in the training process.

**Pager contract** (:meth:`pagedopt.paging.pager.Pager.stats`). ``optimizer.pager.stats()``
returns a mapping with ``device_bytes``, ``host_bytes``, ``peak_device_bytes``,
``page_in_bytes``, ``page_out_bytes``, ``prefetch_stall_seconds`` (cumulative), optionally
``device_budget_bytes``, ``device_headroom_bytes``, ``oom_avoidance_actions`` (``{action:
count}``), and the transfers by direction (``in`` = host to device, ``out``) and reason
(:data:`pagedopt.telemetry.sink.REASONS`) as two nested mappings::

    "page_transfers_total": {"in": {"prefetch": 12, "demand": 1}, "out": {"budget": 3}},
    "page_transfer_bytes_total": {"in": {"prefetch": 49152, "demand": 4096}, "out": {...}},

Without the breakdown, ``page_in_bytes``/``page_out_bytes`` are reported with reason
``unspecified``.

**Kernel contract.** ``pagedopt.backends.cuda.compile_stats()`` (read only if that module is
already imported) returns ``compiles``, ``compile_seconds`` (total, or a list of per-compile
durations) and ``cache_hits``.

Example:
    >>> from pagedopt.telemetry.sources import normalize_pager_stats
    >>> s = normalize_pager_stats({"device_bytes": 10, "host_bytes": 5, "peak_device_bytes": 12,
    ...     "page_in_bytes": 8, "page_out_bytes": 4, "prefetch_stall_seconds": 0.5,
    ...     "page_transfers_total": {"in": {"prefetch": 2}, "out": {"budget": 1}},
    ...     "page_transfer_bytes_total": {"in": {"prefetch": 8}, "out": {"budget": 4}}})
    >>> sorted(s.transfers.items())
    [(('in', 'prefetch'), (2, 8)), (('out', 'budget'), (1, 4))]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from ..shards import local_tensor
from .sink import pager_of

log = logging.getLogger("pagedopt.telemetry")

_DIRECTIONS = {
    "in": "in", "h2d": "in", "host_to_device": "in", "page_in": "in", "to_device": "in",
    "out": "out", "d2h": "out", "device_to_host": "out", "page_out": "out", "to_host": "out",
}


@dataclass
class PagerStats:
    """The pager's counters, normalized."""

    device_bytes: int | None = None
    host_bytes: int | None = None
    peak_device_bytes: int | None = None
    device_budget_bytes: int | None = None
    device_headroom_bytes: int | None = None
    prefetch_stall_seconds: float = 0.0
    transfers: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # -> (count, bytes)
    oom_avoidance_actions: dict[str, int] = field(default_factory=dict)
    last_step_page_bytes: dict[str, int] = field(default_factory=dict)  # direction -> bytes
    copy_seconds: dict[str, float] = field(default_factory=dict)  # direction -> seconds
    thrash_transfers_total: int = 0
    thrash_bytes_total: int = 0
    staging_pool_bytes: int | None = None


def _as_mapping(obj: Any) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    as_dict = getattr(obj, "_asdict", None)
    if callable(as_dict):
        return as_dict()
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")} if hasattr(obj, "__dict__") else {}


def _transfers(stats: Mapping[str, Any]) -> dict[tuple[str, str], tuple[int, int]]:
    """``{(direction, reason): (count, bytes)}`` from the pager's nested counters."""
    counts = stats.get("page_transfers_total") or {}
    sizes = stats.get("page_transfer_bytes_total") or {}
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for direction in set(counts) | set(sizes):
        by_count, by_bytes = counts.get(direction, {}), sizes.get(direction, {})
        for reason in set(by_count) | set(by_bytes):
            out[(str(direction), str(reason))] = (int(by_count.get(reason, 0)), int(by_bytes.get(reason, 0)))
    if not out:
        for direction, key_bytes, key_count in (("in", "page_in_bytes", "page_ins_total"),
                                                ("out", "page_out_bytes", "page_outs_total")):
            if stats.get(key_bytes) is not None:
                out[(direction, "unspecified")] = (int(stats.get(key_count) or 0), int(stats[key_bytes]))
    return out


def _optional_int(stats: Mapping[str, Any], key: str) -> int | None:
    value = stats.get(key)
    return None if value is None else int(value)


def normalize_pager_stats(raw: Any) -> PagerStats:
    """:class:`PagerStats` from whatever ``pager.stats()`` returned (see the module docs)."""
    stats = _as_mapping(raw)
    actions = stats.get("oom_avoidance_actions")
    return PagerStats(
        device_bytes=_optional_int(stats, "device_bytes"),
        host_bytes=_optional_int(stats, "host_bytes"),
        peak_device_bytes=_optional_int(stats, "peak_device_bytes"),
        device_budget_bytes=_optional_int(stats, "device_budget_bytes"),
        device_headroom_bytes=_optional_int(stats, "device_headroom_bytes"),
        prefetch_stall_seconds=float(stats.get("prefetch_stall_seconds") or 0.0),
        transfers=_transfers(stats),
        oom_avoidance_actions={str(k): int(v) for k, v in actions.items()} if isinstance(actions, Mapping) else {},
        last_step_page_bytes=_number_map(stats.get("last_step_page_bytes"), int),
        copy_seconds=_number_map(stats.get("copy_seconds_total"), float),
        thrash_transfers_total=int(stats.get("thrash_transfers_total") or 0),
        thrash_bytes_total=int(stats.get("thrash_bytes_total") or 0),
        staging_pool_bytes=_optional_int(stats, "staging_pool_bytes"),
    )


def _number_map(value: Any, kind: type) -> dict[str, Any]:
    return {str(k): kind(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


@dataclass
class ControllerStats:
    """The memory controller's readings (summed over its devices) and recoveries by phase.

    Example:
        >>> ControllerStats(free_bytes=10).recoveries
        {}
    """

    free_bytes: int | None = None
    target_free_bytes: int | None = None
    recoveries: dict[str, int] = field(default_factory=dict)


def read_controller_stats(optimizer: Any) -> ControllerStats | None:
    """``optimizer.memory_controller``'s readings, or ``None`` without a controller."""
    controller = getattr(optimizer, "memory_controller", None)
    if controller is None:
        return None
    out = ControllerStats(recoveries={"optimizer.step": 0, "forward/backward": 0})  # exported from the start
    for reading in dict(getattr(controller, "last", {})).values():
        for attr, key in (("free_bytes", "free_bytes"), ("target_free_bytes", "target_free_bytes")):
            if reading.get(key) is not None:
                setattr(out, attr, (getattr(out, attr) or 0) + int(reading[key]))
    for record in list(getattr(controller, "recoveries", [])):
        phase = str(record.get("phase", "unknown"))
        out.recoveries[phase] = out.recoveries.get(phase, 0) + 1
    return out


def read_pager_stats(optimizer: Any) -> PagerStats | None:
    """The optimizer's pager statistics, or ``None`` without a pager (or if ``stats()``
    fails - logged once per failure type)."""
    stats = getattr(pager_of(optimizer), "stats", None)
    if not callable(stats):
        return None
    try:
        return normalize_pager_stats(stats())
    except Exception as e:  # noqa: BLE001 - telemetry must never stop training; logged
        _warn_once(f"pager.stats() failed ({type(e).__name__}: {e}); pager metrics keep their last values")
        return None


@dataclass
class KernelStats:
    compiles: int = 0
    compile_seconds: float = 0.0
    durations: list[float] | None = None  # per compile, when the backend keeps them
    cache_hits: int = 0


def normalize_kernel_stats(raw: Any) -> KernelStats:
    stats = _as_mapping(raw)
    seconds = stats.get("compile_seconds", 0.0)
    durations = None
    if isinstance(seconds, Iterable) and not isinstance(seconds, (str, bytes)):
        durations = [float(x) for x in seconds]
        seconds = sum(durations)
    compiles = stats.get("compiles", stats.get("compile_count"))
    return KernelStats(
        compiles=int(compiles) if compiles is not None else (len(durations) if durations is not None else 0),
        compile_seconds=float(seconds or 0.0),
        durations=durations,
        cache_hits=int(stats.get("cache_hits", 0) or 0),
    )


def read_kernel_stats(module_name: str = "pagedopt.backends.cuda") -> KernelStats | None:
    """The CUDA backend's compile statistics, if that backend is loaded in this process."""
    module = sys.modules.get(module_name)
    fn = getattr(module, "compile_stats", None) or getattr(module, "stats", None)
    if not callable(fn):
        return None
    try:
        return normalize_kernel_stats(fn())
    except Exception as e:  # noqa: BLE001 - telemetry must never stop training; logged
        _warn_once(f"{module_name}.compile_stats() failed ({type(e).__name__}: {e})")
        return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    key = message.split("(")[0]
    if key not in _warned:
        _warned.add(key)
        log.warning("pagedopt telemetry: %s", message)


# -- devices ---------------------------------------------------------------------------------


def optimizer_device(optimizer: Any) -> torch.device:
    """The device of the optimizer's first parameter (CPU if it has none)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            return local_tensor(p).device
    return torch.device("cpu")


def gpu_uuid(index: int) -> str:
    """The GPU's UUID as DCGM writes it (``GPU-xxxxxxxx-...``), or "" if unknown."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return ""
    text = str(uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


def device_labels(device: torch.device) -> dict[str, str]:
    """Labels of ``pagedopt_device_info``: the device, and for a GPU its index, name and
    UUID (``gpu`` and ``UUID`` are spelled as dcgm-exporter spells them, to join on)."""
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"device": f"cuda:{index}", "gpu": str(index), "UUID": gpu_uuid(index),
                "model_name": torch.cuda.get_device_name(index)}
    return {"device": str(device), "gpu": "", "UUID": "", "model_name": platform.processor() or platform.machine()}


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_memory(device: torch.device) -> tuple[int | None, int | None, int | None]:
    """(used, total, free) bytes of the device memory the optimizer state competes for.

    CUDA: memory reserved by torch's caching allocator, the device's capacity, and what is
    still free for torch (driver free memory + reserved-but-unallocated). CPU: this process's
    resident set, physical memory, and available memory (``MemAvailable``).
    """
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        reserved = torch.cuda.memory_reserved(index)
        return reserved, total, free + reserved - torch.cuda.memory_allocated(index)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    used = None
    try:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        used = None
    return used, total, _meminfo("MemAvailable")


def device_budget(optimizer: Any, pager: PagerStats | None, device_state_bytes: int,
                  device: torch.device) -> tuple[int | None, int | None]:
    """(budget, headroom) bytes for optimizer state on the device.

    The budget is the pager's, else the optimizer's ``PagingConfig.device_budget_bytes``,
    else the device's capacity. Headroom is the pager's, else budget minus the state resident
    on the device for an explicit budget, else what the device can still give torch minus
    ``reserve_free_bytes``.
    """
    if pager is not None and pager.device_budget_bytes is not None:
        used = pager.device_bytes if pager.device_bytes is not None else device_state_bytes
        headroom = pager.device_headroom_bytes
        return pager.device_budget_bytes, headroom if headroom is not None else pager.device_budget_bytes - used
    paging = getattr(optimizer, "paging", None)
    reserve = int(getattr(paging, "reserve_free_bytes", 0) or 0)
    budget = getattr(paging, "device_budget_bytes", None)
    if budget is not None:
        return int(budget), int(budget) - device_state_bytes
    _, total, free = device_memory(device)
    return total, (free - reserve) if free is not None else None


def build_labels() -> dict[str, str]:
    from .. import __version__

    return {
        "version": __version__,
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda or "none"),
        "python_version": platform.python_version(),
    }
