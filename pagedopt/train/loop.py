"""The training loop of the main job, built from replaceable parts.

:func:`train` runs one :class:`~pagedopt.train.TrainConfig` and returns a :class:`TrainResult`.
Each concern has one seam, so extensions change one function or add one callback:

- :func:`setup_runtime` decides where the run executes (device, seed, threads; rank and world
  size are part of :class:`Runtime` for data-parallel runs);
- :func:`prepare_model` turns the model into the module that is called in the step
  (``torch.compile`` today; DDP/FSDP wrapping belongs here);
- the optimizer comes from ``optimizer_factory`` (default
  :func:`pagedopt.train.optimizers.build_optimizer`);
- :class:`Callback` objects see the run start, every step, every evaluation and the end
  (console progress is one; metrics exporters are others).

The step itself never reads a device value on the host: losses and gradient norms stay 0-d
device tensors until a callback asks for them (at logging steps) or the run ends.

Example:
    >>> from pagedopt.train import TrainConfig, train
    >>> result = train(TrainConfig(steps=3, model_size="tiny", seq_len=32, batch_size=2,
    ...                            max_corpus_bytes=100_000, eval_batches=1, progress="off"))
    >>> result.steps_completed, len(result.train_losses)
    (3, 3)
    >>> result.memory.bytes_by_precision["8bit-blockwise"] > 0
    True
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .config import DEVICE_AUTO, TrainConfig, TrainConfigError
from .data import Corpus, BatchSampler, VOCAB_SIZE, check_split_size, eval_batches, load_corpus
from .model import DecoderLM, ModelConfig, lm_loss
from .optimizers import StateMemory, build_optimizer, resolved_lr, resolved_weight_decay, state_memory

OptimizerFactory = Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]


@dataclass
class Runtime:
    """Where the run executes. A single process is rank 0 of 1; a data-parallel launcher
    sets ``rank``/``world_size`` and overrides :meth:`mean_across_ranks`.

    Example:
        >>> Runtime(torch.device("cpu")).is_main
        True
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main rank prints and writes files."""
        return self.rank == 0

    def mean_across_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over all ranks (identity for one process)."""
        return value

    def synchronize(self) -> None:
        """Wait for queued device work (for honest wall-clock times; never inside a step)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


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


def setup_runtime(config: TrainConfig) -> Runtime:
    """Pick the device, seed every generator and set the thread count."""
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # seeds CUDA generators too
    return Runtime(device=device)


def build_model(config: TrainConfig, runtime: Runtime) -> DecoderLM:
    d_model, layers, heads = config.model_dims()
    cfg = ModelConfig(vocab_size=VOCAB_SIZE, d_model=d_model, layers=layers, heads=heads,
                      max_seq_len=config.seq_len, stable_embedding=config.embedding == "stable",
                      tie_weights=config.tie_weights)
    return DecoderLM(cfg).to(runtime.device)


def prepare_model(model: nn.Module, config: TrainConfig, runtime: Runtime) -> nn.Module:
    """The module the step calls: ``model`` itself, or compiled (data-parallel wrappers go here)."""
    if config.compile:
        return torch.compile(model)
    return model


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
    loss: torch.Tensor
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
    """Everything a callback may need while the run is going: settings, runtime, corpus,
    model (plain and as called in the step), optimizer, scheduler and the last finished step.

    Example:
        >>> from pagedopt.train import TrainConfig
        >>> class Watch(Callback):
        ...     def on_train_start(self, run: TrainRun) -> None:
        ...         print(type(run.optimizer).__name__, run.tokens_per_step)
        >>> _ = train(TrainConfig(steps=1, model_size="tiny", seq_len=16, batch_size=2,
        ...                       max_corpus_bytes=50_000, eval_batches=1, progress="off"), [Watch()])
        AdamW8bit 32
    """

    config: TrainConfig
    runtime: Runtime
    corpus: Corpus
    model: DecoderLM
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokens_per_step: int
    step: int = 0


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
    memory: StateMemory
    loss_window: int = 1  # steps averaged into final_train_loss

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "device": self.device,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "num_parameters": self.num_parameters,
            "steps_completed": self.steps_completed,
            "interrupted": self.interrupted,
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

    Console progress (``config.progress``) is added to ``callbacks`` and written to ``stream``
    (default ``sys.stdout``). Ctrl-C stops after the current step; the run still evaluates,
    reports and returns (``result.interrupted``). ``config.threads`` applies for the run only:
    torch's thread count is restored afterwards.
    """
    threads_before = torch.get_num_threads()
    try:
        return _train(config, callbacks, optimizer_factory, stream)
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


