"""LARS (You, Gitman & Ginsburg, 2017, "Large Batch Training of Convolutional Networks").

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(128, 128)
    >>> opt = pagedopt.LARS(model.parameters(), lr=0.1, momentum=0.9, optim_bits=8)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

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


class PytorchLARS(torch.optim.Optimizer):
    """LARS in plain torch ops with a float32-or-wider momentum buffer - bitsandbytes'
    ``PytorchLARS`` (same arguments and defaults).

    Per parameter: ``d = g + weight_decay * p``; ``buf = d`` at the first step, then
    ``buf = momentum * buf + (1 - dampening) * d``; the update is ``buf`` (``d + momentum *
    buf`` with ``nesterov``; ``d`` when ``momentum == 0``); when ``max_unorm > 0`` and
    ``||update|| > max_unorm * ||p||`` it is scaled by ``max_unorm * ||p|| / ||update||``
    (as bitsandbytes does, a parameter with ``||p|| == 0`` then gets no update; pagedopt's
    :class:`LARS` uses a scale of 1 there); finally ``p -= lr * update``. The norms and the
    scale stay on the device (no host sync); fp16/bf16 parameters are updated through float32.

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> opt = pagedopt.optim.PytorchLARS([w], lr=0.1, momentum=0.9, max_unorm=0.0)
        >>> w.grad = torch.ones(4); opt.step()
        >>> w.detach()
        tensor([0.9000, 0.9000, 0.9000, 0.9000])
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        max_unorm: float = 0.02,
    ):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("max_unorm", max_unorm)):
            if not isinstance(value, (int, float)) or not value >= 0.0:
                raise ValueError(f"Invalid {name}: {value!r} (must be a number >= 0)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"Invalid nesterov=True with momentum={momentum!r}, dampening={dampening!r} "
                "(Nesterov momentum needs momentum > 0 and dampening=0)"
            )
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, max_unorm=max_unorm)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, max_unorm = group["momentum"], group["max_unorm"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p32 = p.detach().float()
                d = p.grad.detach().float()
                if group["weight_decay"] != 0:
                    d = d + group["weight_decay"] * p32
                update = d
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(momentum).add_(d, alpha=1 - group["dampening"])
                    update = d + momentum * buf if group["nesterov"] else buf
                if max_unorm > 0.0:
                    bound = max_unorm * torch.linalg.vector_norm(p32)
                    unorm = torch.linalg.vector_norm(update)
                    update = update * torch.where(unorm > bound, bound / unorm, torch.ones_like(unorm))
                p.copy_(p32 - group["lr"] * update)
        return loss
