"""The training loop of the main job, built from replaceable parts.

:func:`train` runs one :class:`~pagedopt.train.TrainConfig` and returns a :class:`TrainResult`.
Each concern has one seam, so extensions change one function or add one callback:

- :func:`start_runtime` decides where the run executes: device, seed, threads, and the
  process group of a data-parallel run (a :class:`pagedopt.distributed.DistributedRun`:
  ``config.distributed`` is ``"none"``, ``"ddp"`` or ``"fsdp"``; under ``torchrun`` every
  rank calls :func:`train`);
- :func:`wrap_model` turns the model into the module that is called in the step (DDP or
  FSDP2 wrapping, then ``torch.compile``); the optimizer is built after it, from the
  (possibly sharded) parameters;
- the optimizer comes from ``optimizer_factory`` (default
  :func:`pagedopt.train.optimizers.build_optimizer`);
- :class:`Callback` objects see the run start, every step, every evaluation and the end
  (console progress is one, on the main rank only; metrics exporters are others, on every
  rank).

The step itself never reads a device value on the host: losses and gradient norms stay 0-d
device tensors (averaged over ranks by a collective, not on the host) until a callback asks
for them (at logging steps) or the run ends.

Example:
    >>> from pagedopt.train import TrainConfig, train
    >>> result = train(TrainConfig(steps=3, model_size="tiny", seq_len=32, batch_size=2,
    ...                            max_corpus_bytes=100_000, eval_batches=1, progress="off"))
    >>> result.steps_completed, len(result.train_losses), result.world_size
    (3, 3, 1)
    >>> result.memory.bytes_by_precision["8bit-blockwise"] > 0
    True
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..distributed import DistributedRun, init_distributed
from ..fileio import atomic_write_text
from .checkpoint import resolve_resume, save_sharded, save_single
from .config import DEVICE_AUTO, TrainConfig, TrainConfigError
from .data import BatchSampler, VOCAB_SIZE, check_split_size, eval_batches, load_corpus
from .model import DecoderLM, ModelConfig, lm_loss
from .optimizers import (
    StateMemory, build_optimizer, combine_state_memory, resolved_lr, resolved_weight_decay, state_memory,
)
from .preemption import PreemptionGuard, TrainingAborted
from .progress import ConsoleReporter
from .resume import Checkpointer, RunHistory, restore_run
from .types import Callback, EvalInfo, StepInfo, TrainResult, TrainRun

__all__ = [
    "train", "Callback", "EvalInfo", "StepInfo", "TrainResult", "TrainRun", "OptimizerFactory",
    "resolve_device", "start_runtime", "build_model", "wrap_model", "lr_schedule", "evaluate", "job_state_memory",
]

OptimizerFactory = Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise a checked torch device."""
    if name == DEVICE_AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise TrainConfigError("device", name, f"not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("device", name, f"CUDA is not available (torch {torch.__version__}, "
                                               f"{torch.cuda.device_count()} GPUs visible)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainConfigError("device", name, f"only {torch.cuda.device_count()} CUDA devices are visible")
    return device


def start_runtime(config: TrainConfig) -> DistributedRun:
    """Join the process group ``config.distributed`` asks for (none, DDP or FSDP2; see
    :func:`pagedopt.distributed.init_distributed`), pick this rank's device, set the thread
    count and seed every generator: the same seed on every rank, so all ranks build the same
    initial model. Use as a context manager: leaving it destroys a process group it created.
    """
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        runtime = init_distributed(config.distributed, device=device)
    except ValueError as exc:
        raise TrainConfigError("distributed", config.distributed, str(exc)) from None
    torch.manual_seed(config.seed)  # seeds CUDA generators too
    return runtime


def build_model(config: TrainConfig, runtime: DistributedRun) -> DecoderLM:
    d_model, layers, heads = config.model_dims()
    cfg = ModelConfig(vocab_size=VOCAB_SIZE, d_model=d_model, layers=layers, heads=heads,
                      max_seq_len=config.seq_len, stable_embedding=config.embedding == "stable",
                      tie_weights=config.tie_weights)
    return DecoderLM(cfg).to(runtime.device)


def wrap_model(model: DecoderLM, config: TrainConfig, runtime: DistributedRun) -> nn.Module:
    """The module the step calls. DDP: a ``DistributedDataParallel`` around ``model``. FSDP2:
    each transformer block (the items of ``model.blocks``, an ``nn.ModuleList``) and then the
    root are ``fully_shard``-ed in place, so ``model`` itself now holds DTensor shards. Then
    ``torch.compile`` when asked. Build the optimizer from ``model`` afterwards."""
    train_model = runtime.wrap(model)
    if config.compile:
        return torch.compile(train_model)
    return train_model


def lr_schedule(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``i`` scheduler steps: linear warm-up, then cosine
    decay to ``min_lr_ratio``.

    Example:
        >>> f = lr_schedule(TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1))
        >>> [round(f(i), 3) for i in (0, 9, 10, 55, 100)]
        [0.1, 1.0, 1.0, 0.55, 0.1]
    """
    warmup, total, floor = config.resolved_warmup_steps, config.steps, config.min_lr_ratio

    def multiplier(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], autocast) -> torch.Tensor:
    """Mean validation loss over ``batches`` (a 0-d device tensor)."""
    was_training = model.training
    model.eval()
    try:
        with autocast():
            losses = [lm_loss(model, x, y) for x, y in batches]
    finally:
        model.train(was_training)
    return torch.stack(losses).mean()


def _autocast_factory(config: TrainConfig, device: torch.device) -> Callable[[], Any]:
    if config.amp == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def train(config: TrainConfig, callbacks: Sequence[Callback] = (), *,
          optimizer_factory: OptimizerFactory = build_optimizer, stream=None) -> TrainResult:
    """Train the demo transformer as ``config`` says; returns the :class:`TrainResult`.

    Console progress (``config.progress``) is added to ``callbacks`` on the main rank and
    written to ``stream`` (default ``sys.stdout``). SIGTERM, SIGINT and SIGUSR1 stop the run
    after the current step (never inside it; see :mod:`pagedopt.train.preemption`): with
    ``config.checkpoint_dir`` a checkpoint is written and the result says ``preempted``;
    without it the run evaluates, reports, writes its outputs and returns
    (``result.interrupted``). A second Ctrl-C outside a save aborts
    (:class:`~pagedopt.train.preemption.TrainingAborted`). ``config.resume`` continues from a
    checkpoint (:mod:`pagedopt.train.checkpoint`). ``config.threads`` applies for the run
    only. Under ``torchrun`` every rank calls this and gets the same result.
    """
    threads_before = torch.get_num_threads()
    try:
        with start_runtime(config) as runtime, PreemptionGuard() as guard:
            return _train(config, runtime, callbacks, optimizer_factory, stream, guard)
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


def _train(config: TrainConfig, runtime: DistributedRun, callbacks: Sequence[Callback],
           optimizer_factory: OptimizerFactory, stream, guard: PreemptionGuard) -> TrainResult:
    started = time.perf_counter()
    _check_outputs(config, runtime)
    resume_from = resolve_resume(config.resume, config.checkpoint_dir) if config.resume else None
    corpus = load_corpus(config.data, config.data_glob, config.max_corpus_bytes, config.val_fraction)
    check_split_size("train", corpus.train, config.seq_len)
    check_split_size("validation", corpus.val, config.seq_len)
    model = build_model(config, runtime)
    train_model = wrap_model(model, config, runtime)
    optimizer = optimizer_factory(model, config)
    if config.update_in_backward:  # updates happen inside loss.backward(); step() finds nothing left
        optimizer.update_in_backward = True
    memory_job = None
    if config.memory_limit is not None:  # --memory-limit: see pagedopt/train/memory.py
        from .memory import MemoryJob

        memory_job = MemoryJob.setup(config.memory_limit, model, optimizer, runtime.device)
        memory_job.stream = stream  # the plan now, the peak in _finish
        if runtime.is_main and config.progress != "off":
            print(memory_job.plan_text(), file=stream or sys.stdout)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    # Each rank draws its own stream of windows (seed and rank select it).
    sampler = BatchSampler(corpus.train, config.batch_size, config.seq_len, config.seed, runtime.rank, runtime.device)
    val_batches = eval_batches(corpus.val, config.batch_size, config.seq_len, config.eval_batches, runtime.device)
    autocast = _autocast_factory(config, runtime.device)
    callbacks = list(callbacks)
    if config.progress != "off" and runtime.is_main:
        callbacks.insert(0, ConsoleReporter(config.progress, stream))
    run = TrainRun(config, runtime, corpus, model, train_model, optimizer, scheduler,
                   tokens_per_step=config.batch_size * config.seq_len * runtime.world_size,
                   memory_job=memory_job)
    history = RunHistory()
    checkpoints = Checkpointer(config, runtime)
    if resume_from is not None:
        restore_run(resume_from, run, sampler, history)
        checkpoints.mark_saved(run.step, resume_from.path)
        run.resumed_from = run.step

    for cb in callbacks:
        cb.on_train_start(run)

    def run_eval(step: int) -> EvalInfo:
        t0 = time.perf_counter()
        # The plain model: a compiled one would recompile for eval mode and no_grad, which costs
        # more than a few evaluations save. Every rank evaluates the same fixed batches.
        info = EvalInfo(step, runtime.mean(evaluate(model, val_batches, autocast)))
        history.eval_seconds += time.perf_counter() - t0
        for cb in callbacks:
            cb.on_eval(run, info)
        return info

    if not history.evals:
        history.evals.append(run_eval(0))
    interrupted = False
    model.train()
    clock = _TrainingClock(history)

    try:
        for step in range(run.step + 1, config.steps + 1):
            if checkpoints.stop_requested(guard):
                break
            batch = sampler.next_batch()  # (outside the guarded step: a retry after an OOM reuses it)
            if memory_job is None:
                info = _train_step(run, batch, autocast, step)
            else:
                info = memory_job.run_step(lambda step=step, batch=batch: _train_step(run, batch, autocast, step))
            history.losses.append(info.loss)
            info.train_seconds = clock.seconds()
            for cb in callbacks:
                cb.on_step_end(run, info)
            if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                history.evals.append(run_eval(step))
            if step != config.steps and checkpoints.due(step):
                history.train_seconds = clock.seconds()
                checkpoints.save(run, sampler, history, guard)
                clock = _TrainingClock(history)
    except TrainingAborted:
        raise
    except KeyboardInterrupt:
        if runtime.world_size > 1:
            raise
        interrupted = True
    runtime.synchronize()
    history.train_seconds = clock.seconds()
    preempted = checkpoints.stop_requested(guard) and run.step < config.steps
    if preempted and config.checkpoint_dir:
        path = checkpoints.save(run, sampler, history, guard)
        return _finish(run, history, callbacks, started, guard, interrupted=True, preempted=True, checkpoint=path,
                       write_outputs=False)
    interrupted = interrupted or preempted
    if run.step and history.evals[-1].step != run.step:
        history.evals.append(run_eval(run.step))
    checkpoint = None
    if config.checkpoint_dir and run.step and not interrupted:
        checkpoint = checkpoints.save(run, sampler, history, guard)  # the end of the run, for a requeue
    return _finish(run, history, callbacks, started, guard, interrupted=interrupted, preempted=False,
                   checkpoint=checkpoint, write_outputs=True)


class _TrainingClock:
    """Wall time spent training: what the history had, plus time since this clock started."""

    def __init__(self, history: RunHistory) -> None:
        self.history = history
        self.base = history.train_seconds
        self.started = time.perf_counter()
        self.eval_before = history.eval_seconds

    def seconds(self) -> float:  # evaluations excluded
        return self.base + time.perf_counter() - self.started - (self.history.eval_seconds - self.eval_before)


def _finish(run: TrainRun, history: RunHistory, callbacks: Sequence[Callback], started: float,
            guard: PreemptionGuard, *, interrupted: bool, preempted: bool, checkpoint: Any,
            write_outputs: bool) -> TrainResult:
    config, runtime = run.config, run.runtime
    train_losses = torch.stack(history.losses).float().cpu().tolist() if history.losses else []
    window = min(config.resolved_log_every, len(train_losses)) or 1
    evals = history.evals
    result = TrainResult(
        config=config,
        device=str(runtime.device),
        optimizer=config.optimizer,
        lr=resolved_lr(config),
        weight_decay=resolved_weight_decay(config),
        num_parameters=run.model.num_parameters(),
        steps_completed=run.step,
        interrupted=interrupted,
        train_losses=train_losses,
        final_train_loss=sum(train_losses[-window:]) / window if train_losses else math.nan,
        initial_val_loss=evals[0].val_loss,
        final_val_loss=evals[-1].val_loss,
        evals=list(evals),
        tokens=run.step * run.tokens_per_step,
        train_seconds=history.train_seconds,
        eval_seconds=history.eval_seconds,
        total_seconds=time.perf_counter() - started,
        memory=job_state_memory(run.optimizer, runtime),
        loss_window=window,
        world_size=runtime.world_size,
        distributed=runtime.mode,
        resumed_from_step=run.resumed_from,
        preempted=preempted,
        checkpoint=None if checkpoint is None else str(checkpoint),
        memory_limit=None if run.memory_job is None else {"limit_bytes": run.memory_job.limit, **run.memory_job.peak()},
    )
    if write_outputs:
        _write_outputs(run, result)
    elif config.json_path and runtime.is_main:
        write_json_summary(config.json_path, result)
    # Training is over: signals act as usual again (e.g. Ctrl-C or SIGTERM ends a metrics linger).
    guard.__exit__(None, None, None)
    if run.memory_job is not None and runtime.is_main and config.progress != "off":
        print(run.memory_job.peak_text(), file=getattr(run.memory_job, 'stream', None) or sys.stdout)
    for cb in callbacks:
        cb.on_train_end(run, result)
    return result


def job_state_memory(optimizer: torch.optim.Optimizer, runtime: DistributedRun) -> StateMemory:
    """The optimizer-state memory of the whole job: this process's, or every rank's summed
    (see :func:`~pagedopt.train.optimizers.combine_state_memory`); a collective under
    DDP/FSDP."""
    mine = state_memory(optimizer)
    if runtime.world_size == 1:
        return mine
    return combine_state_memory(runtime.gather_object(mine), replicated=runtime.mode == "ddp")


def _train_step(run: TrainRun, batch: tuple[torch.Tensor, torch.Tensor], autocast, step: int) -> StepInfo:
    config, optimizer = run.config, run.optimizer
    x, y = batch
    with autocast():
        loss = lm_loss(run.train_model, x, y)
    loss.backward()
    grad_norm = None
    if config.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.max_grad_norm, foreach=True)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor; its local value is the norm
            grad_norm = grad_norm.full_tensor()
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step = step
    return StepInfo(step=step, loss=run.runtime.average(loss.detach()), grad_norm=grad_norm, lr=lr,
                    tokens=step * run.tokens_per_step, train_seconds=0.0)


def _write_outputs(run: TrainRun, result: TrainResult) -> None:
    """The final export (``--save``), then the JSON summary (main rank): the checkpoint first,
    so that a JSON failure (a full disk) can never cost the checkpoint. ``--save`` is
    ``torch.save`` of the model and optimizer state dicts by the main rank, written atomically,
    or under FSDP2 a DCP directory written by every rank
    (:func:`pagedopt.distributed.save_checkpoint`; load it at any world size with
    :func:`pagedopt.distributed.load_checkpoint`). A write failure raises
    :class:`pagedopt.fileio.AtomicWriteError` naming the path and the errno."""
    config, runtime = run.config, run.runtime
    if config.save_path:
        extra = {"config": config.to_dict(), "step": result.steps_completed}
        if runtime.mode == "fsdp":
            save_sharded(Path(config.save_path), run.model, run.optimizer, extra, None, runtime)
        elif runtime.is_main:
            _ensure_parent(config.save_path)
            save_single(Path(config.save_path), {"model": run.model.state_dict(),
                                                 "optimizer": run.optimizer.state_dict(), **extra})
    if config.json_path and runtime.is_main:
        write_json_summary(config.json_path, result)


def write_json_summary(path: str, result: TrainResult) -> None:
    """``result.to_dict()`` as JSON, atomically."""
    _ensure_parent(path)
    atomic_write_text(path, json.dumps(result.to_dict(), indent=2, allow_nan=True) + "\n")


def _check_outputs(config: TrainConfig, runtime: DistributedRun) -> None:
    """Fail before training, not after it, when an output cannot be written. Single-writer
    files are checked by the main rank; a DCP checkpoint directory by every rank."""
    if runtime.is_main:
        _check_output_path("json_path", config.json_path)
        if config.checkpoint_dir is not None:
            _check_output_dir("checkpoint_dir", config.checkpoint_dir)
    if config.save_path is None:
        return
    if runtime.mode == "fsdp":
        _check_output_dir("save_path", config.save_path)
    elif runtime.is_main:
        _check_output_path("save_path", config.save_path)


def _check_output_dir(name: str, path: str) -> None:
    """A directory that exists and is writable, or can be created (nothing is created here)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise TrainConfigError(name, path, "is a file; a sharded (FSDP) checkpoint is a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise TrainConfigError(name, path, f"cannot write there ({existing} is not a writable directory)")


def _check_output_path(name: str, path: str | None) -> None:
    """Fail before training, not after it, when an output file cannot be written."""
    if path is None:
        return
    if os.path.isdir(path):
        raise TrainConfigError(name, path, "is a directory")
    existed = os.path.exists(path)
    try:
        _ensure_parent(path)
        with open(path, "ab"):  # appending creates the file without truncating an old one
            pass
    except OSError as exc:
        raise TrainConfigError(name, path, f"cannot write there ({exc.strerror or exc})") from None
    if not existed:
        os.remove(path)


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
