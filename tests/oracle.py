"""Float64 textbook implementations of every algorithm: the independent oracle of the tests.

Written from the papers and torch.optim's documented update rules, not from pagedopt's code,
so a shared mistake is unlikely. Parameters of 16-bit dtypes are rounded to that dtype after
every step (as any optimizer updating a 16-bit tensor must), everything else is float64.

Example:
    >>> import torch
    >>> o = Oracle("SGD", {"lr": 0.1, "momentum": 0.9}, torch.ones(2))
    >>> o.step(torch.ones(2)); o.step(torch.ones(2))
    >>> o.param
    tensor([0.7100, 0.7100], dtype=torch.float64)
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Public defaults (bitsandbytes 0.49) per algorithm, for the oracle's own bookkeeping.
DEFAULTS: dict[str, dict[str, Any]] = {
    "Adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "AdamW": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
    "LAMB": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_unorm=1.0,
                 bias_correction=True, adam_w_mode=True),
    "AdEMAMix": dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None, t_beta3=None,
                     eps=1e-8, weight_decay=1e-2),
    "SGD": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
    "LARS": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, max_unorm=0.02),
    "Lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0),
    "RMSprop": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0),
    "Adagrad": dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10),
}


def base_name(class_name: str) -> str:
    """``"PagedAdamW8bit"`` -> ``"AdamW"``."""
    name = class_name.removeprefix("Paged")
    for suffix in ("8bit", "32bit"):
        name = name.removesuffix(suffix)
    return name


class Oracle:
    """Float64 optimizer for one parameter (``hp``: the constructor arguments used)."""

    def __init__(self, class_name: str, hp: dict[str, Any], param: torch.Tensor,
                 percentile_clipping: int = 100):
        self.algo = base_name(class_name)
        self.hp = {**DEFAULTS[self.algo], **hp}
        self.dtype = param.dtype
        self.param = param.detach().double().clone()
        self.t = 0
        self.m = torch.zeros_like(self.param)
        self.m2 = torch.zeros_like(self.param)
        self.v = torch.full_like(self.param, float(self.hp.get("initial_accumulator_value", 0.0)))
        self.percentile = percentile_clipping
        self.history = torch.zeros(100, dtype=torch.float64)

    def _clip_scale(self, g: torch.Tensor) -> float:
        if self.percentile >= 100:
            return 1.0
        norm_sq = float(g.pow(2).sum())
        if self.t == 1:
            self.history.fill_(norm_sq)
        else:
            self.history[self.t % 100] = norm_sq
        current = math.sqrt(norm_sq)
        threshold = math.sqrt(float(torch.sort(self.history).values[self.percentile]))
        return threshold / current if current > threshold else 1.0

    @staticmethod
    def _trust(p: torch.Tensor, u: torch.Tensor, max_unorm: float) -> float:
        pn, un = float(p.norm()), float(u.norm())
        if max_unorm <= 0 or pn == 0 or un <= max_unorm * pn:
            return 1.0
        return max_unorm * pn / un

    def step(self, grad: torch.Tensor) -> None:
        self.t += 1
        hp, t, p = self.hp, self.t, self.param
        g = grad.detach().double().clone()
        g = g * self._clip_scale(g)
        lr, wd = hp.get("lr"), hp.get("weight_decay", 0.0)
        new_p = getattr(self, f"_{self.algo.lower()}")(p, g, lr, wd, t, hp)
        self.param = new_p.to(self.dtype).double() if self.dtype != torch.float32 else new_p.float().double()

    # Each rule updates self.m / self.m2 / self.v and returns the new parameter.
    def _adam_core(self, g, t, hp):
        b1, b2 = hp["betas"][:2]
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        mhat = self.m / (1 - b1**t)
        vhat = self.v / (1 - b2**t)
        return mhat / (vhat.sqrt() + hp["eps"])

    def _adam(self, p, g, lr, wd, t, hp):
        return p - lr * self._adam_core(g + wd * p, t, hp)

    def _adamw(self, p, g, lr, wd, t, hp):
        return p * (1 - lr * wd) - lr * self._adam_core(g, t, hp)

    def _lamb(self, p, g, lr, wd, t, hp):
        b1, b2 = hp["betas"][:2]
        if not hp["adam_w_mode"]:
            g = g + wd * p
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        c1, c2 = (1 - b1**t, 1 - b2**t) if hp["bias_correction"] else (1.0, 1.0)
        u = (self.m / c1) / ((self.v / c2).sqrt() + hp["eps"])
        scale = self._trust(p, u, hp["max_unorm"])
        decayed = p * (1 - lr * wd) if hp["adam_w_mode"] else p
        return decayed - lr * scale * u

    def _ademamix(self, p, g, lr, wd, t, hp):
        b1, b2, b3 = hp["betas"]
        alpha, t_alpha, t_beta3 = hp["alpha"], hp["t_alpha"], hp["t_beta3"]
        alpha_t = min(t * alpha / t_alpha, alpha) if t_alpha else alpha
        if t_beta3:
            s = t / t_beta3
            lb1, lb3 = math.log(b1), math.log(b3)
            b3 = min(math.exp(lb1 * lb3 / ((1 - s) * lb3 + s * lb1)), b3)
        self.m = b1 * self.m + (1 - b1) * g
        self.m2 = b3 * self.m2 + (1 - b3) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        mhat = self.m / (1 - b1**t)
        vhat = self.v / (1 - b2**t)
        return p * (1 - lr * wd) - lr * (mhat + alpha_t * self.m2) / (vhat.sqrt() + hp["eps"])

    def _momentum_buffer(self, p, g, t, hp):
        g = g + hp["weight_decay"] * p
        mu, damp = hp["momentum"], hp["dampening"]
        self.m = g.clone() if t == 1 else mu * self.m + (1 - damp) * g
        return g + mu * self.m if hp["nesterov"] else self.m

    def _sgd(self, p, g, lr, wd, t, hp):
        return p - lr * self._momentum_buffer(p, g, t, hp)

    def _lars(self, p, g, lr, wd, t, hp):
        u = self._momentum_buffer(p, g, t, hp)
        return p - lr * self._trust(p, u, hp["max_unorm"]) * u

    def _lion(self, p, g, lr, wd, t, hp):
        b1, b2 = hp["betas"]
        u = torch.sign(b1 * self.m + (1 - b1) * g)
        self.m = b2 * self.m + (1 - b2) * g
        return p * (1 - lr * wd) - lr * u

    def _rmsprop(self, p, g, lr, wd, t, hp):
        g = g + wd * p
        a = hp["alpha"]
        self.v = a * self.v + (1 - a) * g * g
        return p - lr * g / (self.v.sqrt() + hp["eps"])

    def _adagrad(self, p, g, lr, wd, t, hp):
        g = g + wd * p
        clr = lr / (1 + (t - 1) * hp["lr_decay"])
        self.v = self.v + g * g
        return p - clr * g / (self.v.sqrt() + hp["eps"])

    def states(self) -> list[torch.Tensor]:
        """The oracle's states in pagedopt's order (state1 moments, then state2)."""
        return {
            "Adam": [self.m, self.v], "AdamW": [self.m, self.v], "LAMB": [self.m, self.v],
            "AdEMAMix": [self.m, self.m2, self.v], "SGD": [self.m], "LARS": [self.m],
            "Lion": [self.m], "RMSprop": [self.v], "Adagrad": [self.v],
        }[self.algo]
