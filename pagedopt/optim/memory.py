"""``optimizer.memory_report()``: what the optimizer state costs, parameter by parameter.

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(256, 64)
    >>> opt = pagedopt.AdamW8bit(model.named_parameters())
    >>> model(torch.randn(2, 256)).sum().backward(); opt.step()
    >>> report = opt.memory_report()
    >>> [(r.name, r.precision, r.state_bytes) for r in report.rows]
    [('weight', '8bit-blockwise', 33280), ('bias', '32bit', 512)]
    >>> report.fp32_equivalent_bytes
    131584
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .state_io import STATE_TENSOR_KEYS, local_tensor


def precision_of(state: Mapping[str, Any], block_wise: bool) -> str:
    """``"8bit-blockwise"``, ``"8bit-tensorwise"`` or ``"32bit"`` for a parameter's state."""
    s1 = state.get("state1")
    if isinstance(s1, torch.Tensor) and s1.dtype == torch.uint8:
        return "8bit-blockwise" if block_wise else "8bit-tensorwise"
    return "32bit"


@dataclass
class MemoryRow:
    """One parameter's state: bytes of every state tensor it owns (qmaps are shared)."""

    name: str
    numel: int
    precision: str
    state_bytes: int
    residency: str
    state_elements: int = 1  # state values per parameter element (Adam 2, AdEMAMix 3)


@dataclass
class MemoryReport:
    """Rows plus totals; ``str(report)`` is a table."""

    rows: list[MemoryRow] = field(default_factory=list)
    shared_bytes: int = 0  # the quantization maps, shared by all parameters on a device

    @property
    def total_bytes(self) -> int:
        return sum(r.state_bytes for r in self.rows) + self.shared_bytes

    @property
    def bytes_by_precision(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.rows:
            out[r.precision] += r.state_bytes
        return dict(out)

    @property
    def bytes_by_residency(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.rows:
            out[r.residency] += r.state_bytes
        return dict(out)

    @property
    def fp32_equivalent_bytes(self) -> int:
        """What the same states would take in float32 (4 bytes per state element)."""
        return sum(4 * r.numel * r.state_elements for r in self.rows)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [9])
        lines = [f"{'parameter':<{width}}  {'numel':>12}  {'precision':<16}  {'state bytes':>14}  residency"]
        for r in self.rows:
            lines.append(f"{r.name:<{width}}  {r.numel:>12,}  {r.precision:<16}  {r.state_bytes:>14,}  {r.residency}")
        lines.append(f"{'shared (qmaps)':<{width}}  {'':>12}  {'':<16}  {self.shared_bytes:>14,}")
        lines.append(f"{'total':<{width}}  {sum(r.numel for r in self.rows):>12,}  {'':<16}  {self.total_bytes:>14,}")
        return "\n".join(lines)


class MemoryReportMixin:
    """``memory_report()`` (mixed into :class:`~pagedopt.optim.Optimizer8bit`)."""

    def memory_report(self) -> MemoryReport:
        """One row per parameter: name, numel, state precision, state bytes, residency.

        Under FSDP2 each rank reports its own shards (numel and bytes of the local part)."""
        self._sync_overrides()
        rows = []
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                state = self.state.get(p)
                if not state:
                    continue
                tensors = [state[k] for k in STATE_TENSOR_KEYS if isinstance(state.get(k), torch.Tensor)]
                rows.append(
                    MemoryRow(
                        name=self._param_name(group, gindex, pindex),
                        numel=local_tensor(p).numel(),  # this rank's shard under FSDP2, like the bytes
                        precision=precision_of(state, self._settings(group, p)["block_wise"]),
                        state_bytes=sum(t.numel() * t.element_size() for t in tensors),
                        residency=self.state_store.residency(p, state),
                        state_elements=self.kind.num_states + self.kind.state1_moments - 1,
                    )
                )
        shared = sum(q.numel() * q.element_size() for q in self._qmaps.values())
        return MemoryReport(rows=rows, shared_bytes=shared)
