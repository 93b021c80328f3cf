"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes").

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(128, 128)
    >>> opt = pagedopt.LAMB(model.parameters(), lr=1e-3, optim_bits=8)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..paging.config import PagingConfig
from .optimizer import Optimizer2State
from .variants import reject_amsgrad, variants


class LAMB(Optimizer2State):
    """LAMB - bitsandbytes' ``LAMB``: the Adam update scaled by the trust ratio
    ``min(1, max_unorm * ||p|| / ||update||)`` (1 when ``||p|| == 0``), with decoupled weight
    decay (``adam_w_mode=False``: L2 decay added to the gradient). ``bias_correction=False``
    drops Adam's bias correction. bitsandbytes accepts both flags and ignores them; pagedopt
    honours them. Defaults to one absmax per tensor (``block_wise=False``) like bitsandbytes.

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.randn(4096))
        >>> opt = pagedopt.LAMB8bit([w])
        >>> w.grad = torch.randn(4096); opt.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        adam_w_mode: bool = True,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = False,
        max_unorm: float = 1.0,
        *,
        skip_zeros: bool = False,
        is_paged: bool = False,
        paging: PagingConfig | Mapping[str, Any] | None = None,
    ):
        reject_amsgrad(amsgrad)
        super().__init__(
            "lamb", params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping, block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros,
            is_paged=is_paged, paging=paging,
            _extra_defaults={"bias_correction": bool(bias_correction), "adam_w_mode": bool(adam_w_mode)},
        )


LAMB8bit, LAMB32bit, PagedLAMB, PagedLAMB8bit, PagedLAMB32bit = variants(LAMB)
