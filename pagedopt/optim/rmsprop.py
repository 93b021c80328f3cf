"""RMSprop (Tieleman & Hinton, 2012), 8-bit or 32-bit state.

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(128, 128)
    >>> opt = pagedopt.RMSprop(model.parameters(), lr=1e-3, optim_bits=8)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..paging.config import PagingConfig
from .optimizer import Optimizer1State
from .variants import variants


class RMSprop(Optimizer1State):
    """RMSprop - bitsandbytes' ``RMSprop``, numerically ``torch.optim.RMSprop`` without momentum:
    ``v = alpha*v + (1-alpha)*g*g``, ``p -= lr * g / (sqrt(v) + eps)``; ``weight_decay`` is added
    to the gradient (bitsandbytes' 8-bit kernels drop it - a bug pagedopt does not copy).
    ``momentum`` and ``centered`` are not supported and raise (bitsandbytes ignores momentum).

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.randn(4096))
        >>> opt = pagedopt.RMSprop8bit([w], lr=1e-3, weight_decay=1e-4)
        >>> w.grad = torch.randn(4096); opt.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        *,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        is_paged: bool = False,
        paging: PagingConfig | Mapping[str, Any] | None = None,
    ):
        if momentum != 0:
            raise ValueError(f"Invalid momentum: {momentum!r} (RMSprop momentum is not supported; must be 0)")
        if centered:
            raise ValueError("Invalid centered: True (centered RMSprop is not supported; must be False)")
        super().__init__(
            "rmsprop", params, lr, (alpha, 0.0), eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping, block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros,
            is_paged=is_paged, paging=paging,
        )


RMSprop8bit, RMSprop32bit, PagedRMSprop, PagedRMSprop8bit, PagedRMSprop32bit = variants(RMSprop)
