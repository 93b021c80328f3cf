"""``pagedopt train --memory-limit``: cap the job's device memory, print the plan and the peak.

The limit counts everything on the device: torch's allocator is capped with
``torch.cuda.set_per_process_memory_fraction`` and CUDA managed memory (which that cap does
not see) gets the rest as the pager's device budget. Staged paging (``offload``,
``budgeted``) stages through ordinary device memory, already under the allocator cap, so there
the whole limit goes to the allocator. A paged optimizer gets a
:class:`~pagedopt.paging.MemoryController` that holds 5% of the limit free (measured against
the cap, not the card) and recovers from out-of-memory errors in the step (the loop runs each
step through :meth:`MemoryJob.run_step`).

On the CPU there is no device to cap: the plan and the peak are printed (the peak is the
optimizer state's resident bytes), which is what the tests check.

Example:
    >>> import torch, pagedopt
    >>> from pagedopt.train.memory import MemoryJob
    >>> model = torch.nn.Linear(64, 64)
    >>> opt = pagedopt.AdamW8bit(model.parameters())
    >>> job = MemoryJob.setup(2**30, model, opt, torch.device("cpu"))
    >>> "AdamW8bit" in job.plan_text()
    True
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..paging.controller import MemoryController, MemorySample, pagers_of
from ..paging.estimate import Plan, family_of, plan
from ..paging.pager import Pager
from ..paging.staged import StagedMover

HEADROOM_FRACTION = 0.05


def _uses_managed(optimizer: Any) -> bool:
    return any(m.kind == "managed" for p in pagers_of(optimizer) for m in p._device_movers())


class MemoryJob:
    """The memory side of one training run under ``--memory-limit`` (see the module docstring).

    Args:
        limit: device bytes the job may use.
        optimizer: the job's optimizer.
        device: the job's device.
        estimate: the :func:`~pagedopt.paging.estimate.plan` for the model.

    Example:
        >>> import torch, pagedopt
        >>> model = torch.nn.Linear(8, 8)
        >>> job = MemoryJob.setup(1 << 20, model, pagedopt.AdamW8bit(model.parameters()), torch.device("cpu"))
        >>> job.controller is None
        True
    """

    def __init__(self, limit: int, optimizer: Any, device: torch.device, estimate: Plan) -> None:
        self.limit = limit
        self.optimizer = optimizer
        self.device = device
        self.estimate = estimate
        self.allocator_cap: int | None = None
        self.managed_budget: int | None = None
        self.controller: MemoryController | None = None

    @classmethod
    def setup(cls, limit: int, model: torch.nn.Module, optimizer: Any, device: torch.device) -> "MemoryJob":
        """Cap the allocator, give the pager its budget, attach a controller (paged optimizers)."""
        numels = [p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
        name = type(optimizer).__name__
        try:
            family = family_of(name)
        except ValueError:
            family = "adamw"  # torch's AdamW baseline: the 32-bit rows apply
        dtype = "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32"
        job = cls(limit, optimizer, device, plan(numels, limit, optimizer=family, param_dtype=dtype,
                                                  headroom_fraction=HEADROOM_FRACTION))
        pagers = pagers_of(optimizer)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            total = torch.cuda.get_device_properties(index).total_memory
            if limit > total:
                raise ValueError(f"--memory-limit {limit} bytes exceeds the device's {total} bytes")
            managed = _uses_managed(optimizer)
            job.managed_budget = limit // 4 if managed else None  # managed state: outside the cap
            job.allocator_cap = limit - (job.managed_budget or 0)
            torch.cuda.set_per_process_memory_fraction(job.allocator_cap / total, index)
            for pager in pagers:
                if managed:
                    pager.set_budget(job.managed_budget // max(1, len(pagers)))
        if pagers:
            sampler = job._sample if device.type == "cuda" else None
            job.controller = MemoryController(
                optimizer,
                {"target_free_bytes": int(HEADROOM_FRACTION * limit),
                 "max_budget_bytes": job.managed_budget if job.managed_budget is not None else limit},
                sampler=sampler,
            )
        return job

    def _sample(self, key: str, pagers: list[Pager]) -> MemorySample:
        """Free memory under the allocator cap (the card's free memory does not see the cap)."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        active = torch.cuda.memory_allocated(index)
        reserved = torch.cuda.memory_reserved(index)
        cap = self.allocator_cap if self.allocator_cap is not None else self.limit
        return MemorySample(max(0, cap - active), self.limit, reserved, active)

    def run_step(self, fn: Callable[[], Any]) -> Any:
        """One training step, guarded against out-of-memory errors when a controller exists."""
        return self.controller.run_step(fn) if self.controller is not None else fn()

    def plan_text(self) -> str:
        """The memory plan: the estimate for the chosen optimizer next to the alternatives."""
        from ..commands.plan import table

        name = type(self.optimizer).__name__
        lines = [f"memory limit {self.limit / 2**30:.2f} GiB"
                 + (f" (allocator cap {self.allocator_cap / 2**30:.2f} GiB"
                    + (f", managed state budget {self.managed_budget / 2**30:.2f} GiB" if self.managed_budget else "")
                    + ")" if self.allocator_cap is not None else ""),
                 table(self.estimate)]
        mine = [o for o in self.estimate.options if o.optimizer == name]
        if mine:
            lines.append(f"this run: {name} ({'fits' if any(o.fits for o in mine) else 'does NOT fit'} by the estimate)")
        return "\n".join(lines)

    def peak(self) -> dict[str, int]:
        """Peak bytes: the allocator's (CUDA), the paged state's on the device, and the total."""
        out: dict[str, int] = {}
        if self.device.type == "cuda":
            out["allocator_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        pagers = pagers_of(self.optimizer)
        paged_peak = sum(p.stats()["peak_device_bytes"] for p in pagers)
        staged = any(isinstance(m, StagedMover) for p in pagers for m in p._device_movers())
        # staged state is allocator memory (already in the allocator's peak); managed is not
        out["paged_state_peak_bytes"] = paged_peak
        out["device_peak_bytes"] = out.get("allocator_peak_bytes", 0) + (0 if staged else paged_peak)
        if self.controller is not None:
            out["oom_recoveries"] = self.controller.oom_recoveries_total
        return out

    def peak_text(self) -> str:
        p = self.peak()
        parts = [f"device peak {p['device_peak_bytes'] / 2**30:.3f} GiB of {self.limit / 2**30:.2f} GiB"]
        if "allocator_peak_bytes" in p:
            parts.append(f"allocator {p['allocator_peak_bytes'] / 2**30:.3f} GiB")
        parts.append(f"paged state on device {p['paged_state_peak_bytes'] / 2**20:.1f} MiB")
        if "oom_recoveries" in p:
            parts.append(f"OOM recoveries {p['oom_recoveries']}")
        return "memory: " + ", ".join(parts)
