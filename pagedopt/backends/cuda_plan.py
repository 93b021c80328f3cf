"""Host-side planning of CUDA launches: check items, group them, pack descriptors.

Everything here is plain torch/numpy on the host - no driver, no GPU - so CI tests it with
CPU tensors. The launcher (:mod:`pagedopt.backends.cuda`) turns a :class:`LaunchGroup` into
one kernel launch over all of its tensors.

* :func:`check_item` names the offending field of a bad :class:`UpdateItem`.
* :class:`Staged` swaps non-contiguous tensors for contiguous copies (kernels index memory
  linearly) and writes results back after the launch.
* :func:`pack_update_descs` / :func:`pack_norm_descs` fill the C structs of
  ``native/cuda/tiling.cuh`` (layouts in :mod:`~pagedopt.backends.cuda_layout`), including
  whether every base pointer is aligned for 16-byte vector access.
* :func:`chunk_prefix` maps the launch's global chunk index to tensors.

Example:
    >>> import numpy as np
    >>> from pagedopt.backends.cuda_plan import chunk_prefix
    >>> chunk_prefix([5000, 0, 2048], 2048).tolist()
    [0, 3, 3, 4]
"""

from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..functional.items import UpdateItem
from ..functional.kinds import UpdateKind
from ..functional.quantization import num_blocks
from .cuda_layout import CHUNK_ELEMS, FLAG_VECTOR_OK, NORM_DESC, REDUCE_CHUNK_ELEMS, STEP_SCALARS, TENSOR_DESC

VECTOR_BYTES = 16

ELEM_OF_DTYPE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def elem_of(dtype: torch.dtype) -> str | None:
    """Kernel element code of a parameter dtype, or None when no kernel handles it."""
    return ELEM_OF_DTYPE.get(dtype)


def mode_of(item: UpdateItem) -> str:
    if not item.quantized:
        return "state32"
    return "block8" if item.block_wise else "tensor8"


def kernel_handles(item: UpdateItem) -> bool:
    """Whether a CUDA kernel serves this item (else the reference does): the kernels take
    fp32/fp16/bf16 parameters with a gradient of the same dtype - all the optimizers
    produce. Mixed dtypes from direct functional calls run on the pure-torch reference."""
    return elem_of(item.param.dtype) is not None and item.grad.dtype == item.param.dtype


# --- checks ---------------------------------------------------------------------------------------


def _fail(index: int, name: str, problem: str) -> ValueError:
    return ValueError(f"update item {index}: {name} {problem}")


def _check_tensor(index: int, name: str, t: torch.Tensor | None, device: torch.device,
                  dtypes: tuple[torch.dtype, ...], numel: int | None) -> None:
    if t is None:
        raise _fail(index, name, "is None but the update needs it")
    if t.device != device:
        raise _fail(index, name, f"is on {t.device}, the parameter on {device}")
    if t.dtype not in dtypes:
        raise _fail(index, name, f"has dtype {t.dtype}, expected {' or '.join(str(d) for d in dtypes)}")
    if numel is not None and t.numel() != numel:
        raise _fail(index, name, f"has {t.numel()} elements, expected {numel}")


def check_item(kind: UpdateKind, item: UpdateItem, index: int, *, need_new_absmax: bool = False) -> None:
    """Raise a ValueError naming the field when ``item`` does not fit ``kind``'s kernels."""
    device, n = item.param.device, item.param.numel()
    moments = kind.state1_moments
    _check_tensor(index, "grad", item.grad, device, (item.param.dtype,), n)
    state_dtype = (torch.uint8,) if item.quantized else (torch.float32,)
    _check_tensor(index, "state1", item.state1, device, state_dtype, moments * n)
    if kind.num_states == 2:
        _check_tensor(index, "state2", item.state2, device, state_dtype, n)
    if item.quantized:
        blocks = num_blocks(n, item.block_wise)
        _check_tensor(index, "absmax1", item.absmax1, device, (torch.float32,), moments * blocks)
        if kind.num_states == 2:
            _check_tensor(index, "absmax2", item.absmax2, device, (torch.float32,), blocks)
        if need_new_absmax and not item.block_wise:
            _check_tensor(index, "new_absmax1", item.new_absmax1, device, (torch.float32,), moments)
            if kind.num_states == 2:
                _check_tensor(index, "new_absmax2", item.new_absmax2, device, (torch.float32,), 1)
    for name in ("gnorm_scale", "update_scale"):
        scale = getattr(item, name)
        if scale is not None:
            _check_tensor(index, name, scale, device, (torch.float32,), 1)


# --- staging of non-contiguous tensors -----------------------------------------------------------

_WRITTEN = ("param", "state1", "state2", "absmax1", "absmax2")
_READ_ONLY = ("grad", "new_absmax1", "new_absmax2")


