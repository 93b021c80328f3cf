"""pagedopt's optimizers: the bitsandbytes 0.49 optimizer API.

For each of Adam, AdamW, Lion, AdEMAMix, SGD, RMSprop, Adagrad, LAMB and LARS there are six
classes: ``X`` (``optim_bits`` selects 8 or 32), ``X8bit``, ``X32bit``, ``PagedX``,
``PagedX8bit`` and ``PagedX32bit``.

Example:
    >>> import torch
    >>> from pagedopt.optim import AdamW8bit
    >>> model = torch.nn.Linear(512, 512)
    >>> opt = AdamW8bit(model.parameters(), lr=1e-3)
"""

from .adagrad import Adagrad, Adagrad8bit, Adagrad32bit, PagedAdagrad, PagedAdagrad8bit, PagedAdagrad32bit
from .adam import Adam, Adam8bit, Adam32bit, PagedAdam, PagedAdam8bit, PagedAdam32bit
from .adamw import AdamW, AdamW8bit, AdamW32bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit
from .ademamix import (
    AdEMAMix, AdEMAMix8bit, AdEMAMix32bit, PagedAdEMAMix, PagedAdEMAMix8bit, PagedAdEMAMix32bit,
)
from .lamb import LAMB, LAMB8bit, LAMB32bit, PagedLAMB, PagedLAMB8bit, PagedLAMB32bit
from .lars import LARS, LARS8bit, LARS32bit, PagedLARS, PagedLARS8bit, PagedLARS32bit, PytorchLARS
from .lion import Lion, Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit
from .manager import GlobalOptimManager
from .optimizer import Optimizer1State, Optimizer2State, Optimizer8bit
from .rmsprop import PagedRMSprop, PagedRMSprop8bit, PagedRMSprop32bit, RMSprop, RMSprop8bit, RMSprop32bit
from .sgd import SGD, SGD8bit, SGD32bit, PagedSGD, PagedSGD8bit, PagedSGD32bit

ALGORITHMS = ("Adam", "AdamW", "Lion", "AdEMAMix", "SGD", "RMSprop", "Adagrad", "LAMB", "LARS")
VARIANT_FORMATS = ("{}", "{}8bit", "{}32bit", "Paged{}", "Paged{}8bit", "Paged{}32bit")
OPTIMIZER_NAMES = tuple(fmt.format(a) for a in ALGORITHMS for fmt in VARIANT_FORMATS)

__all__ = [
    "Optimizer8bit", "Optimizer2State", "Optimizer1State", "GlobalOptimManager",
    "ALGORITHMS", "OPTIMIZER_NAMES", "PytorchLARS", *OPTIMIZER_NAMES,
]


def get_optimizer_class(name: str) -> type:
    """The optimizer class called ``name`` (e.g. ``"AdamW8bit"``); ValueError names the choices."""
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    return globals()[name]
