"""Adagrad (Duchi, Hazan & Singer, 2011), 8-bit or 32-bit accumulator.

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(128, 128)
    >>> opt = pagedopt.Adagrad(model.parameters(), lr=1e-2, optim_bits=8)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..paging.config import PagingConfig
from .optimizer import Optimizer1State
from .variants import variants


class Adagrad(Optimizer1State):
    """Adagrad - bitsandbytes' ``Adagrad``, numerically ``torch.optim.Adagrad``:
    ``v += g*g``, ``p -= lr_t * g / (sqrt(v) + eps)`` with ``lr_t = lr / (1 + (t-1)*lr_decay)``;
    ``weight_decay`` is added to the gradient. ``lr_decay`` and ``initial_accumulator_value``
    work (bitsandbytes rejects nonzero values).

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = pagedopt.Adagrad([w], lr=0.1)
        >>> w.grad = torch.ones(2); opt.step()
        >>> w.detach()
        tensor([0.9000, 0.9000])
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
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
        super().__init__(
            "adagrad", params, lr, (0.0, 0.0), eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping, block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros,
            is_paged=is_paged, paging=paging,
            _extra_defaults={"lr_decay": lr_decay, "initial_accumulator_value": initial_accumulator_value},
        )


Adagrad8bit, Adagrad32bit, PagedAdagrad, PagedAdagrad8bit, PagedAdagrad32bit = variants(Adagrad, bits_placeholder="pinned")
