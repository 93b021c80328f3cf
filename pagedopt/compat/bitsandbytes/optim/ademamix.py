"""``bitsandbytes.optim.ademamix``: the AdEMAMix classes and ``_ReferenceAdEMAMix``, a plain
torch AdEMAMix (float32 states) that tests compare the 8-bit and 32-bit classes against.

Example:
    >>> import torch
    >>> from pagedopt.compat.bitsandbytes.optim.ademamix import _ReferenceAdEMAMix
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = _ReferenceAdEMAMix([w], lr=0.1, weight_decay=0.0)
    >>> w.grad = torch.ones(3); opt.step()
    >>> round(float(w.detach()[0]), 5)  # step 1: (m1/c1 + alpha*m2) / (sqrt(nu)/c2) = 1 + 5 * 1e-4
    0.89995
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from ....functional.scalars import ademamix_schedules
from ....optim.ademamix import (  # noqa: F401
    AdEMAMix, AdEMAMix8bit, AdEMAMix32bit, PagedAdEMAMix, PagedAdEMAMix8bit, PagedAdEMAMix32bit,
)


class _ReferenceAdEMAMix(torch.optim.Optimizer):
    """AdEMAMix (Pagliardini et al. 2024) in torch ops - bitsandbytes' test reference, with
    its argument order ``(params, lr, betas, alpha, eps, weight_decay, t_beta3, t_alpha)``.

    ``p *= 1 - lr * weight_decay``; ``m1 = b1*m1 + (1-b1)*g``; ``m2 = b3_t*m2 + (1-b3_t)*g``;
    ``nu = b2*nu + (1-b2)*g*g``; ``p -= lr * (m1/c1 + alpha_t*m2) / (sqrt(nu)/sqrt(c2) + eps)``
    with the warm-ups of :func:`pagedopt.functional.scalars.ademamix_schedules`.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> _ReferenceAdEMAMix([w], t_alpha=10, t_beta3=10).defaults["t_alpha"]
        10
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple = (0.9, 0.999, 0.9999),
                 alpha: float = 5.0, eps: float = 1e-8, weight_decay: float = 1e-2,
                 t_beta3: int | None = None, t_alpha: int | None = None):
        defaults = dict(lr=lr, betas=tuple(betas), alpha=alpha, eps=eps, weight_decay=weight_decay,
                        t_beta3=t_beta3, t_alpha=t_alpha)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2, beta3 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m1_m2"] = p.new_zeros((2, *p.shape), dtype=torch.float32)
                    state["nu"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                step = state["step"]
                alpha_t, beta3_t = ademamix_schedules(step, group["alpha"], beta1, beta3, group["t_alpha"],
                                                      group["t_beta3"])
                g = p.grad.float()
                m1, m2 = state["m1_m2"].unbind(0)
                nu = state["nu"]
                m1.mul_(beta1).add_(g, alpha=1 - beta1)
                m2.mul_(beta3_t).add_(g, alpha=1 - beta3_t)
                nu.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = nu.sqrt() / math.sqrt(1 - beta2**step) + eps
                update = (m1 / (1 - beta1**step) + alpha_t * m2) / denom
                p32 = p.float()
                if wd:
                    p32 = p32 * (1 - lr * wd)
                p.copy_(p32 - lr * update)
        return loss
