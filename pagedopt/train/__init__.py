"""The main job: train a small byte-level transformer with a pagedopt optimizer.

``pagedopt train`` on the command line is a thin wrapper around :func:`train`. The default
run trains a 4-layer decoder-only transformer on the Python standard library's own source
(read from the running interpreter, no downloads) with 8-bit AdamW, and ends with a summary
of the losses and of the optimizer-state memory compared with fp32 state.

Parts: :mod:`~pagedopt.train.config` (:class:`TrainConfig`), :mod:`~pagedopt.train.data`
(corpus and batches), :mod:`~pagedopt.train.model` (the transformer),
:mod:`~pagedopt.train.optimizers` (optimizer construction and state memory),
:mod:`~pagedopt.train.loop` (the loop and its extension points),
:mod:`~pagedopt.train.progress` (console output), :mod:`~pagedopt.train.types` (the
step/result types they share), :mod:`~pagedopt.train.checkpoint` and
:mod:`~pagedopt.train.resume` (periodic checkpoints and resume),
:mod:`~pagedopt.train.preemption` (signals stop the run between steps).

Example:
    >>> from pagedopt.train import TrainConfig, train
    >>> result = train(TrainConfig(steps=4, model_size="tiny", seq_len=32, batch_size=4,
    ...                            max_corpus_bytes=100_000, eval_batches=1, progress="off"))
    >>> result.final_val_loss < result.initial_val_loss
    True
    >>> result.memory.saving_ratio > 1
    True
"""

from .config import MODEL_PRESETS, OPTIMIZER_CHOICES, TORCH_BASELINE, TrainConfig, TrainConfigError
from .loop import train
from .types import Callback, EvalInfo, StepInfo, TrainResult, TrainRun

__all__ = [
    "TrainConfig", "TrainConfigError", "MODEL_PRESETS", "OPTIMIZER_CHOICES", "TORCH_BASELINE",
    "train", "TrainResult", "TrainRun", "Callback", "StepInfo", "EvalInfo",
]
