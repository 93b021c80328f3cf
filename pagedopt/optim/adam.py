"""Adam (Kingma & Ba, 2015) with 8-bit or 32-bit state.

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(128, 128)
    >>> opt = pagedopt.Adam(model.parameters(), lr=1e-3, optim_bits=8)
    >>> model(torch.randn(4, 128)).pow(2).mean().backward()
    >>> opt.step()
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..paging.config import PagingConfig
from .optimizer import Optimizer2State
from .variants import reject_amsgrad, variants


class Adam(Optimizer2State):
    """Adam - bitsandbytes' ``Adam``, numerically ``torch.optim.Adam``.

    ``weight_decay`` is an L2 penalty added to the gradient, as in ``torch.optim.Adam``
    (bitsandbytes applies it decoupled, like AdamW - use :class:`AdamW` for that). ``amsgrad``
    is accepted for compatibility and must be ``False``. See
    :class:`~pagedopt.optim.Optimizer2State` for the shared arguments.

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.randn(4096))
        >>> opt = pagedopt.Adam([w], lr=1e-3, optim_bits=8)
        >>> w.grad = torch.randn(4096); opt.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
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
            "adam", params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping, block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros,
            is_paged=is_paged, paging=paging,
        )


Adam8bit, Adam32bit, PagedAdam, PagedAdam8bit, PagedAdam32bit = variants(Adam, bits_placeholder="base", paged_placeholder=True)
