"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(128, 128)
    >>> opt = pagedopt.Lion(model.parameters(), lr=1e-4, optim_bits=8)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..paging.config import PagingConfig
from .optimizer import Optimizer1State
from .variants import variants


class Lion(Optimizer1State):
    """Lion - bitsandbytes' ``Lion``: ``p -= lr * sign(b1*m + (1-b1)*g)``, then
    ``m = b2*m + (1-b2)*g``; decoupled weight decay. See
    :class:`~pagedopt.optim.Optimizer1State` for the shared arguments.

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> opt = pagedopt.Lion([w], lr=0.5)
        >>> w.grad = torch.tensor([1.0, -2.0, 0.0]); opt.step()
        >>> w.detach()
        tensor([-0.5000,  0.5000,  0.0000])
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0,
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
        super().__init__(
            "lion", params, lr, betas, 0.0, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping, block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros,
            is_paged=is_paged, paging=paging,
        )


Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit = variants(Lion)
