"""A planned native CPU launch: the C item array of many parameters, built once, run every step.

:class:`~pagedopt.backends.cpu.CpuBackend` marshals each :class:`UpdateItem` into a C struct
on every call (about 10 us of Python per parameter). A step plan
(:mod:`pagedopt.optim.plan`) instead builds the struct array once for a set of parameters
that share their step scalars, and each step only rewrites what changes, with array-wide
numpy assignments (no Python loop over parameters): the step scalars (lr, bias corrections,
...) and - when the gradient tensors were replaced, as with ``zero_grad(set_to_none=True)``
- the gradient pointers. The kernels and their results are exactly the backend's.

Only items the native call takes directly are planned: CPU float32/float16/bfloat16
tensors, contiguous, and a gradient scale (percentile clipping) or update scale (trust
ratio) only as a float32 scalar whose storage the plan keeps and rewrites, tensor-wise 8-bit
state only with its new scales in such buffers (:func:`plannable`,
:mod:`pagedopt.optim.launch_clipping`, :mod:`pagedopt.optim.launch_prepare`, which runs a
:class:`CpuPrepareLaunch` before the update). Everything else keeps the per-item backend path.

Example:
    >>> import torch
    >>> from pagedopt.backends import cpu, cpu_plan
    >>> from pagedopt.functional.items import UpdateItem
    >>> from pagedopt.functional.kinds import kind_for
    >>> from pagedopt.functional.scalars import step_scalars
    >>> kind = kind_for("lion")
    >>> p, g, m = torch.ones(4), torch.ones(4), torch.zeros(4)
    >>> item = UpdateItem(p, g, m, None, None, None, step_scalars(kind, {"lr": 0.1, "betas": (0.9, 0.99)}, 1))
    >>> lib = cpu.library()
    >>> launch = cpu_plan.CpuLaunch(lib, kind, [item]) if lib is not None else None
    >>> launch is None or (launch.run(None, item.scalars) or round(p[0].item(), 4))
    0.9
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import numpy as np
import torch

from ..functional import nonfinite_tally
from ..functional.items import UpdateItem
from ..functional.kinds import UpdateKind
from ..functional.scalars import StepScalars
from .cpu import NativeLibrary
from .cpu_items import _SCALAR_NAMES, DTYPE_CODES, _c_item, _CItem, _CPrepareOut, _Staging, prepare_columns


def plannable(item: UpdateItem) -> bool:
    """Whether ``item`` can join a planned native launch (see the module docstring)."""
    tensors = [item.param, item.grad, item.state1, item.state2, item.absmax1, item.absmax2]
    return (
        item.param.dtype in DTYPE_CODES
        and item.grad.dtype in DTYPE_CODES
        and item.fixed_gnorm_scale
        and item.fixed_update_scale
        and (item.block_wise or not item.quantized or item.fixed_new_absmax)
        and all(t is None or (t.is_cpu and t.is_contiguous()) for t in tensors)
    )


_NUMPY_TYPES = {
    ctypes.c_void_p: np.uint64,
    ctypes.c_int64: np.int64,
    ctypes.c_int32: np.int32,
    ctypes.c_float: np.float32,
    ctypes.c_double: np.float64,
}


def _numpy_dtype(struct: type) -> np.dtype:
    """The numpy structured dtype with ``struct``'s field names, offsets and size (numpy
    cannot read the PEP 3118 format ctypes gives for nested structures)."""
    names, formats, offsets = [], [], []
    for name, ctype in struct._fields_:
        names.append(name)
        formats.append(_numpy_dtype(ctype) if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure)
                       else _NUMPY_TYPES[ctype])
        offsets.append(getattr(struct, name).offset)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": ctypes.sizeof(struct)})


class _PlannedItems:
    """The C item array of a fixed list of items, built once; :meth:`_refresh` rewrites the
    gradient pointers (``grad_ptrs``: None when the gradient tensors are the ones of the
    previous run or of construction, else one ``data_ptr()`` per item) and the step scalars."""

    def __init__(self, lib: NativeLibrary, kind: UpdateKind, items: Sequence[UpdateItem], updating: bool):
        staging = _Staging()
        self.lib = lib
        self.algorithm = int(kind.algorithm)
        self.count = len(items)
        self.c_items = (_CItem * self.count)(*[_c_item(kind, item, staging, updating=updating) for item in items])
        if staging.keep or staging.write_back:
            raise ValueError(f"{type(self).__name__} takes only contiguous items (check plannable() first)")
        self._view = np.frombuffer(self.c_items, dtype=_numpy_dtype(_CItem))
        self._scalar_dtype = self._view.dtype["scalars"]
        self._last_scalars: StepScalars | None = None

    def _refresh(self, grad_ptrs: Sequence[int] | None, scalars: StepScalars) -> None:
        if grad_ptrs is not None:
            self._view["grad"] = np.asarray(grad_ptrs, dtype=np.uint64)
        if scalars is not self._last_scalars:
            record = np.array(tuple(getattr(scalars, n) for n in _SCALAR_NAMES), dtype=self._scalar_dtype)
            self._view["scalars"] = record
            self._last_scalars = scalars


class CpuLaunch(_PlannedItems):
    """One ``po_update`` call over a fixed list of items, rebuilt by the plan when it changes.

    ``run(grad_ptrs, scalars)``: ``grad_ptrs`` is ``None`` when the gradient tensors are the
    ones of the previous run (or of construction), else one ``data_ptr()`` per item.
    """

    def __init__(self, lib: NativeLibrary, kind: UpdateKind, items: Sequence[UpdateItem]):
        super().__init__(lib, kind, items, updating=True)
        self._skipped = ctypes.c_int64(0)  # po_update's count of NaN/Inf gradient elements
        self._skipped_address = ctypes.addressof(self._skipped)

    def run(self, grad_ptrs: Sequence[int] | None, scalars: StepScalars) -> None:
        if not self.count:
            return
        self._refresh(grad_ptrs, scalars)
        status = self.lib.po_update(self.algorithm, self.c_items, self.count, torch.get_num_threads(),
                                    self._skipped_address)
        self.lib.check(status, "update")
        nonfinite_tally.report(self._skipped.value)


class CpuPrepareLaunch(_PlannedItems):
    """One ``po_prepare`` call (the pass before the update that trust ratios and tensor-wise
    8-bit state need) over a fixed list of items. ``run(grad_ptrs, scalars)`` returns the
    float32 ``[n, 3]`` maxima (state1's moments, state2) and float64 ``[n, 2]`` squared norms
    (update, parameter) of :func:`~pagedopt.backends.cpu_items.prepare_columns`; the norms
    only when built with ``want_norms``."""

    def __init__(self, lib: NativeLibrary, kind: UpdateKind, items: Sequence[UpdateItem], want_norms: bool):
        super().__init__(lib, kind, items, updating=False)
        self.want_norms = int(want_norms)
        self._outs = (_CPrepareOut * self.count)()

    def run(self, grad_ptrs: Sequence[int] | None, scalars: StepScalars) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count:
            self._refresh(grad_ptrs, scalars)
            status = self.lib.po_prepare(self.algorithm, self.c_items, self.count, self.want_norms, self._outs,
                                         torch.get_num_threads())
            self.lib.check(status, "prepare")
        return prepare_columns(self._outs, self.count)
