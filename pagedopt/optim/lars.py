"""LARS (You, Gitman & Ginsburg, 2017, "Large Batch Training of Convolutional Networks").

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(128, 128)
    >>> opt = pagedopt.LARS(model.parameters(), lr=0.1, momentum=0.9, optim_bits=8)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..paging.config import PagingConfig
from .optimizer import Optimizer1State
from .sgd import check_momentum
from .variants import variants


class LARS(Optimizer1State):
    """LARS - bitsandbytes' ``LARS``: SGD momentum scaled by the trust ratio
    ``min(1, max_unorm * ||p|| / ||update||)`` (1 when ``||p|| == 0``). Defaults to one absmax
    per tensor (``block_wise=False``) like bitsandbytes; ``momentum`` must be > 0.

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.randn(4096))
        >>> opt = pagedopt.LARS8bit([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.randn(4096); opt.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        max_unorm: float = 0.02,
        *,
        block_wise: bool = False,
        skip_zeros: bool = False,
        is_paged: bool = False,
        paging: PagingConfig | Mapping[str, Any] | None = None,
    ):
        check_momentum(type(self).__name__, momentum, dampening, nesterov)
        super().__init__(
            "lars", params, lr, (momentum, dampening), 0.0, weight_decay, optim_bits, args,
            min_8bit_size, percentile_clipping, block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros,
            is_paged=is_paged, paging=paging, _extra_defaults={"nesterov": bool(nesterov)},
        )


LARS8bit, LARS32bit, PagedLARS, PagedLARS8bit, PagedLARS32bit = variants(LARS, ", lr=0.01, momentum=0.9")
