"""SGD with momentum (heavy ball; Nesterov optional), 8-bit or 32-bit momentum buffer.

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(128, 128)
    >>> opt = pagedopt.SGD(model.parameters(), lr=0.1, momentum=0.9, optim_bits=8)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..paging.config import PagingConfig
from .optimizer import Optimizer1State
from .variants import variants


def check_momentum(name: str, momentum: float, dampening: float, nesterov: bool) -> None:
    if not isinstance(momentum, (int, float)) or not 0.0 < momentum < 1.0:
        raise ValueError(
            f"Invalid momentum: {momentum!r} ({name} keeps a momentum buffer and needs 0 < momentum < 1; "
            "for plain SGD use torch.optim.SGD)"
        )
    if not isinstance(dampening, (int, float)) or not 0.0 <= dampening < 1.0:
        raise ValueError(f"Invalid dampening: {dampening!r} (must be in [0, 1))")
    if nesterov and dampening != 0:
        raise ValueError(f"Invalid dampening: {dampening!r} (Nesterov momentum requires dampening=0)")


class SGD(Optimizer1State):
    """SGD with momentum - bitsandbytes' ``SGD``, numerically ``torch.optim.SGD``.

    ``buf = g`` at the first step, then ``buf = momentum*buf + (1-dampening)*g``; the step is
    ``buf`` (or ``g + momentum*buf`` with ``nesterov``); ``weight_decay`` is added to the
    gradient. ``momentum`` must be > 0 (bitsandbytes has the same rule).

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = pagedopt.SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.ones(2); opt.step(); opt.step()
        >>> w.detach()
        tensor([0.7100, 0.7100])
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
        block_wise: bool = True,
        *,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        is_paged: bool = False,
        paging: PagingConfig | Mapping[str, Any] | None = None,
    ):
        check_momentum(type(self).__name__, momentum, dampening, nesterov)
        super().__init__(
            "momentum", params, lr, (momentum, dampening), 0.0, weight_decay, optim_bits, args,
            min_8bit_size, percentile_clipping, block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros,
            is_paged=is_paged, paging=paging, _extra_defaults={"nesterov": bool(nesterov)},
        )


SGD8bit, SGD32bit, PagedSGD, PagedSGD8bit, PagedSGD32bit = variants(SGD, ", lr=0.01, momentum=0.9")
