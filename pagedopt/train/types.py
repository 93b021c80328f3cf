"""The types the training loop shares with its callbacks: steps, evaluations, the run, the result.

They live below :mod:`~pagedopt.train.loop` and :mod:`~pagedopt.train.progress` so that
neither imports the other (the loop adds the console reporter; the reporter reads these).

Example:
    >>> import torch
    >>> from pagedopt.train.types import StepInfo
    >>> StepInfo(step=3, loss=torch.tensor(2.5), grad_norm=None, lr=1e-3, tokens=96, train_seconds=0.2).step
    3
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..distributed import DistributedRun
from .config import TrainConfig
from .data import Corpus
from .model import DecoderLM
from .optimizers import StateMemory


@dataclass
class StepInfo:
    """One finished step. ``loss`` and ``grad_norm`` are detached 0-d device tensors: reading
    them (``float(...)``) waits for the device, so callbacks do it only when they report.

    Example:
        >>> info = StepInfo(step=1, loss=torch.tensor(5.5), grad_norm=None, lr=1e-3, tokens=256, train_seconds=0.1)
        >>> float(info.loss)
        5.5
    """

    step: int
    loss: torch.Tensor  # mean over ranks
    grad_norm: torch.Tensor | None
    lr: float
    tokens: int  # tokens processed so far, all ranks together
    train_seconds: float  # wall time spent in training steps so far (evaluation excluded)


@dataclass
class EvalInfo:
    """A validation pass: mean loss (nats per byte) over the fixed validation set after ``step``
    steps (0: before training).

    Example:
        >>> EvalInfo(step=0, val_loss=5.55).val_loss
        5.55
    """

    step: int
    val_loss: float


@dataclass
class TrainRun:
    """Everything a callback may need while the run is going: settings, runtime (rank, world
    size, device), corpus, model (plain - FSDP2-sharded in place under ``fsdp`` - and as called
    in the step, e.g. the DDP wrapper), optimizer, scheduler and the last finished step.

    Example:
        >>> from pagedopt.train import TrainConfig, train
        >>> class Watch(Callback):
        ...     def on_train_start(self, run: TrainRun) -> None:
        ...         print(type(run.optimizer).__name__, run.tokens_per_step)
        >>> _ = train(TrainConfig(steps=1, model_size="tiny", seq_len=16, batch_size=2,
        ...                       max_corpus_bytes=50_000, eval_batches=1, progress="off"), [Watch()])
        AdamW8bit 32
    """

    config: TrainConfig
    runtime: DistributedRun
    corpus: Corpus
    model: DecoderLM
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokens_per_step: int
    step: int = 0
    resumed_from: int = 0  # the checkpoint's step when the run was resumed (0: a fresh start)
    memory_job: Any = None  # --memory-limit: pagedopt.train.memory.MemoryJob


@dataclass
class TrainResult:
    """What a run produced; :meth:`to_dict` is the ``--json`` summary.

    Example:
        >>> from pagedopt.train import TrainConfig, train
        >>> r = train(TrainConfig(steps=2, model_size="tiny", seq_len=16, batch_size=2,
        ...                       max_corpus_bytes=50_000, eval_batches=1, progress="off"))
        >>> summary = r.to_dict()
        >>> summary["steps_completed"], "fp32_equivalent_bytes" in summary["optimizer_state"]
        (2, True)
    """

    config: TrainConfig
    device: str
    optimizer: str
    lr: float
    weight_decay: float
    num_parameters: int
    steps_completed: int
    interrupted: bool
    train_losses: list[float]
    final_train_loss: float
    initial_val_loss: float
    final_val_loss: float
    evals: list[EvalInfo]
    tokens: int
    train_seconds: float
    eval_seconds: float
    total_seconds: float
    memory: StateMemory  # the whole job's (summed over ranks)
    loss_window: int = 1  # steps averaged into final_train_loss
    world_size: int = 1
    distributed: str = "none"
    resumed_from_step: int = 0  # 0: a fresh start
    preempted: bool = False  # stopped by a signal; ``checkpoint`` is where it can resume from
    checkpoint: str | None = None  # the last checkpoint written (with ``checkpoint_dir``)
    # --memory-limit: the limit, peaks and OOM recoveries (pagedopt.train.memory.MemoryJob.peak)
    memory_limit: dict[str, int] | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "device": self.device,
            "distributed": self.distributed,
            "world_size": self.world_size,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "num_parameters": self.num_parameters,
            "steps_completed": self.steps_completed,
            "interrupted": self.interrupted,
            "preempted": self.preempted,
            "resumed_from_step": self.resumed_from_step,
            "checkpoint": self.checkpoint,
            "final_train_loss": self.final_train_loss,
            "final_train_loss_window": self.loss_window,
            "initial_val_loss": self.initial_val_loss,
            "final_val_loss": self.final_val_loss,
            "evals": [{"step": e.step, "val_loss": e.val_loss} for e in self.evals],
            "train_losses": self.train_losses,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens_per_second,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "total_seconds": self.total_seconds,
            "optimizer_state": self.memory.to_dict(),
            "memory_limit": self.memory_limit,
        }


class Callback:
    """Hooks into :func:`train`; override the ones you need (all default to doing nothing).

    Example:
        >>> class CountSteps(Callback):
        ...     def __init__(self): self.steps = 0
        ...     def on_step_end(self, run, info): self.steps += 1
    """

    def on_train_start(self, run: TrainRun) -> None: ...

    def on_step_end(self, run: TrainRun, info: StepInfo) -> None: ...

    def on_eval(self, run: TrainRun, info: EvalInfo) -> None: ...

    def on_train_end(self, run: TrainRun, result: TrainResult) -> None: ...
