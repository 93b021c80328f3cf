"""Optimizer state of sharded (DTensor / FSDP2) parameters: global sums and checkpoint layouts.

Under FSDP2 every parameter is a DTensor and each rank updates only its local shard. Three
things must still be *global* for the numerics to equal a single-process run:

* **Precision.** Whether a parameter gets 8-bit state is decided by its global ``numel``
  (the optimizer asks ``p.numel()``, which a DTensor answers globally), never by the shard.
* **Sums and maxima.** Percentile clipping needs each parameter's global gradient norm, LAMB
  and LARS the global update and parameter norms, tensor-wise 8-bit state the global absmax.
  :func:`all_reduce_over_shards` turns the shard-local values of *all* parameters into global
  ones with one collective per process group and kind of value (stack, all-reduce, split):
  not one per parameter. Only mesh dimensions on which a parameter is ``Shard``-ed are
  reduced: a replicated dimension (HSDP) or a plain tensor is never double-counted.
* **Checkpoints.** The live state (``optimizer.state[p]``) holds shard-local tensors, because
  that is what the kernels take (bitsandbytes hands DTensors to raw kernels and crashes).
  :func:`checkpoint_state` presents them as DTensors with the parameter's mesh and placements,
  which is what ``torch.distributed.checkpoint`` (DCP) needs to save and *reshard*;
  :func:`local_state` turns any saved form back into local tensors.

The 8-bit state's quantization blocks (256 elements, one absmax each) are cut from the
*local* shard, so they line up with a world-size-independent grid only in some layouts.
What a checkpoint holds for each parameter:

=========================================  ==========================================  =======================
state                                      in ``state_dict()``                         on load at another size
=========================================  ==========================================  =======================
32-bit                                     fp32 DTensor, the parameter's placements    exact
8-bit tensor-wise (``block_wise=False``)   uint8 codes DTensor + the absmax (one per   exact (the absmax is
                                           tensor, equal on every rank)                global)
8-bit block-wise, sharded on dim 0 only,   uint8 codes DTensor + absmax DTensor shaped exact (every local
rows of a multiple of 256 elements         ``[dim0, row / 256]``, sharded like dim 0   block is a global block)
any other 8-bit state                      fp32 DTensor of the dequantized values      re-quantized on the new
                                                                                       local blocks
=========================================  ==========================================  =======================

The last row's error bound: each element moves to the nearest code of the new block, so
``|loaded - saved| <= (half the widest gap of the map) * new_absmax`` where ``new_absmax`` is
the largest ``|saved|`` in the new block (:func:`requantization_bound`); with the dynamic
maps that is below 0.8% of the block's largest value (signed map 0.00703, unsigned 0.00352).
The same layouts load into a single process (``get_optimizer_state_dict(...,
full_state_dict=True)``) and a single-process checkpoint loads into a sharded optimizer.

Example:
    >>> import torch
    >>> from pagedopt.distributed.sharding import all_reduce_over_shards, is_sharded
    >>> p = torch.zeros(3)  # a plain tensor is replicated: nothing to reduce
    >>> is_sharded(p), all_reduce_over_shards([p], [torch.tensor(2.0)], "sum")
    (False, [tensor(2.)])
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any, Mapping, Sequence

import torch

from ..functional.kinds import UpdateKind
from ..functional.qmap import dynamic_map, is_canonical_map
from ..functional.quantization import BLOCK_SIZE, dequantize, num_blocks, quantize, quantize_with_absmax

Tensor = torch.Tensor


# --- DTensor helpers -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _dtensor_type() -> type | None:
    """torch's DTensor class, or None on builds without torch.distributed."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: Any) -> bool:
    """True for a DTensor (a parameter managed by FSDP2 / tensor parallelism)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _shard_mesh_dims(p: Any, name: str = "parameter") -> tuple[int, ...]:
    """Mesh dimensions on which ``p`` is split (the ones a sum must run over)."""
    dims = []
    for mesh_dim, placement in enumerate(p.placements):
        if placement.is_shard():
            dims.append(mesh_dim)
        elif placement.is_partial():
            raise ValueError(
                f"{name} has a Partial placement on mesh dimension {mesh_dim}; "
                "optimizer state needs Shard or Replicate parameters (redistribute it first)"
            )
    return tuple(dims)


# --- batched global reductions -----------------------------------------------------------------


_OPS = ("sum", "max")


def all_reduce_over_shards(params: Sequence[Any], values: Sequence[Tensor], op: str) -> list[Tensor]:
    """Global sums (``op="sum"``) or maxima (``op="max"``) of per-parameter shard-local values.

    ``values[i]`` belongs to ``params[i]``. Values of sharded parameters are grouped by (mesh,
    sharded mesh dimensions, device, dtype); each group is concatenated and all-reduced once
    per sharded mesh dimension, then split back. Values of plain tensors and of mesh
    dimensions that only replicate are returned unchanged, so nothing is counted twice.
    Every rank must call this with the same parameters in the same order (the optimizer
    does: FSDP2 gives every rank a gradient for the same parameters).
    """
    if op not in _OPS:
        raise ValueError(f"op={op!r}: expected one of {_OPS}")
    if len(params) != len(values):
        raise ValueError(f"{len(params)} parameters but {len(values)} values")
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        if not is_sharded(p):
            continue
        dims = _shard_mesh_dims(p)
        if dims:
            groups[(p.device_mesh, dims, values[i].device, values[i].dtype)].append(i)
    out = list(values)
    if not groups:
        return out
    import torch.distributed as dist

    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    for (mesh, dims, _, _), idx in groups.items():
        flat = torch.cat([values[i].detach().reshape(-1) for i in idx])
        for mesh_dim in dims:
            dist.all_reduce(flat, op=reduce_op, group=mesh.get_group(mesh_dim))
        pieces = flat.split([values[i].numel() for i in idx])
        for i, piece in zip(idx, pieces):
            out[i] = piece.reshape(values[i].shape)
    return out


# --- where a parameter's state lives -----------------------------------------------------------


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, running = [], 1
    for size in reversed(tuple(shape)):
        strides.append(running)
        running *= max(int(size), 1)
    return tuple(reversed(strides))


def _shift_placement(placement: Any, by: int) -> Any:
    """The placement of a state with ``by`` extra leading dimensions (AdEMAMix's (2, *shape))."""
    if not placement.is_shard() or by == 0:
        return placement
    split_factor = getattr(placement, "split_factor", None)
    if split_factor is not None:  # _StridedShard (FSDP2 on top of tensor parallelism)
        return type(placement)(placement.dim + by, split_factor=split_factor)
    return type(placement)(placement.dim + by)


class ShardLayout:
    """How one DTensor parameter is split, and how its state tensors follow it.

    Example (a world of one rank, so the shard is the whole tensor)::

        layout = ShardLayout(model.weight)        # model.weight is a DTensor
        layout.wrap(local_state_tensor)           # DTensor with the parameter's placements
    """

    def __init__(self, param: Any, name: str = "parameter"):
        if not is_sharded(param):
            raise TypeError(f"{name} is not a DTensor")
        self.name = name
        self.mesh = param.device_mesh
        self.placements = tuple(param.placements)
        _shard_mesh_dims(param, name)
        self.global_shape = tuple(param.shape)
        local = param.to_local()
        self.local_shape = tuple(local.shape)
        self.device = local.device

    @property
    def is_split(self) -> bool:
        return self.global_shape != self.local_shape

    @property
    def row_numel(self) -> int:
        n = 1
        for size in self.global_shape[1:]:
            n *= size
        return n

    @property
    def rows_aligned(self) -> bool:
        """True when every local 256-block is also a block of the global tensor, at any
        world size: split only along dim 0 (contiguous rows) and rows of 256k elements."""
        if not self.global_shape:
            return False
        plain_dim0 = all(
            not pl.is_shard() or (pl.dim == 0 and getattr(pl, "split_factor", None) is None)
            for pl in self.placements
        )
        return plain_dim0 and self.row_numel > 0 and self.row_numel % BLOCK_SIZE == 0

    def state_placements(self, moments: int) -> tuple[Any, ...]:
        extra = 1 if moments > 1 else 0
        return tuple(_shift_placement(pl, extra) for pl in self.placements)

    def state_shape(self, moments: int, local: bool = False) -> tuple[int, ...]:
        shape = self.local_shape if local else self.global_shape
        return (moments, *shape) if moments > 1 else tuple(shape)

    def rows_absmax_shape(self, moments: int, local: bool = False) -> tuple[int, ...]:
        """Shape of a rows-aligned absmax: ``[moments?, dim0, row / 256]``."""
        shape = self.local_shape if local else self.global_shape
        rows = (shape[0], self.row_numel // BLOCK_SIZE)
        return (moments, *rows) if moments > 1 else rows

    def wrap(self, local: Tensor, moments: int = 1, global_shape: Sequence[int] | None = None) -> Any:
        """A DTensor view of ``local`` with the parameter's mesh and (shifted) placements."""
        from torch.distributed.tensor import DTensor

        shape = tuple(global_shape) if global_shape is not None else self.state_shape(moments)
        return DTensor.from_local(
            local,
            self.mesh,
            self.state_placements(moments),
            run_check=False,
            shape=torch.Size(shape),
            stride=_contiguous_strides(shape),
        )

    def localize(self, t: Tensor, key: str, moments: int = 1, global_shape: Sequence[int] | None = None) -> Tensor:
        """This rank's part of a saved state tensor: a DTensor (from DCP or
        ``set_optimizer_state_dict``) or a full tensor (a full or single-process state dict)."""
        shape = tuple(global_shape) if global_shape is not None else self.state_shape(moments)
        placements = self.state_placements(moments)
        if is_sharded(t):
            if t.device_mesh == self.mesh and tuple(t.placements) == placements and tuple(t.shape) == shape:
                return t.to_local().to(self.device)
            t = t.full_tensor()
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{self.name}: saved {key} has shape {tuple(t.shape)}, expected the global shape {shape}"
            )
        t = t.detach().to(self.device)
        if tuple(shape) == tuple(self._local_of(shape, moments)):
            return t
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank holds the full tensor and cuts its own part (no traffic).
        return distribute_tensor(t, self.mesh, placements, src_data_rank=None).to_local()

    def _local_of(self, shape: Sequence[int], moments: int) -> tuple[int, ...]:
        if tuple(shape) == self.state_shape(moments):
            return self.state_shape(moments, local=True)
        if self.rows_aligned and tuple(shape) == self.rows_absmax_shape(moments):
            return self.rows_absmax_shape(moments, local=True)
        return tuple(shape)


# --- checkpoint export -------------------------------------------------------------------------


def _moments_of(kind: UpdateKind, index: int) -> int:
    return kind.state1_moments if index == 1 else 1


def _per_moment(t: Tensor, moments: int) -> list[Tensor]:
    return list(t.reshape(moments, -1).unbind(0)) if moments > 1 else [t.reshape(-1)]


def checkpoint_state(
    param: Any, state: Mapping[str, Any], kind: UpdateKind, block_wise: bool, name: str = "parameter"
) -> dict[str, Any]:
    """The state-dict form of a sharded parameter's live state (see the module's table).

    Keys stay flat (no ``__bnb_optimizer_quant_state__`` nesting), so they equal the live
    state's keys: ``get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)``
    rebuilds state entries from exactly those keys. Tensors are views where possible (DCP
    loads into them in place); the dequantized fallback is a fresh fp32 tensor.
    """
    layout = ShardLayout(param, name)
    state_keys = {f"state{i}" for i in range(1, kind.num_states + 1)}
    quant_keys = {f"{k}{i}" for k in ("absmax", "qmap") for i in range(1, kind.num_states + 1)}
    out = {k: v for k, v in state.items() if k not in state_keys and k not in quant_keys}
    for index in range(1, kind.num_states + 1):
        key, moments = f"state{index}", _moments_of(kind, index)
        tensor = state.get(key)
        if tensor is None:
            continue
        if tensor.dtype != torch.uint8:
            out[key] = layout.wrap(tensor, moments)
            continue
        absmax, qmap = state[f"absmax{index}"], state.get(f"qmap{index}")
        if not block_wise:
            out[key], out[f"absmax{index}"] = layout.wrap(tensor, moments), absmax
        elif layout.rows_aligned:
            local_rows = absmax.reshape(layout.rows_absmax_shape(moments, local=True))
            out[key] = layout.wrap(tensor, moments)
            out[f"absmax{index}"] = layout.wrap(local_rows, moments, layout.rows_absmax_shape(moments))
        else:
            signed = kind.state_signed[index - 1]
            values = _dequantize_moments(tensor, absmax, signed, True, moments)
            out[key] = layout.wrap(values, moments)
            continue
        if qmap is not None:
            out[f"qmap{index}"] = qmap
    return out


def _dequantize_moments(
    codes: Tensor, absmax: Tensor, signed: bool, block_wise: bool, moments: int, qmap: Tensor | None = None
) -> Tensor:
    scales = absmax.reshape(moments, -1)
    values = [
        dequantize(c, a, signed=signed, block_wise=block_wise, qmap=qmap)
        for c, a in zip(_per_moment(codes, moments), scales)
    ]
    return torch.stack(values).reshape(codes.shape)


# --- checkpoint import -------------------------------------------------------------------------


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if is_sharded(t) else t


def _saved_block_wise(absmax: Tensor, numel_per_moment: int, moments: int, key: str, name: str) -> bool:
    per_moment = absmax.numel() // max(moments, 1)
    if per_moment == num_blocks(numel_per_moment, True):
        return True
    if per_moment == 1:
        return False
    raise ValueError(
        f"{name}: saved {key} has {per_moment} absmax values per state, expected "
        f"{num_blocks(numel_per_moment, True)} (block-wise) or 1 (tensor-wise)"
    )


def _local_codes(
    layout: ShardLayout,
    codes: Tensor,
    absmax: Tensor,
    index: int,
    moments: int,
    block_wise: bool,
) -> tuple[Tensor, Tensor] | None:
    """(local codes, local absmax) when the saved blocks are blocks of this rank's grid."""
    numel = 1
    for size in layout.global_shape:
        numel *= size
    saved_bw = _saved_block_wise(absmax, numel, moments, f"absmax{index}", layout.name)
    if saved_bw != block_wise:
        return None
    key = f"state{index}"
    if not block_wise:
        local_absmax = _full(absmax).detach().to(layout.device).float().reshape(moments, 1)
        return layout.localize(codes, key, moments), local_absmax.reshape(-1) if moments == 1 else local_absmax
    if not layout.is_split:
        local_codes = layout.localize(codes, key, moments)
        full_absmax = _full(absmax).detach().to(layout.device).float()
        return local_codes, full_absmax.reshape(moments, -1) if moments > 1 else full_absmax.reshape(-1)
    if not layout.rows_aligned:
        return None
    rows_shape = layout.rows_absmax_shape(moments)
    if not is_sharded(absmax):
        absmax = absmax.reshape(rows_shape)
    local_absmax = layout.localize(absmax.float(), f"absmax{index}", moments, rows_shape)
    shape = (moments, -1) if moments > 1 else (-1,)
    return layout.localize(codes, key, moments), local_absmax.reshape(shape)


def _quantize_local(
    layout: ShardLayout, param: Any, values: Tensor, signed: bool, moments: int, block_wise: bool
) -> tuple[Tensor, Tensor]:
    """8-bit codes of this rank's values on its own block grid; a tensor-wise absmax is the
    global maximum (one all-reduce), so every rank quantizes with the same scale."""
    parts = _per_moment(values.float(), moments)
    if block_wise:
        pairs = [quantize(v, signed=signed, block_wise=True) for v in parts]
        codes = torch.stack([c for c, _ in pairs]).reshape(values.shape)
        absmax = torch.stack([a for _, a in pairs])
        return codes, absmax if moments > 1 else absmax.reshape(-1)
    local_max = torch.stack(
        [v.abs().max() if v.numel() else v.new_zeros(()) for v in parts]
    )
    (global_max,) = all_reduce_over_shards([param], [local_max], "max")
    codes = torch.stack(
        [quantize_with_absmax(v, m.reshape(1), signed, block_wise=False) for v, m in zip(parts, global_max)]
    ).reshape(values.shape)
    absmax = global_max.reshape(moments, 1) if moments > 1 else global_max.reshape(1)
    return codes, absmax


def local_state(
    param: Any,
    saved: Mapping[str, Any],
    kind: UpdateKind,
    block_wise: bool,
    quantized: bool,
    name: str = "parameter",
) -> dict[str, Any]:
    """Live (shard-local) state of a sharded parameter from any saved form.

    ``saved`` may hold DTensors (DCP, ``set_optimizer_state_dict``) or full tensors (a full
    state dict, or a single-process / bitsandbytes one), in any of the module's layouts.
    ``quantized`` is the precision the optimizer's settings give this parameter: saved
    values are re-quantized or dequantized to it. Quantization tensors saved with another
    map are decoded with the saved map. Empty dicts (what ``flatten_optimizer_state_dict``
    leaves for keys that a layout does not save) are dropped.
    """
    layout = ShardLayout(param, name)
    out = {k: v for k, v in saved.items() if not (isinstance(v, dict) and not v)}
    for index in range(1, kind.num_states + 1):
        key, moments = f"state{index}", _moments_of(kind, index)
        signed = kind.state_signed[index - 1]
        tensor = out.get(key)
        absmax = out.pop(f"absmax{index}", None)
        qmap = out.pop(f"qmap{index}", None)
        if tensor is None:
            raise ValueError(f"{name}: the saved state has no {key!r} (keys: {sorted(saved)})")
        if tensor.dtype == torch.uint8:
            if absmax is None:
                raise ValueError(f"{name}: the saved 8-bit {key!r} comes without 'absmax{index}'")
            canonical = qmap is None or is_canonical_map(_full(qmap), signed)
            local = _local_codes(layout, tensor, absmax, index, moments, block_wise) if canonical else None
            if local is not None and quantized:
                out[key], out[f"absmax{index}"] = local
                out[f"qmap{index}"] = dynamic_map(signed, layout.device)
                continue
            if local is not None:
                values = _dequantize_moments(local[0], local[1], signed, block_wise, moments)
            else:
                full_codes = _full(tensor).to(layout.device)
                full_absmax = _full(absmax).to(layout.device).float()
                numel = full_codes.numel() // max(moments, 1)
                saved_bw = _saved_block_wise(full_absmax, numel, moments, f"absmax{index}", name)
                full_qmap = None if qmap is None else _full(qmap).to(layout.device)
                full_values = _dequantize_moments(full_codes, full_absmax, signed, saved_bw, moments, full_qmap)
                values = layout.localize(full_values, key, moments)
        else:
            values = layout.localize(tensor, key, moments).float()
        if quantized:
            codes, new_absmax = _quantize_local(layout, param, values, signed, moments, block_wise)
            out[key], out[f"absmax{index}"] = codes, new_absmax
            out[f"qmap{index}"] = dynamic_map(signed, layout.device)
        else:
            out[key] = values.float().contiguous()
    return out


def flatten_absmax(value: dict[str, Any], kind: UpdateKind) -> None:
    """Give block-wise absmax tensors the live layout (``[blocks]``, AdEMAMix ``[2, blocks]``), in
    place: a gathered FSDP2 state dict (``full_state_dict=True``) holds them as ``[dim0, row / 256]``."""
    for index in range(1, kind.num_states + 1):
        absmax = value.get(f"absmax{index}")
        if isinstance(absmax, torch.Tensor) and not is_sharded(absmax):
            moments = _moments_of(kind, index)
            value[f"absmax{index}"] = absmax.reshape(moments, -1) if moments > 1 else absmax.reshape(-1)


def requantization_bound(signed: bool) -> float:
    """Largest error of re-quantizing a value, relative to its block's absmax (the fallback
    layout's bound): half the widest gap between neighbouring codes, or the distance from a
    normalized end of the range (-1, 1) to the outermost code where the map has no code there
    (the signed map stops at about -0.99297). Float32 rounding adds a few ulps of the absmax."""
    q = dynamic_map(signed).double()
    half_gap = float((q[1:] - q[:-1]).max()) / 2.0
    low_end = float(q[0] + 1.0) if signed else float(q[0])
    return max(half_gap, low_end, float(1.0 - q[-1]))
