"""The prepare pass for the parameters of a prepared launch: trust ratios and tensor-wise state.

LAMB/LARS (``max_unorm > 0``) scale each update by a trust ratio that needs the norm of the
whole update first, and tensor-wise 8-bit state needs the whole tensor's new maximum before
any code can be written: a prepare pass runs before the update (:mod:`pagedopt.optim.passes`
does it per item). For a launch group the plan builds that pass once as its own prepared
launch (:class:`~pagedopt.backends.cpu_plan.CpuPrepareLaunch`,
:class:`~pagedopt.backends.cuda_prepared.CudaPrepareLaunch`; same items) and gives the group
buffers the update launch points at: one float32 update scale per item, and for tensor-wise
items their new scales (a row of ``[state1 moment 0, moment 1, state2]``). Each step, before
the update, :func:`prepare_before_launch` runs the pass and writes the buffers from its
outputs - the same values as the per-item passes (the trust ratio by
:func:`~pagedopt.functional.clipping.trust_scale`, the core of ``trust_ratios``), so the
results are the same bit for bit - and records each parameter's update norm in its
``unorm_vec``, all without a Python loop over the parameters.

On CUDA the pass runs eagerly before the update's launch or graph replay (the buffers stay on
the device: no host sync). For DTensor (FSDP2) parameters the pass runs on the local shards
and its norms and maxima are reduced over the shards first.

Example:
    >>> import torch
    >>> from pagedopt.optim.launch_prepare import with_prepare_buffers
    >>> from pagedopt.functional.items import UpdateItem
    >>> from pagedopt.functional.kinds import kind_for
    >>> from pagedopt.functional.scalars import step_scalars
    >>> kind = kind_for("lamb")
    >>> p = torch.ones(4)
    >>> codes, absmax = torch.zeros(4, dtype=torch.uint8), torch.zeros(1)
    >>> item = UpdateItem(p, p.clone(), codes, codes.clone(), absmax, absmax.clone(),
    ...                   step_scalars(kind, {"lr": 0.1, "betas": (0.9, 0.99)}, 1), block_wise=False)
    >>> bufs, (planned,) = with_prepare_buffers(kind, [item], torch.device("cpu"), max_unorm=1.0)
    >>> planned.update_scale.data_ptr() == bufs.trust_scales.data_ptr(), tuple(planned.new_absmax1.shape)
    (True, (1,))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..distributed import sharding
from ..functional.clipping import trust_scale
from ..functional.items import UpdateItem
from ..functional.kinds import UpdateKind

_STATE2_COLUMN = 2  # new_max's column for state2 (columns 0-1: state1's moments)


@dataclass
class PrepareBuffers:
    """What a launch group's update reads from the prepare pass (see the module docstring)."""

    max_unorm: float
    trust_scales: torch.Tensor | None  # [n] float32 update scales (max_unorm > 0), else None
    new_max: torch.Tensor | None  # [n, 3] float32 new tensor-wise scales, else None
    unorm_vecs: list[torch.Tensor] = dataclasses.field(default_factory=list)  # each state's unorm_vec


def needs_prepare(quantized: bool, block_wise: bool, max_unorm: float) -> bool:
    """Whether an update needs the prepare pass first: a trust ratio, or tensor-wise 8-bit
    state (the per-item passes and the plan both ask this)."""
    return max_unorm > 0.0 or (quantized and not block_wise)


def with_prepare_buffers(kind: UpdateKind, items: Sequence[UpdateItem], device: torch.device,
                         max_unorm: float) -> tuple[PrepareBuffers, list[UpdateItem]]:
    """The group's buffers and the items pointing at them: update scales of ones when
    ``max_unorm > 0``; for tensor-wise 8-bit items, ``new_absmax1``/``new_absmax2`` rows."""
    n = len(items)
    trust = torch.ones(n, dtype=torch.float32, device=device) if max_unorm > 0.0 else None
    tensor_wise = any(item.quantized and not item.block_wise for item in items)
    new_max = torch.ones(n, 3, dtype=torch.float32, device=device) if tensor_wise else None
    planned = []
    for j, item in enumerate(items):
        changes: dict[str, Any] = {}
        if trust is not None:
            changes["update_scale"] = trust[j]
        if new_max is not None and item.quantized and not item.block_wise:
            changes["new_absmax1"] = new_max[j, : kind.state1_moments]
            changes["new_absmax2"] = new_max[j, _STATE2_COLUMN:] if kind.num_states == 2 else None
        planned.append(dataclasses.replace(item, **changes))
    return PrepareBuffers(max_unorm, trust, new_max), planned


def prepare_before_launch(lg: Any, grad_ptrs: Sequence[int] | None, scalars: Any) -> torch.Tensor | None:
    """Run launch group ``lg``'s prepare pass and write its buffers (``lg.prepare_buffers``)
    for the update that follows; returns this step's update scales (None without trust ratio)."""
    bufs: PrepareBuffers = lg.prepare_buffers
    maxima, norms = lg.prepare_launch.run(grad_ptrs, scalars)
    if lg.sharded:
        maxima, norms = _over_shards(lg, maxima, norms)
    if bufs.new_max is not None:
        bufs.new_max.copy_(maxima)
    if bufs.trust_scales is None:
        return None
    unorm_sq, pnorm_sq = norms[:, 0], norms[:, 1]
    scale = trust_scale(unorm_sq, pnorm_sq, bufs.max_unorm)
    bufs.trust_scales.copy_(scale)
    # Each parameter's update norm (squared, as the per-item passes keep it) in its unorm_vec.
    torch._foreach_copy_(bufs.unorm_vecs, list(unorm_sq.float().reshape(-1, 1).unbind(0)))
    return scale


def _over_shards(lg: Any, maxima: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DTensor (FSDP2) parameters: the prepare pass saw this rank's shards; the trust ratio
    needs the global norms (sums over the shards) and tensor-wise state the global maxima, as
    the per-item passes reduce them (one batched collective each; every rank has the same
    launch groups, so the collectives line up)."""
    keys = [e.key for e in lg.entries]
    maxima = torch.stack(sharding.all_reduce_over_shards(keys, list(maxima.unbind(0)), "max"))
    norms = torch.stack(sharding.all_reduce_over_shards(keys, list(norms.unbind(0)), "sum"))
    return maxima, norms
