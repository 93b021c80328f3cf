"""Helpers shared by the paging tests: identical training runs, exact comparisons, and a
watcher that checks the pager's invariants after every transition."""

from __future__ import annotations

from typing import Any, Sequence

import torch

import pagedopt
from pagedopt.paging import Pager, PagingConfig

SHAPES = [(60, 70), (4097,), (1,), (33, 64), (0,), (25, 70)]


def make_params(shapes: Sequence[tuple[int, ...]] = SHAPES, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def set_grads(params, step: int, skip: Sequence[int] = ()) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        p.grad = None if i in skip else g


def train(opt, params, steps: int, start: int = 0, skip: Sequence[int] = ()) -> None:
    for step in range(start, start + steps):
        set_grads(params, step, skip)
        opt.step()


def make_pair(name: str, paging: PagingConfig | dict, shapes=SHAPES, dtype=torch.float32, **kwargs):
    """(unpaged optimizer, its params, paged optimizer, its params) with equal initial params."""
    kwargs.setdefault("min_8bit_size", 16)
    ref_params = make_params(shapes, dtype)
    paged_params = make_params(shapes, dtype)
    ref = getattr(pagedopt, name)(ref_params, **kwargs)
    paged = getattr(pagedopt, name)(paged_params, paging=paging, **kwargs)
    return ref, ref_params, paged, paged_params


def assert_identical(ref, ref_params, paged, paged_params) -> None:
    """Bit-identical parameters and state tensors (paging moves bytes, it never changes them)."""
    for i, (a, b) in enumerate(zip(ref_params, paged_params)):
        assert torch.equal(a, b), f"parameter {i} differs"
        sa, sb = ref.state.get(a, {}), paged.state.get(b, {})
        assert set(sa) == set(sb), f"parameter {i}: state keys {set(sa)} != {set(sb)}"
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert sb[key].dtype == value.dtype and torch.equal(sb[key].cpu(), value.cpu()), f"param {i} {key} differs"
            else:
                assert sb[key] == value, f"param {i} {key}: {sb[key]} != {value}"


class InvariantWatch:
    """Checks after every pager transition and every simulated-device change that the
    device holds at most the budget - or, while one parameter overdraws, only that
    parameter's state - and records the order of page-ins."""

    def __init__(self, pager: Pager, budget: int | None) -> None:
        self.pager = pager
        self.budget = budget
        self.transitions = 0
        self.max_device_bytes = 0
        self.page_in_order: list[tuple[torch.Tensor, str]] = []
        pager.add_observer(self._on_transition)
        if pager.simulated_device is not None:
            pager.simulated_device.add_observer(self._on_device_change)

    def _resident_params(self) -> set[int]:
        return {id(p) for p, _key, _n in self.pager.resident()}

    def _state_bytes_of(self, pid: int) -> int:
        return sum(n for p, _k, n in self.pager.paged_buffers() if id(p) == pid)

    def _check(self, device_bytes: int) -> None:
        self.max_device_bytes = max(self.max_device_bytes, device_bytes)
        if self.budget is None or device_bytes <= self.budget:
            return
        resident = self._resident_params()
        assert len(resident) <= 1, f"{device_bytes} bytes on the device > budget {self.budget} with {len(resident)} parameters"
        if resident:
            limit = self._state_bytes_of(next(iter(resident)))
            assert device_bytes <= limit, f"overdraft of {device_bytes} bytes > the parameter's state {limit}"

    def _on_transition(self, pager: Pager, event: str) -> None:
        self.transitions += 1
        self._check(pager.device_bytes)
        if event == "in":
            self.page_in_order.append(pager.last_moved)

    def _on_device_change(self, device: Any) -> None:
        self._check(device.used_bytes - device.foreign_bytes)


def total_state_bytes(opt, keys=("state1", "state2")) -> int:
    return sum(
        s[k].numel() * s[k].element_size() for s in opt.state.values() for k in keys if isinstance(s.get(k), torch.Tensor)
    )
