"""Percentile clipping and trust ratios, batched over parameters and kept on the device.

Percentile clipping (bitsandbytes <= 0.49, Dettmers et al. 2022): each parameter keeps the
squared L2 norms of its last 100 gradients in ``gnorm_vec`` (filled with the first norm at
step 1). At step ``t`` the current norm goes to slot ``t % 100``; the clip threshold is
``sqrt(sorted(gnorm_vec)[percentile])`` and the gradient is scaled by
``threshold / current`` when the current norm exceeds it. bitsandbytes reads the comparison
on the host every step; here everything stays a device tensor.

Trust ratio (LAMB/LARS, bitsandbytes' ``max_unorm``): the update is scaled by
``min(1, max_unorm * ||p|| / ||update||)``. A parameter with ``||p|| == 0`` (a zero-initialised
bias) gets scale 1 - bitsandbytes would give it 0 and it would never move.

All functions take many parameters at once: a handful of kernel launches per step, not per
parameter.

Example:
    >>> import torch
    >>> from pagedopt.functional.clipping import percentile_clip
    >>> hist = [torch.zeros(100)]
    >>> r = percentile_clip([torch.tensor(4.0, dtype=torch.float64)], hist, steps=[1], percentiles=[5])
    >>> float(r.scales[0]), float(hist[0][0])
    (1.0, 4.0)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

HISTORY = 100

Tensor = torch.Tensor


@dataclass
class ClipResult:
    """Per parameter (same order as the inputs), 0-d float32 device tensors."""

    scales: list[Tensor]
    norms: list[Tensor]
    thresholds: list[Tensor]


class StackedClip:
    """One group's clipping as three float32 vectors (:func:`clip_group`); the per-parameter
    0-d views of :class:`ClipResult` are made only when asked for (telemetry rows), since
    splitting a vector costs about a microsecond per parameter."""

    def __init__(self, scale: Tensor, current: Tensor, threshold: Tensor):
        self.scale, self.current, self.threshold = scale, current, threshold

    @property
    def scales(self) -> list[Tensor]:
        return list(self.scale.unbind(0))

    @property
    def norms(self) -> list[Tensor]:
        return list(self.current.unbind(0))

    @property
    def thresholds(self) -> list[Tensor]:
        return list(self.threshold.unbind(0))


def clip_group(norms_sq: Tensor, histories: Sequence[Tensor], step: int, percentile: int) -> StackedClip:
    """The batched core of :func:`percentile_clip` for parameters sharing one device, step and
    percentile: ``norms_sq`` is their float64 vector of squared norms; each history gets its
    entry in place; returns the scales, norms and thresholds as vectors."""
    hist = torch.stack(list(histories))
    current_sq = norms_sq.float()
    if step == 1:
        hist.copy_(current_sq[:, None].expand_as(hist))
    else:
        hist[:, step % HISTORY] = current_sq
    torch._foreach_copy_(list(histories), list(hist.unbind(0)))
    current = torch.sqrt(current_sq)
    threshold = torch.sqrt(torch.sort(hist, dim=1).values[:, percentile])
    scale = torch.where(current > threshold, threshold / current, torch.ones_like(current))
    return StackedClip(scale, current, threshold)


def percentile_clip(
    norms_sq: Sequence[Tensor],
    histories: Sequence[Tensor],
    steps: Sequence[int],
    percentiles: Sequence[int],
) -> ClipResult:
    """Record each gradient's squared norm in its history (in place) and return the scales.

    ``norms_sq``: float64 0-d squared norms (already global under sharding). ``histories``:
    the float32 ``gnorm_vec`` buffers (100 entries). ``steps`` are 1-based.
    """
    n = len(norms_sq)
    scales: list[Tensor | None] = [None] * n
    norms: list[Tensor | None] = [None] * n
    thresholds: list[Tensor | None] = [None] * n
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(n):
        groups[(histories[i].device, int(steps[i]), int(percentiles[i]))].append(i)
    for (_, step, pct), idx in groups.items():
        clip = clip_group(torch.stack([norms_sq[i] for i in idx]), [histories[i] for i in idx], step, pct)
        for i, scale, norm, threshold in zip(idx, clip.scales, clip.norms, clip.thresholds):
            scales[i], norms[i], thresholds[i] = scale, norm, threshold
    return ClipResult(scales, norms, thresholds)  # type: ignore[arg-type]


def trust_ratios(
    unorm_sq: Sequence[Tensor], pnorm_sq: Sequence[Tensor], max_unorms: Sequence[float]
) -> list[Tensor]:
    """0-d float32 update scales ``min(1, max_unorm * ||p|| / ||u||)`` (1 where ``||p|| == 0``)."""
    out: list[Tensor | None] = [None] * len(unorm_sq)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, u in enumerate(unorm_sq):
        groups[(u.device, float(max_unorms[i]))].append(i)
    for (_, max_unorm), idx in groups.items():
        scale = trust_scale(torch.stack([unorm_sq[i] for i in idx]), torch.stack([pnorm_sq[i] for i in idx]),
                            max_unorm)
        for i, s in zip(idx, scale.unbind(0)):
            out[i] = s
    return out  # type: ignore[return-value]


def trust_scale(unorm_sq: Tensor, pnorm_sq: Tensor, max_unorm: float) -> Tensor:
    """The batched core of :func:`trust_ratios`: float64 vectors of squared norms in, the
    float32 vector of update scales out."""
    u = torch.sqrt(unorm_sq)
    pn = torch.sqrt(pnorm_sq)
    limit = max_unorm * pn
    return torch.where((u > limit) & (pn > 0), limit / u, torch.ones_like(u)).float()
