"""A planned CUDA launch: descriptors packed once per plan, reused every step.

The CUDA backend (:class:`~pagedopt.backends.cuda.CudaBackend`) packs a ``TensorDesc`` per
parameter on every call. A step plan (:mod:`pagedopt.optim.plan`) instead packs them once
per launch group (one kernel launch per element type and state mode, as the backend does)
and each step only rewrites, with whole-array numpy assignments, the step scalars (the same
for every descriptor of the group) and - when the gradient tensors were replaced - the
gradient pointers and the 16-byte-alignment flags; then one host-to-device copy per launch
and the launch itself, on the current stream. The kernels, arguments and results are the
backend's.

Only items the kernels take directly are planned (:func:`plannable`): fp32/fp16/bf16
parameters with gradients of the same dtype, contiguous, block-wise 8-bit or 32-bit state,
no clipping or trust-ratio scale. The scalars stay inside the descriptors, so this is not
yet replayable as a CUDA graph (that needs them in a device buffer; see docs/step.md).

Example:
    >>> import torch  # doctest: +SKIP
    >>> from pagedopt.backends.cuda_prepared import CudaLaunch  # doctest: +SKIP
    >>> launch = CudaLaunch(backend, kind, items); launch.run(None, scalars)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from ..functional.items import UpdateItem
from ..functional.kinds import UpdateKind
from ..functional.scalars import StepScalars
from . import cuda_catalog, cuda_plan
from .cuda_layout import FLAG_VECTOR_OK, STEP_SCALARS, TENSOR_DESC


def plannable(item: UpdateItem) -> bool:
    """Whether ``item`` can join a prepared CUDA launch (see the module docstring)."""
    tensors = [item.param, item.grad, item.state1, item.state2, item.absmax1, item.absmax2]
    return (
        cuda_plan.kernel_handles(item)
        and item.gnorm_scale is None
        and item.update_scale is None
        and (item.block_wise or not item.quantized)
        and all(t is None or t.is_contiguous() for t in tensors)
    )


class _Group:
    """One kernel launch: the packed descriptor + prefix bytes and where the items sit."""

    def __init__(self, launcher: Any, kind: UpdateKind, elem: str, mode: str, items: list[UpdateItem],
                 positions: list[int]) -> None:
        self.launcher = launcher
        self.positions = np.asarray(positions, dtype=np.int64)  # index of each item in the launch's list
        prefix = cuda_plan.chunk_prefix([it.param.numel() for it in items], cuda_plan.CHUNK_ELEMS)
        descs = cuda_plan.pack_update_descs(kind, items)
        self.host, self.offset = cuda_plan.launch_buffer(descs, prefix)
        self.descs = self.host[: descs.nbytes].view(TENSOR_DESC)  # writable view into the bytes
        # Vector access allowed by every pointer but the gradient's (the parameter stands in
        # for it: same dtype and size); each step ANDs in the gradient's own alignment.
        self.vector_ok = np.array([cuda_plan.vector_ok(kind, dataclasses.replace(it, grad=it.param)) for it in items],
                                  dtype=bool)
        grads = np.array([it.grad.data_ptr() for it in items], dtype=np.uint64)
        self.descs["flags"] = np.where(self.vector_ok & (grads % cuda_plan.VECTOR_BYTES == 0), FLAG_VECTOR_OK, 0)
        self.count = len(items)
        self.work_units = int(prefix[-1])
        self.program = cuda_catalog.optimizer_program(kind.algorithm, elem)
        self.spec = cuda_catalog.update_kernel(kind.algorithm, elem, mode)

    def run(self, grad_ptrs: np.ndarray | None, record: np.ndarray) -> None:
        descs = self.descs
        if grad_ptrs is not None:
            ptrs = grad_ptrs[self.positions]
            descs["grad"] = ptrs
            aligned = (ptrs % cuda_plan.VECTOR_BYTES) == 0
            descs["flags"] = np.where(self.vector_ok & aligned, FLAG_VECTOR_OK, 0)
        descs["scalars"] = record
        launcher = self.launcher
        with launcher.guard():
            buffer = launcher.to_device(torch.from_numpy(self.host))
            base = buffer.data_ptr()
            kernel = launcher.kernel(self.program, self.spec)
            launcher.launch(kernel, self.work_units, None,
                            (base, base + self.offset, self.count, launcher.maps.data_ptr(), launcher.luts.data_ptr()))
            del buffer  # the caching allocator reuses it only for later work on this stream


class CudaLaunch:
    """Prepared update launches over a fixed list of items (see the module docstring).

    ``backend`` is a :class:`~pagedopt.backends.cuda.CudaBackend` (its per-device launchers
    run the kernels). ``run(grad_ptrs, scalars)`` as :class:`~pagedopt.backends.cpu_plan.CpuLaunch`.
    """

    def __init__(self, backend: Any, kind: UpdateKind, items: Sequence[UpdateItem]):
        self.groups: list[_Group] = []
        for (device, elem, mode), positions in cuda_plan.group_items(items).items():
            live = [p for p in positions if items[p].param.numel() > 0]
            if live:
                for p in live:
                    cuda_plan.check_item(kind, items[p], p)
                self.groups.append(_Group(backend._device(device), kind, elem, mode, [items[p] for p in live], live))
        self._last_scalars: StepScalars | None = None
        self._record: np.ndarray | None = None

    def run(self, grad_ptrs: Sequence[int] | None, scalars: StepScalars) -> None:
        if scalars is not self._last_scalars:
            self._record = np.array(cuda_plan._scalar_fields(scalars), dtype=STEP_SCALARS)
            self._last_scalars = scalars
        ptrs = np.asarray(grad_ptrs, dtype=np.uint64) if grad_ptrs is not None else None
        for group in self.groups:
            group.run(ptrs, self._record)