@dataclass
class Staged:
    """Items whose tensors are all contiguous, and the copies to write back afterwards."""

    items: list[UpdateItem]
    write_back: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def finish(self) -> None:
        """Copy staged results into the caller's tensors (stream-ordered, no sync)."""
        for original, staged in self.write_back:
            original.copy_(staged)
        self.write_back.clear()


def stage(items: Sequence[UpdateItem], writes: bool) -> Staged:
    """Replace non-contiguous tensors by contiguous copies (kernels index linearly; states
    are laid out in the parameter's logical element order, as the reference reads them)."""
    staged = Staged([])
    for item in items:
        changes = {}
        for name in _WRITTEN + _READ_ONLY:
            t = getattr(item, name)
            if t is None or t.is_contiguous():
                continue
            copy = t.detach().contiguous()
            changes[name] = copy
            if writes and name in _WRITTEN:
                staged.write_back.append((t.detach(), copy))
        staged.items.append(dataclasses.replace(item, **changes) if changes else item)
    return staged


# --- descriptors -----------------------------------------------------------------------------------


def chunk_prefix(numels: Sequence[int], chunk_elems: int) -> np.ndarray:
    """int64 ``[n + 1]``: first global chunk of each tensor, and the total at the end."""
    counts = [(int(n) + chunk_elems - 1) // chunk_elems for n in numels]
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else int(t.data_ptr())


def _aligned(address: int, alignment: int) -> bool:
    return address % alignment == 0


def vector_ok(kind: UpdateKind, item: UpdateItem) -> bool:
    """Whether every base pointer the kernel reads or writes in vector groups is aligned.

    Groups hold VEC = 16 / sizeof(param) elements: parameters and gradients are read in
    16-byte accesses, float32 states in 16-byte accesses, uint8 codes in VEC-byte accesses.
    Chunk and group offsets are multiples of VEC elements, so base alignment is enough. The
    second moment of AdEMAMix starts ``numel`` elements into ``state1``.
    """
    n = item.param.numel()
    vec = VECTOR_BYTES // item.param.element_size()
    if not (_aligned(_ptr(item.param), VECTOR_BYTES) and _aligned(_ptr(item.grad), VECTOR_BYTES)):
        return False
    state_size = item.state1.element_size()
    state_align = VECTOR_BYTES if state_size == 4 else vec
    bases = [_ptr(item.state1) + k * n * state_size for k in range(kind.state1_moments)]
    if kind.num_states == 2:
        bases.append(_ptr(item.state2))
    return all(_aligned(b, state_align) for b in bases)


# StepScalars.astuple() deep-copies through dataclasses.astuple: ~10 us per item per step.
_scalar_fields = operator.attrgetter(*STEP_SCALARS.names)


def pack_update_descs(kind: UpdateKind, items: Sequence[UpdateItem]) -> np.ndarray:
    """One ``TensorDesc`` per item (all items contiguous and checked).

    Built row by row in one pass (field order of ``TENSOR_DESC``): this runs for every
    parameter on every step, and column-wise filling cost twice the host time.
    """
    rows = [
        (
            _ptr(item.param), _ptr(item.grad), _ptr(item.state1), _ptr(item.state2),
            _ptr(item.absmax1), _ptr(item.absmax2), _ptr(item.new_absmax1), _ptr(item.new_absmax2),
            _ptr(item.gnorm_scale), _ptr(item.update_scale), item.param.numel(),
            FLAG_VECTOR_OK if vector_ok(kind, item) else 0, 0, _scalar_fields(item.scalars), 0,
        )
        for item in items
    ]
    return np.array(rows, dtype=TENSOR_DESC) if rows else np.zeros(0, dtype=TENSOR_DESC)


def pack_norm_descs(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    descs = np.zeros(len(tensors), dtype=NORM_DESC)
    descs["data"] = [_ptr(t) for t in tensors]
    descs["numel"] = [t.numel() for t in tensors]
    descs["flags"] = [FLAG_VECTOR_OK if _aligned(_ptr(t), VECTOR_BYTES) else 0 for t in tensors]
    return descs


def launch_buffer(descs: np.ndarray, prefix: np.ndarray) -> tuple[np.ndarray, int]:
    """Descriptors followed by the chunk prefix (8-byte aligned) as one byte array, and the
    byte offset of the prefix - one host-to-device copy per launch."""
    desc_bytes = descs.view(np.uint8).reshape(-1)
    offset = (desc_bytes.size + 15) // 16 * 16
    out = np.zeros(offset + prefix.size * 8, dtype=np.uint8)
    out[: desc_bytes.size] = desc_bytes
    out[offset:] = prefix.astype(np.int64).view(np.uint8)
    return out, offset


# --- grouping -------------------------------------------------------------------------------------


def group_items(items: Sequence[UpdateItem]) -> dict[tuple[torch.device, str, str], list[int]]:
    """Item indices by (device, element type, state mode): one launch each."""
    groups: dict[tuple[torch.device, str, str], list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[(item.param.device, elem_of(item.param.dtype), mode_of(item))].append(i)
    return dict(groups)
