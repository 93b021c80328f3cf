"""``bitsandbytes.optim``: every optimizer class of bitsandbytes 0.49 (same signatures, see
``tests/data/bitsandbytes_0.49_signatures.json``), ``PytorchLARS``, ``GlobalOptimManager`` and
the base classes - pagedopt's own classes, not copies. pagedopt's extra paged variants
(``PagedSGD8bit``, ``PagedLAMB``, ...) are here too.

Submodules ``optimizer``, ``ademamix`` (with ``_ReferenceAdEMAMix``, a float32 torch
AdEMAMix) and ``adam``, ``adamw``, ``lamb``, ``lars``, ``lion``, ``sgd``, ``rmsprop``,
``adagrad`` resolve as in bitsandbytes.

Example:
    >>> import torch
    >>> from pagedopt.compat.bitsandbytes import optim
    >>> w = torch.nn.Parameter(torch.randn(4096))
    >>> opt = optim.Lion8bit([w], 1e-4, (0.9, 0.99), 0.0)  # bitsandbytes' positional order
    >>> w.grad = torch.randn(4096); opt.step()
"""

from __future__ import annotations

import sys

from ....optim import *  # noqa: F401,F403
from ....optim import OPTIMIZER_NAMES, GlobalOptimManager, Optimizer1State, Optimizer2State, Optimizer8bit, PytorchLARS
from ....optim import adagrad, adam, adamw, lamb, lars, lion, rmsprop, sgd
from . import ademamix, optimizer

# bitsandbytes' per-algorithm submodules are pagedopt's (``bitsandbytes.optim.adamw.AdamW8bit``)
for _module in (adagrad, adam, adamw, lamb, lars, lion, rmsprop, sgd):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module
del _module

__all__ = ["GlobalOptimManager", "Optimizer8bit", "Optimizer1State", "Optimizer2State", "PytorchLARS",
           *OPTIMIZER_NAMES]