def _train(config: TrainConfig, callbacks: Sequence[Callback], optimizer_factory: OptimizerFactory,
           stream) -> TrainResult:
    from .progress import ConsoleReporter  # progress imports this module

    started = time.perf_counter()
    for name in ("json_path", "save_path"):
        _check_output_path(name, getattr(config, name))
    runtime = setup_runtime(config)
    corpus = load_corpus(config.data, config.data_glob, config.max_corpus_bytes, config.val_fraction)
    check_split_size("train", corpus.train, config.seq_len)
    check_split_size("validation", corpus.val, config.seq_len)
    model = build_model(config, runtime)
    train_model = prepare_model(model, config, runtime)
    optimizer = optimizer_factory(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    sampler = BatchSampler(corpus.train, config.batch_size, config.seq_len, config.seed, runtime.rank, runtime.device)
    val_batches = eval_batches(corpus.val, config.batch_size, config.seq_len, config.eval_batches, runtime.device)
    autocast = _autocast_factory(config, runtime.device)
    callbacks = list(callbacks)
    if config.progress != "off" and runtime.is_main:
        callbacks.insert(0, ConsoleReporter(config.progress, stream))
    run = TrainRun(config, runtime, corpus, model, train_model, optimizer, scheduler,
                   tokens_per_step=config.batch_size * config.seq_len * runtime.world_size)

    for cb in callbacks:
        cb.on_train_start(run)
    eval_seconds = 0.0

    def run_eval(step: int) -> EvalInfo:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        # The plain model: a compiled one would recompile for eval mode and no_grad, which costs
        # more than a few evaluations save.
        info = EvalInfo(step, float(runtime.mean_across_ranks(evaluate(model, val_batches, autocast))))
        eval_seconds += time.perf_counter() - t0
        for cb in callbacks:
            cb.on_eval(run, info)
        return info

    evals = [run_eval(0)]
    losses: list[torch.Tensor] = []
    interrupted = False
    model.train()
    train_started, eval_seconds_before = time.perf_counter(), eval_seconds

    def training_seconds() -> float:  # wall time since training began, evaluations excluded
        return time.perf_counter() - train_started - (eval_seconds - eval_seconds_before)

    try:
        for step in range(1, config.steps + 1):
            info = _train_step(run, sampler, autocast, step)
            losses.append(info.loss)
            info.train_seconds = training_seconds()
            for cb in callbacks:
                cb.on_step_end(run, info)
            if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                evals.append(run_eval(step))
    except KeyboardInterrupt:
        interrupted = True
    runtime.synchronize()
    train_seconds = training_seconds()
    if run.step and (not evals or evals[-1].step != run.step):
        evals.append(run_eval(run.step))

    train_losses = torch.stack(losses).float().cpu().tolist() if losses else []
    window = min(config.resolved_log_every, len(train_losses)) or 1
    result = TrainResult(
        config=config,
        device=str(runtime.device),
        optimizer=config.optimizer,
        lr=resolved_lr(config),
        weight_decay=resolved_weight_decay(config),
        num_parameters=model.num_parameters(),
        steps_completed=run.step,
        interrupted=interrupted,
        train_losses=train_losses,
        final_train_loss=sum(train_losses[-window:]) / window if train_losses else math.nan,
        initial_val_loss=evals[0].val_loss,
        final_val_loss=evals[-1].val_loss,
        evals=evals,
        tokens=run.step * run.tokens_per_step,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        total_seconds=time.perf_counter() - started,
        memory=state_memory(optimizer),
        loss_window=window,
    )
    if runtime.is_main:
        _write_outputs(run, result)
    for cb in callbacks:
        cb.on_train_end(run, result)
    return result


def _train_step(run: TrainRun, sampler: BatchSampler, autocast, step: int) -> StepInfo:
    config, optimizer = run.config, run.optimizer
    x, y = sampler.next_batch()
    with autocast():
        loss = lm_loss(run.train_model, x, y)
    loss.backward()
    grad_norm = None
    if config.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.max_grad_norm, foreach=True)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step = step
    return StepInfo(step=step, loss=run.runtime.mean_across_ranks(loss.detach()), grad_norm=grad_norm, lr=lr,
                    tokens=step * run.tokens_per_step, train_seconds=0.0)


def _write_outputs(run: TrainRun, result: TrainResult) -> None:
    config = run.config
    if config.json_path:
        _ensure_parent(config.json_path)
        with open(config.json_path, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2, allow_nan=True)
            f.write("\n")
    if config.save_path:
        _ensure_parent(config.save_path)
        torch.save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                    "config": config.to_dict(), "step": result.steps_completed}, config.save_path)


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
