"""ctypes mirrors of the native CPU library's structs, and the marshalling of update items.

:mod:`pagedopt.backends.cpu` (per call) and :mod:`pagedopt.backends.cpu_plan` (prepared
launches) turn :class:`~pagedopt.functional.items.UpdateItem` objects into ``po_item``
structs here: shape and dtype checks (the C side trusts every pointer and length), contiguous
stand-ins for strided tensors, and the step scalars converted once per distinct value.

Example:
    >>> import ctypes
    >>> from pagedopt.backends.cpu_items import _CItem, _CStepScalars
    >>> ctypes.sizeof(_CItem) > ctypes.sizeof(_CStepScalars)
    True
"""

from __future__ import annotations

import ctypes
import dataclasses
from typing import Any

import torch

from ..functional.items import UpdateItem
from ..functional.kinds import UpdateKind
from ..functional.quantization import num_blocks
from ..functional.scalars import StepScalars

# torch dtype -> ElemType of native/include/pagedopt/common.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ---- C structs (mirror native/cpu/pagedopt_cpu.h) ------------------------------------------


def _scalar_fields() -> list[tuple[str, Any]]:
    kinds = {"float": ctypes.c_float, "int": ctypes.c_int32}
    return [(f.name, kinds[f.type if isinstance(f.type, str) else f.type.__name__]) for f in dataclasses.fields(StepScalars)]


class _CStepScalars(ctypes.Structure):
    _fields_ = _scalar_fields()


_SCALAR_NAMES = tuple(name for name, _ in _CStepScalars._fields_)


# step_scalars() memoizes by value, so the parameters of a group share one StepScalars per
# step: convert each once. (Keyed by id, holding the object: an id cannot be reused while
# cached. Assigning the struct to an item copies it, so sharing it is safe.)
_c_scalars_cache: dict[int, tuple[StepScalars, "_CStepScalars"]] = {}


def _c_scalars(s: StepScalars) -> _CStepScalars:
    hit = _c_scalars_cache.get(id(s))
    if hit is not None and hit[0] is s:
        return hit[1]
    # (not dataclasses.astuple: it deep-copies)
    converted = _CStepScalars(*[getattr(s, name) for name in _SCALAR_NAMES])
    if len(_c_scalars_cache) >= 1024:
        _c_scalars_cache.clear()
    _c_scalars_cache[id(s)] = (s, converted)
    return converted


class _CItem(ctypes.Structure):
    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("state1", ctypes.c_void_p),
        ("state2", ctypes.c_void_p),
        ("absmax1", ctypes.c_void_p),
        ("absmax2", ctypes.c_void_p),
        ("new_absmax1", ctypes.c_void_p),
        ("new_absmax2", ctypes.c_void_p),
        ("gnorm_scale", ctypes.c_void_p),
        ("update_scale", ctypes.c_void_p),
        ("numel", ctypes.c_int64),
        ("param_dtype", ctypes.c_int32),
        ("grad_dtype", ctypes.c_int32),
        ("quantized", ctypes.c_int32),
        ("block_wise", ctypes.c_int32),
        ("scalars", _CStepScalars),
    ]


class _CPrepareOut(ctypes.Structure):
    _fields_ = [
        ("max1", ctypes.c_float * 2),
        ("max2", ctypes.c_float),
        ("reserved", ctypes.c_int32),
        ("unorm_sq", ctypes.c_double),
        ("pnorm_sq", ctypes.c_double),
    ]


