"""Backend selection: one entry point per operation, routed by the tensors' device type.

A backend is any object with the three operations of :class:`Backend`. The pure-torch
reference (:mod:`pagedopt.functional.reference`) serves every device; the native CPU library
and the NVRTC CUDA kernels register themselves for ``"cpu"`` and ``"cuda"`` when they load.
``PAGEDOPT_BACKEND=reference`` forces the reference everywhere (for debugging and for the
test suite's "native disabled" run).

Example:
    >>> from pagedopt.functional.dispatch import backend_for
    >>> import torch
    >>> backend_for(torch.device("meta")).name
    'reference'
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Callable, Protocol, Sequence

import torch

from . import reference
from .items import PrepareResult, UpdateItem
from .kinds import UpdateKind

FORCE_ENV = "PAGEDOPT_BACKEND"


class Backend(Protocol):
    """What every backend implements (see :mod:`pagedopt.functional.reference` for semantics)."""

    name: str

    def grad_norm_sq(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...

    def prepare(
        self, kind: UpdateKind, items: Sequence[UpdateItem], want_norms: bool
    ) -> list[PrepareResult]: ...

    def update(self, kind: UpdateKind, items: Sequence[UpdateItem]) -> None: ...


class _ReferenceBackend:
    name = "reference"
    grad_norm_sq = staticmethod(reference.grad_norm_sq)
    prepare = staticmethod(reference.prepare)
    update = staticmethod(reference.update)


REFERENCE: Backend = _ReferenceBackend()

# device type -> zero-argument loader returning a Backend, or None when unavailable.
_loaders: dict[str, Callable[[], Backend | None]] = {}
_resolved: dict[str, Backend] = {}


def register_backend(device_type: str, loader: Callable[[], Backend | None]) -> None:
    """Register a lazily-loaded backend for ``device_type`` (e.g. ``"cpu"``, ``"cuda"``)."""
    _loaders[device_type] = loader
    _resolved.pop(device_type, None)


def backend_for(device: torch.device) -> Backend:
    """The backend serving tensors on ``device`` (resolved once per device type)."""
    dtype = device.type
    if dtype in _resolved:
        return _resolved[dtype]
    backend: Backend | None = None
    if os.environ.get(FORCE_ENV, "").lower() != "reference" and dtype in _loaders:
        backend = _loaders[dtype]()
    _resolved[dtype] = backend or REFERENCE
    return _resolved[dtype]


def reset_backends() -> None:
    """Forget resolved backends (tests flip ``PAGEDOPT_BACKEND`` and call this)."""
    _resolved.clear()


def by_device(items: Sequence[UpdateItem]) -> dict[torch.device, list[UpdateItem]]:
    groups: dict[torch.device, list[UpdateItem]] = defaultdict(list)
    for item in items:
        groups[item.device].append(item)
    return groups


def grad_norm_sq(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """float64 squared norms of the finite gradient elements, one 0-d tensor per gradient."""
    out: list[torch.Tensor | None] = [None] * len(grads)
    positions: dict[torch.device, list[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        positions[g.device].append(i)
    for device, idx in positions.items():
        results = backend_for(device).grad_norm_sq([grads[i] for i in idx])
        for i, r in zip(idx, results):
            out[i] = r
    return out  # type: ignore[return-value]


def prepare(kind: UpdateKind, items: Sequence[UpdateItem], want_norms: bool) -> list[PrepareResult]:
    out: dict[int, PrepareResult] = {}
    for device, group in by_device(items).items():
        for item, result in zip(group, backend_for(device).prepare(kind, group, want_norms)):
            out[id(item)] = result
    return [out[id(item)] for item in items]


def update(kind: UpdateKind, items: Sequence[UpdateItem]) -> None:
    for device, group in by_device(items).items():
        backend_for(device).update(kind, group)
