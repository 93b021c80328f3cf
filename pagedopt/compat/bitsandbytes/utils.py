"""The small helpers of ``bitsandbytes.utils`` that optimizer code and tests use.

Example:
    >>> import torch
    >>> from pagedopt.compat.bitsandbytes.utils import sync_gpu
    >>> sync_gpu(torch.zeros(1))  # nothing to wait for on the CPU
"""

from __future__ import annotations

import torch


def sync_gpu(t: torch.Tensor) -> None:
    """Wait for the device of ``t`` (CUDA or XPU); a no-op for CPU tensors."""
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    elif t.device.type == "xpu":
        torch.xpu.synchronize(t.device)
