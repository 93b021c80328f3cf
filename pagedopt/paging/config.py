"""PagingConfig: how a paged optimizer places its state (validated with pydantic).

Example:
    >>> from pagedopt.paging.config import PagingConfig
    >>> PagingConfig(policy="budgeted", device_budget_bytes="2GiB").device_budget_bytes
    2147483648
    >>> from pydantic import ValidationError
    >>> try:
    ...     PagingConfig(policy="sometimes")
    ... except ValidationError as e:
    ...     print(e.errors()[0]["loc"])
    ('policy',)
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: object) -> object:
    """``"2GiB"`` -> 2147483648, ``"1.5 GB"`` -> 1500000000; ints pass through unchanged."""
    if isinstance(value, str):
        m = _SIZE.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a byte size: {value!r} (examples: 1048576, '512MiB', '2GiB', '1.5GB')")
        number = float(m.group(1)) * _UNITS[m.group(2).lower()]
        if number != int(number):
            raise ValueError(f"byte size {value!r} is not a whole number of bytes")
        return int(number)
    return value


ByteSize = Annotated[int, BeforeValidator(parse_bytes), Field(ge=0)]


POLICIES = ("on_demand", "pipelined", "offload", "budgeted")
BACKENDS = ("auto", "managed", "host", "simulated")


class PagingConfig(BaseModel):
    """Paging of optimizer state between device and host memory.

    Every field is validated; sizes accept integers or human strings (``"512MiB"``,
    ``"2GiB"``, ``"1.5GB"``). Unknown fields are rejected, so a typo cannot silently
    disable paging.

    Attributes:
        policy: ``on_demand`` (page a state in right before its update; it stays on the
            device until the budget, the pressure watermark or the driver moves it),
            ``pipelined`` (as ``on_demand``, and the next ``prefetch_depth`` states are
            prefetched on a side stream while the current ones update), ``offload`` (states
            live on the host between steps and stream through the device during the step,
            ``prefetch_depth`` ahead), ``budgeted`` (at most ``device_budget_bytes`` of state
            stays resident across steps; the least recently used state is evicted).
        backend: ``managed`` (CUDA managed memory through cuda-python; CUDA parameters),
            ``host`` (plain host memory, for CPU training: the state never moves),
            ``simulated`` (host memory standing in for a device of
            ``simulated_capacity_bytes``: the same decisions and accounting as a real device,
            with real copies between a "device" pool and a host pool; CPU parameters), or
            ``auto`` (``managed`` for CUDA parameters when the GPU supports concurrent
            managed access, ``host`` for CPU parameters).
        device_budget_bytes: upper bound of device-resident paged state, per device
            (required by ``budgeted``; caps every other policy when given). Unpaged state
            (parameters below ``min_paged_numel``, absmax, quantization maps) is not counted. A single parameter whose
            state is larger than the budget still streams through the device alone (a
            one-parameter overdraft, counted in ``stats()["budget_overdrafts_total"]``).
        reserve_free_bytes: pressure watermark: when free device memory falls below it,
            the pager evicts least recently used state (and pages in no more than needed).
            0 disables the check (and the free-memory query on CUDA).
        prefetch_depth: how many parameters ahead ``pipelined``, ``offload`` and
            ``budgeted`` prefetch, in the order the step visits them.
        min_paged_numel: parameters with fewer elements keep their state unpaged on their
            own device (bitsandbytes pages parameters of at least 1e5 elements).
        simulated_capacity_bytes: capacity of the ``simulated`` device (``None``: unlimited,
            useful to measure what a run would need).
        eviction: which resident state makes room: ``next_use`` (the default: the state
            needed farthest in the future, from the order the step visits parameters, and a
            prefetch never evicts state that stayed resident from the previous step; with a
            budget of half the state about half pages in per step) or ``lru`` (least recently
            used; with a budget below the total state it evicts exactly the state the next
            step needs first, so every byte moves every step).
        transfer: how state moves. ``staged`` (host home + device staging pool, explicit
            copies: pinned memory and dedicated copy streams on CUDA), ``migrate`` (managed
            memory migration on CUDA; a fresh allocation and copy per move on the simulated
            device), or ``auto``: ``staged`` for ``offload`` and ``budgeted``, ``migrate`` for
            ``on_demand`` and ``pipelined`` (where the driver's migration is the point).
            ``backend="managed"`` always migrates managed memory.
        chunk_bytes: largest single copy of a staged transfer (larger buffers are copied in
            pieces).
        managed_advise: apply cuMemAdvise hints to managed state (accessed-by the GPU; host
            as preferred location for ``offload`` and ``budgeted``). Off leaves placement to
            the driver's defaults.
        warn_on_fallback: emit a :class:`~pagedopt.paging.PagingFallbackWarning` when an
            allocation fails and the pager falls back (counted in ``stats()`` either way).

    Example:
        >>> from pagedopt.paging.config import PagingConfig
        >>> cfg = PagingConfig(policy="offload", backend="simulated",
        ...                    simulated_capacity_bytes="64MiB", prefetch_depth=1)
        >>> cfg.simulated_capacity_bytes, cfg.device_budget_bytes
        (67108864, None)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["on_demand", "pipelined", "offload", "budgeted"] = "on_demand"
    backend: Literal["auto", "managed", "host", "simulated"] = "auto"
    device_budget_bytes: ByteSize | None = None
    reserve_free_bytes: ByteSize = 0
    prefetch_depth: int = Field(default=2, ge=1, le=64)
    min_paged_numel: int = Field(default=100_000, ge=0)
    simulated_capacity_bytes: ByteSize | None = None
    eviction: Literal["lru", "next_use"] = "next_use"
    transfer: Literal["auto", "staged", "migrate"] = "auto"
    chunk_bytes: ByteSize = Field(default=64 * 2**20, ge=4096)
    managed_advise: bool = True
    warn_on_fallback: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "PagingConfig":
        if self.policy == "budgeted" and self.device_budget_bytes is None:
            raise ValueError("policy 'budgeted' needs device_budget_bytes (e.g. '2GiB')")
        if self.device_budget_bytes == 0 and self.policy == "budgeted":
            raise ValueError(
                "device_budget_bytes=0 leaves no room for state under policy 'budgeted'; "
                "use policy 'offload' to keep all state on the host between steps"
            )
        if self.simulated_capacity_bytes is not None:
            if self.backend != "simulated":
                raise ValueError(
                    f"simulated_capacity_bytes is only used by backend='simulated' (backend is {self.backend!r})"
                )
            capacity = self.simulated_capacity_bytes
            if self.device_budget_bytes is not None and self.device_budget_bytes > capacity:
                raise ValueError(
                    f"device_budget_bytes ({self.device_budget_bytes}) exceeds simulated_capacity_bytes "
                    f"({capacity}): the budget could never be used"
                )
            if self.reserve_free_bytes >= capacity > 0:
                raise ValueError(
                    f"reserve_free_bytes ({self.reserve_free_bytes}) must be below simulated_capacity_bytes "
                    f"({capacity}), or no state could ever be resident"
                )
        return self


class MemoryConfig(BaseModel):
    """The memory controller: a free-memory headroom to hold on each device, and OOM recovery.

    Attributes:
        target_free_bytes: free device memory to keep (allocator-cached memory counts as
            free); the paged state's resident budget goes down when free memory is below it
            and up when above it.
        target_free_fraction: the same as a fraction of the device's total memory (give one
            of the two; neither: no headroom target, the controller only recovers from OOM).
        min_budget_bytes: the resident budget never goes below this (0: all state may leave).
        max_budget_bytes: ... nor above this (``None``: no cap besides free memory).
        oom_budget_factor: after an out-of-memory recovery the budget becomes this fraction
            of the bytes that were resident.
        retry_oom: a guarded step retries once after an out-of-memory error (``False``: it
            recovers memory and re-raises).

    Example:
        >>> from pagedopt.paging.config import MemoryConfig
        >>> MemoryConfig(target_free_bytes="2GiB").target_free_bytes
        2147483648
        >>> from pydantic import ValidationError
        >>> try:
        ...     MemoryConfig(target_free_bytes="1GiB", target_free_fraction=0.1)
        ... except ValidationError as e:
        ...     print("one of")
        one of
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_free_bytes: ByteSize | None = None
    target_free_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    min_budget_bytes: ByteSize = 0
    max_budget_bytes: ByteSize | None = None
    oom_budget_factor: float = Field(default=0.5, ge=0.0, lt=1.0)
    retry_oom: bool = True

    @model_validator(mode="after")
    def _one_target(self) -> "MemoryConfig":
        if self.target_free_bytes is not None and self.target_free_fraction is not None:
            raise ValueError("give target_free_bytes or target_free_fraction, not both")
        if self.max_budget_bytes is not None and self.max_budget_bytes < self.min_budget_bytes:
            raise ValueError(
                f"max_budget_bytes ({self.max_budget_bytes}) is below min_budget_bytes ({self.min_budget_bytes})"
            )
        return self

    def target_for(self, total_bytes: int | None) -> int | None:
        """The headroom in bytes for a device of ``total_bytes`` (``None``: no target)."""
        if self.target_free_bytes is not None:
            return self.target_free_bytes
        if self.target_free_fraction is not None and total_bytes is not None:
            return int(self.target_free_fraction * total_bytes)
        return None
