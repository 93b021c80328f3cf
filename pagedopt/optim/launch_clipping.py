"""Percentile clipping for the parameters of a prepared launch.

A launch (:mod:`pagedopt.backends.cpu_plan`, :mod:`pagedopt.backends.cuda_prepared`) holds a
fixed pointer to each parameter's gradient scale. The plan gives a clipped launch group one
float32 buffer of scales on the parameters' device (every item points at its element), and
each step, before the launch, computes the group's gradient norms in one batched pass,
records them in each parameter's history and writes the scales into that buffer: the same
computation as the per-item passes (:func:`~pagedopt.functional.clipping.percentile_clip`),
so the results are the same bit for bit, and no host sync (the scales stay on the device; a
captured CUDA graph re-reads the buffer on replay).

Example:
    >>> import torch
    >>> from pagedopt.optim.launch_clipping import with_scale_buffer
    >>> from pagedopt.functional.items import UpdateItem
    >>> from pagedopt.functional.kinds import kind_for
    >>> from pagedopt.functional.scalars import step_scalars
    >>> kind = kind_for("lion")
    >>> item = UpdateItem(torch.ones(4), torch.ones(4), torch.zeros(4), None, None, None,
    ...                   step_scalars(kind, {"lr": 0.1, "betas": (0.9, 0.99)}, 1))
    >>> scales, (clipped,) = with_scale_buffer([item], torch.device("cpu"))
    >>> scales.tolist(), clipped.gnorm_scale.data_ptr() == scales.data_ptr()
    ([1.0], True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from ..distributed import sharding
from ..functional import dispatch
from ..functional.clipping import StackedClip, clip_group
from ..functional.items import UpdateItem


def with_scale_buffer(items: Sequence[UpdateItem], device: torch.device) -> tuple[torch.Tensor, list[UpdateItem]]:
    """A buffer of ones (one scale per item) and the items pointing at their elements."""
    scales = torch.ones(len(items), dtype=torch.float32, device=device)
    return scales, [dataclasses.replace(item, gnorm_scale=scales[j]) for j, item in enumerate(items)]


def clip_before_launch(lg: Any, local_grads: list[torch.Tensor], step: int) -> StackedClip:
    """Record this step's gradient norms of ``lg``'s parameters and write their scales into
    ``lg.clip_scales`` (see the module docstring). ``step`` is the step the launch runs; the
    group shares one device, step and percentile, so one batched pass serves it."""
    norms_sq = dispatch.grad_norm_sq(local_grads)
    if lg.sharded:  # DTensors: global norms
        norms_sq = sharding.all_reduce_over_shards([e.key for e in lg.entries], norms_sq, "sum")
    result = clip_group(torch.stack(norms_sq), [s["gnorm_vec"] for s in lg.state_list], step, lg.clip_percentile)
    lg.clip_scales.copy_(result.scale)
    return result
