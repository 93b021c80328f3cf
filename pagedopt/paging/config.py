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


class PagingConfig(BaseModel):
    """Paging of optimizer state between device and host memory.

    Attributes:
        policy: ``on_demand`` (prefetch right before each update; the driver may evict under
            pressure), ``pipelined`` (prefetch the next ``prefetch_depth`` states on a side
            stream while the current one updates), ``offload`` (states live on the host
            between steps and stream through the device during the step), ``budgeted`` (at
            most ``device_budget_bytes`` of state resident, least recently used evicted).
        backend: ``managed`` (CUDA managed memory), ``host`` (plain host memory),
            ``simulated`` (host memory standing in for a device of ``simulated_capacity_bytes``),
            or ``auto`` (managed when CUDA with concurrent managed access is present, else host).
        device_budget_bytes: upper bound of device-resident state (``budgeted``; also caps
            ``offload``). Human sizes such as ``"2GiB"`` are accepted.
        reserve_free_bytes: pressure watermark: evict when free device memory drops below it.
        prefetch_depth: how many upcoming states ``pipelined`` prefetches.
        min_paged_numel: smaller state buffers are not paged (bitsandbytes uses 1e5).
        simulated_capacity_bytes: device capacity of the ``simulated`` backend.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["on_demand", "pipelined", "offload", "budgeted"] = "on_demand"
    backend: Literal["auto", "managed", "host", "simulated"] = "auto"
    device_budget_bytes: ByteSize | None = None
    reserve_free_bytes: ByteSize = 0
    prefetch_depth: int = Field(default=2, ge=1, le=64)
    min_paged_numel: int = Field(default=100_000, ge=0)
    simulated_capacity_bytes: ByteSize | None = None

    @model_validator(mode="after")
    def _budget_required(self) -> "PagingConfig":
        if self.policy == "budgeted" and self.device_budget_bytes is None:
            raise ValueError("policy 'budgeted' needs device_budget_bytes (e.g. '2GiB')")
        return self
