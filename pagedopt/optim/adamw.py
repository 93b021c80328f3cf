"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, 8-bit or 32-bit state.

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(128, 128)
    >>> opt = pagedopt.AdamW(model.parameters(), lr=1e-3, optim_bits=8)
    >>> model(torch.randn(4, 128)).pow(2).mean().backward()
    >>> opt.step()
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..paging.config import PagingConfig
from .optimizer import Optimizer2State
from .variants import reject_amsgrad, variants


class AdamW(Optimizer2State):
    """AdamW - bitsandbytes' ``AdamW``, numerically ``torch.optim.AdamW``.

    Weight decay is decoupled: ``p *= 1 - lr * weight_decay`` before the Adam step. ``amsgrad``
    is accepted for compatibility and must be ``False``. See
    :class:`~pagedopt.optim.Optimizer2State` for the shared arguments.

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.randn(4096))
        >>> opt = pagedopt.AdamW([w], lr=1e-3, optim_bits=8)
        >>> w.grad = torch.randn(4096); opt.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        *,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        paging: PagingConfig | Mapping[str, Any] | None = None,
    ):
        reject_amsgrad(amsgrad)
        super().__init__(
            "adamw", params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping, block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros,
            is_paged=is_paged, paging=paging,
        )


AdamW8bit, AdamW32bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit = variants(AdamW, bits_placeholder="base")