def prepare_columns(outs: ctypes.Array, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """po_prepare's ``n`` outputs as two tables read in one copy each (not a tensor per field
    per item): float32 ``[n, 3]`` (max1[0], max1[1], max2) and float64 ``[n, 2]`` (unorm_sq,
    pnorm_sq), laid out as _CPrepareOut says (checked, so a layout change cannot go unseen)."""
    if n == 0:
        return torch.zeros(0, 3), torch.zeros(0, 2, dtype=torch.float64)
    raw = torch.frombuffer(outs, dtype=torch.uint8)
    f32 = raw.view(torch.float32).view(n, _PREPARE_OUT_SIZE // 4)[:, _MAX_COLUMNS].clone()
    f64 = raw.view(torch.float64).view(n, _PREPARE_OUT_SIZE // 8)[:, _NORM_COLUMNS].clone()
    return f32, f64


_PREPARE_OUT_SIZE = ctypes.sizeof(_CPrepareOut)
assert _PREPARE_OUT_SIZE == 32 and _CPrepareOut.max2.offset == 8 and _CPrepareOut.unorm_sq.offset == 16
assert _CPrepareOut.pnorm_sq.offset == 24
_MAX_COLUMNS = slice(0, 3)  # float32 words 0-2: max1[0], max1[1], max2
_NORM_COLUMNS = slice(2, 4)  # float64 words 2-3: unorm_sq, pnorm_sq


# ---- marshalling ---------------------------------------------------------------------------


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None and t.numel() > 0 else None


class _Staging:
    """Contiguous stand-ins for strided tensors, copied back after the call."""

    def __init__(self) -> None:
        self.keep: list[torch.Tensor] = []
        self.write_back: list[tuple[torch.Tensor, torch.Tensor]] = []

    def read(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_contiguous():
            t = t.detach().contiguous()
            self.keep.append(t)
        return t

    def read_float32(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.float32 or not t.is_contiguous():
            t = t.detach().to(torch.float32).contiguous()
            self.keep.append(t)
        return t

    def read_write(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_contiguous():
            return t
        t = t.detach()
        work = t.contiguous()
        self.write_back.append((t, work))
        return work

    def scalar(self, t: torch.Tensor | None, name: str) -> int | None:
        if t is None:
            return None
        if t.numel() != 1:
            raise ValueError(f"{name} must be a 0-d float32 tensor, got shape {tuple(t.shape)}")
        if t.dtype != torch.float32 or not t.is_cpu:
            t = t.detach().to(device="cpu", dtype=torch.float32)
            self.keep.append(t)
        return t.data_ptr()

    def finish(self) -> None:
        for original, work in self.write_back:
            original.copy_(work)


def _supported(item: UpdateItem) -> bool:
    return item.param.dtype in DTYPE_CODES and item.grad.dtype in DTYPE_CODES


def _expect_numel(t: torch.Tensor | None, numel: int, name: str, dtype: torch.dtype) -> None:
    if t is None:
        raise ValueError(f"UpdateItem.{name} is None but the update needs it")
    if t.numel() != numel:
        raise ValueError(f"UpdateItem.{name} has {t.numel()} elements, expected {numel}")
    if t.dtype != dtype:
        raise ValueError(f"UpdateItem.{name} has dtype {t.dtype}, expected {dtype}")
    if not t.is_cpu:
        raise ValueError(f"UpdateItem.{name} is on {t.device}, expected cpu")


def _check_item(kind: UpdateKind, item: UpdateItem, updating: bool) -> None:
    """Shape/dtype checks: the C side trusts every pointer and length."""
    numel = item.param.numel()
    if item.grad.numel() != numel:
        raise ValueError(f"UpdateItem.grad has {item.grad.numel()} elements, the parameter {numel}")
    state_dtype = torch.uint8 if item.quantized else torch.float32
    moments = kind.state1_moments
    _expect_numel(item.state1, numel * moments, "state1", state_dtype)
    if kind.num_states == 2:
        _expect_numel(item.state2, numel, "state2", state_dtype)
    if not item.quantized:
        return
    blocks = num_blocks(numel, item.block_wise)
    _expect_numel(item.absmax1, blocks * moments, "absmax1", torch.float32)
    if kind.num_states == 2:
        _expect_numel(item.absmax2, blocks, "absmax2", torch.float32)
    if updating and not item.block_wise:
        for name, count in (("new_absmax1", moments), ("new_absmax2", 1))[: kind.num_states]:
            given = getattr(item, name)
            # any float dtype, like the reference (a sharded run may hand in reduced maxima)
            _expect_numel(given, count, name, given.dtype if given is not None and given.is_floating_point() else torch.float32)


def _c_item(kind: UpdateKind, item: UpdateItem, staging: _Staging, updating: bool) -> _CItem:
    _check_item(kind, item, updating)
    rw = staging.read_write if updating else staging.read
    c = _CItem()
    c.param = _ptr(rw(item.param))
    c.grad = _ptr(staging.read(item.grad))
    c.state1 = _ptr(rw(item.state1))
    c.state2 = _ptr(rw(item.state2)) if item.state2 is not None else None
    if item.quantized:
        c.absmax1 = _ptr(rw(item.absmax1))
        c.absmax2 = _ptr(rw(item.absmax2)) if item.absmax2 is not None else None
        if updating and not item.block_wise:
            c.new_absmax1 = _ptr(staging.read_float32(item.new_absmax1))
            if item.new_absmax2 is not None:
                c.new_absmax2 = _ptr(staging.read_float32(item.new_absmax2))
    c.gnorm_scale = staging.scalar(item.gnorm_scale, "gnorm_scale")
    c.update_scale = staging.scalar(item.update_scale, "update_scale")
    c.numel = item.param.numel()
    c.param_dtype = DTYPE_CODES[item.param.dtype]
    c.grad_dtype = DTYPE_CODES[item.grad.dtype]
    c.quantized = int(item.quantized)
    c.block_wise = int(item.block_wise)
    c.scalars = _c_scalars(item.scalars)
    return c
