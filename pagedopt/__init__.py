"""pagedopt: 8-bit blockwise-quantized optimizers with paged state, telemetry and configs.

Drop-in for ``bitsandbytes.optim``: change ``import bitsandbytes as bnb`` /
``bnb.optim.AdamW8bit`` to ``import pagedopt`` / ``pagedopt.AdamW8bit``.

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(1024, 1024)
    >>> opt = pagedopt.AdamW8bit(model.parameters(), lr=1e-3)
    >>> model(torch.randn(8, 1024)).pow(2).mean().backward()
    >>> opt.step()
    >>> opt.memory_report().bytes_by_precision["8bit-blockwise"]
    2129920
"""

from __future__ import annotations

from . import backends, functional, optim, telemetry  # backends: registers the native kernels
from ._version import __version__
from .config import ConfigError, PagedoptConfig, build_optimizer, load_config
from .nn import StableEmbedding
from .optim import *  # noqa: F401,F403  (the optimizer classes)
from .optim import OPTIMIZER_NAMES, GlobalOptimManager, Optimizer1State, Optimizer2State, Optimizer8bit
from .paging.config import MemoryConfig, PagingConfig
from .paging.controller import MemoryController, guarded_step

__all__ = [
    "GlobalOptimManager", "Optimizer8bit", "Optimizer2State", "Optimizer1State", "StableEmbedding",
    "PagingConfig", "MemoryConfig", "MemoryController", "guarded_step", "functional", "optim", *OPTIMIZER_NAMES,
    "load_config", "build_optimizer", "PagedoptConfig", "ConfigError",
]
