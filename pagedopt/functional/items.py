"""The unit of work handed to a backend: one parameter's tensors for one step.

Example:
    >>> import torch
    >>> from pagedopt.functional.items import UpdateItem
    >>> from pagedopt.functional.kinds import kind_for
    >>> from pagedopt.functional.scalars import step_scalars
    >>> p = torch.zeros(4); g = torch.ones(4)
    >>> s = step_scalars(kind_for("lion"), {"lr": 0.1, "betas": (0.9, 0.99)}, 1)
    >>> item = UpdateItem(p, g, torch.zeros(4), None, None, None, s)
    >>> item.quantized, item.numel
    (False, 4)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scalars import StepScalars


@dataclass
class UpdateItem:
    """One parameter's update inputs.

    ``state1``/``state2`` are float32 (32-bit state) or uint8 codes (8-bit state) shaped like
    the parameter (AdEMAMix ``state1``: ``(2, *param.shape)``). For 8-bit state,
    ``absmax1``/``absmax2`` hold one float32 scale per block (``[blocks]``, AdEMAMix
    ``[2, blocks]``); with ``block_wise=False`` one per tensor (``[1]`` / ``[2, 1]``).

    ``gnorm_scale`` (percentile clipping) and ``update_scale`` (trust ratio) are 0-d float32
    tensors on the parameter's device, or ``None`` for 1.0: they stay on the device so the
    step never waits for the host.

    ``new_absmax1``/``new_absmax2`` are only used for tensor-wise (``block_wise=False``)
    8-bit state: the maxima of the updated states, from the backend's ``prepare`` pass.

    ``numerics`` picks the CUDA kernel variant: ``"fast"`` (FMA, approximate sqrt/division,
    table-free dequantization; docs/numerics.md) or ``"strict"`` (bit-identical to the CPU
    kernels and the reference, which ignore the field).
    """

    param: torch.Tensor
    grad: torch.Tensor
    state1: torch.Tensor
    state2: torch.Tensor | None
    absmax1: torch.Tensor | None
    absmax2: torch.Tensor | None
    scalars: StepScalars
    block_wise: bool = True
    gnorm_scale: torch.Tensor | None = None
    update_scale: torch.Tensor | None = None
    new_absmax1: torch.Tensor | None = None
    new_absmax2: torch.Tensor | None = None
    numerics: str = "fast"  # "fast" | "strict": CUDA kernel math mode (CPU and reference are always strict)

    @property
    def quantized(self) -> bool:
        return self.state1.dtype == torch.uint8

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def device(self) -> torch.device:
        return self.param.device

    @property
    def fixed_gnorm_scale(self) -> bool:
        """No gradient scale, or a one-element float32 tensor on the parameter's device (what
        a prepared launch can point at: :mod:`pagedopt.optim.launch_clipping`)."""
        return self._pointable_scalar(self.gnorm_scale)

    @property
    def fixed_update_scale(self) -> bool:
        """The same for the update scale (trust ratio: :mod:`pagedopt.optim.launch_prepare`)."""
        return self._pointable_scalar(self.update_scale)

    @property
    def fixed_new_absmax(self) -> bool:
        """Tensor-wise 8-bit state whose new scales are float32 tensors on the parameter's
        device that a prepared launch can point at (:mod:`pagedopt.optim.launch_prepare`
        writes them before each update)."""
        given = [self.new_absmax1, self.new_absmax2] if self.state2 is not None else [self.new_absmax1]
        return all(t is not None and t.dtype == torch.float32 and t.is_contiguous() and t.device == self.param.device
                   for t in given)

    def _pointable_scalar(self, t: torch.Tensor | None) -> bool:
        return t is None or (t.dtype == torch.float32 and t.numel() == 1 and t.device == self.param.device)


@dataclass
class PrepareResult:
    """What a backend's ``prepare`` pass returns for one item (all on the item's device).

    ``max1``/``max2``: float32 max |state| of the updated states (shape ``[moments]``), for
    tensor-wise 8-bit state (else ``None``). ``unorm_sq`` / ``pnorm_sq``: float64 0-d squared
    L2 norms of the update direction and of the parameter before the update (``None`` unless
    asked for; they feed the trust ratio).
    """

    max1: torch.Tensor | None = None
    max2: torch.Tensor | None = None
    unorm_sq: torch.Tensor | None = None
    pnorm_sq: torch.Tensor | None = None
