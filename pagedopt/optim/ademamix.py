"""AdEMAMix (Pagliardini, Ablin & Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster, Older").

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(128, 128)
    >>> opt = pagedopt.AdEMAMix(model.parameters(), lr=1e-3, alpha=5.0, t_alpha=1000, t_beta3=1000)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from ..paging.config import PagingConfig
from .optimizer import Optimizer2State
from .variants import variants


class AdEMAMix(Optimizer2State):
    """AdEMAMix - bitsandbytes' ``AdEMAMix``: Adam plus a slow EMA ``m2`` (rate ``betas[2]``)
    mixed in with weight ``alpha``::

        p -= lr * ((m1 / c1 + alpha_t * m2) / (sqrt(v) / c2 + eps)) ; p *= 1 - lr * wd (first)

    ``t_alpha``/``t_beta3`` warm ``alpha`` and ``beta3`` up over that many steps (paper, eq. for
    ``alpha_t`` and ``beta3_t``). The 8-bit ``state1`` holds both first moments as
    ``(2, *param.shape)`` codes with ``absmax1`` of shape ``(2, blocks)``, like bitsandbytes.
    The keyword-only arguments go beyond bitsandbytes, which fixes them for AdEMAMix.

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.randn(4096))
        >>> opt = pagedopt.AdEMAMix8bit([w], t_alpha=100, t_beta3=100)
        >>> w.grad = torch.randn(4096); opt.step()
        >>> opt.state[w]["state1"].shape
        torch.Size([2, 4096])
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        t_alpha: int | None = None,
        t_beta3: int | None = None,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        optim_bits: int = 32,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
        *,
        args: Any = None,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        paging: PagingConfig | Mapping[str, Any] | None = None,
    ):
        super().__init__(
            "ademamix", params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping, block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros,
            is_paged=is_paged, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, paging=paging,
        )

    def _get_state_double_buffer(self, p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """bitsandbytes 0.49's hook for AdEMAMix's stacked first moments (fast and slow EMA):
        a zeroed ``[2, *p.shape]`` buffer, the shape of ``state["state1"]`` (see
        :meth:`~pagedopt.optim.Optimizer8bit.get_state_buffer` for single buffers)."""
        single = self.get_state_buffer(p, dtype=dtype)
        return torch.zeros((2, *single.shape), dtype=dtype, device=single.device)


AdEMAMix8bit, AdEMAMix32bit, PagedAdEMAMix, PagedAdEMAMix8bit, PagedAdEMAMix32bit = variants(AdEMAMix)
