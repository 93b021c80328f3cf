"""Saving and restoring a running job: when to checkpoint, what goes in, how a run resumes.

:class:`Checkpointer` decides when a periodic checkpoint is due (``checkpoint_every`` steps,
``checkpoint_interval`` seconds) and writes it (:mod:`pagedopt.train.checkpoint` holds the
file layout); :func:`restore_run` puts a checkpoint back into a freshly built run: model,
optimizer, scheduler, each rank's data position and generators, the step and the history
(:class:`RunHistory`) the final summary is computed from.

In a multi-process run the ranks must agree on when to stop and when to save: a preemption
signal may reach them at different steps, and their clocks differ. So once per step they
all-reduce a flag (one small collective, and a host read of it, per step - only in
multi-process runs).

Example:
    >>> from pagedopt.train.resume import RunHistory
    >>> h = RunHistory(); h.restore({"train_losses": [5.5, 5.25], "evals": [[0, 5.5]], "train_seconds": 1.5,
    ...                              "eval_seconds": 0.25})
    >>> [float(x) for x in h.losses], [(e.step, e.val_loss) for e in h.evals]
    ([5.5, 5.25], [(0, 5.5)])
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    FORMAT, FORMAT_VERSION, TRAIN_STATE, CheckpointError, CheckpointInfo, CheckpointWriteError, capture_rank_state,
    checkpoint_path, describe_mismatch, load_file, prune, restore_rank_state, save_sharded, save_single,
)
from .types import EvalInfo, TrainRun


@dataclass
class RunHistory:
    """What the summary of a run is computed from: per-step losses (0-d device tensors until
    the end), evaluations, and the time spent training and evaluating.

    Example:
        >>> RunHistory(train_seconds=2.0).to_payload()["train_seconds"]
        2.0
    """

    losses: list[torch.Tensor] = field(default_factory=list)
    evals: list[EvalInfo] = field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0

    def to_payload(self) -> dict[str, Any]:
        """Plain numbers (reads the losses on the host: done at checkpoint time only)."""
        losses = torch.stack(self.losses).float().cpu().tolist() if self.losses else []
        return {"train_losses": losses, "evals": [[e.step, e.val_loss] for e in self.evals],
                "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds}

    def restore(self, payload: dict[str, Any]) -> None:
        # float32 values round-trip exactly through Python floats.
        self.losses = [torch.tensor(x, dtype=torch.float32) for x in payload["train_losses"]]
        self.evals = [EvalInfo(int(step), float(loss)) for step, loss in payload["evals"]]
        self.train_seconds = float(payload["train_seconds"])
        self.eval_seconds = float(payload["eval_seconds"])


class Checkpointer:
    """Periodic checkpoints of one run into ``config.checkpoint_dir`` (a no-op without it).

    Example:
        >>> from pagedopt.distributed import DistributedRun
        >>> from pagedopt.train import TrainConfig
        >>> c = Checkpointer(TrainConfig(checkpoint_dir="ckpt", checkpoint_every=50), DistributedRun("none"))
        >>> [c.due(s) for s in (49, 50)]
        [False, True]
    """

    def __init__(self, config: Any, runtime: Any) -> None:
        self.config = config
        self.runtime = runtime
        self.directory = Path(config.checkpoint_dir) if config.checkpoint_dir else None
        self.sharded = runtime.mode == "fsdp"
        self.last_step: int | None = None
        self.last_path: Path | None = None
        self.last_time = time.monotonic()

    def mark_saved(self, step: int, path: Path) -> None:
        self.last_step, self.last_path, self.last_time = step, Path(path), time.monotonic()

    def due(self, step: int) -> bool:
        """A periodic checkpoint is due after ``step`` (every rank gets the same answer)."""
        if self.directory is None:
            return False
        every, interval = self.config.checkpoint_every, self.config.checkpoint_interval
        if every and step % every == 0:
            return True
        if not interval:
            return False
        elapsed = time.monotonic() - self.last_time >= interval
        if self.runtime.world_size > 1:  # rank clocks differ: save when any rank's is due
            elapsed = self.runtime.sum(1.0 if elapsed else 0.0) > 0
        return elapsed

    def stop_requested(self, guard: Any) -> bool:
        """True once a preemption signal reached this rank or (multi-process) any rank.

        In a multi-process run the answer is the all-reduced flag and nothing else, so every
        rank gets the same one: a signal that lands on this rank while the all-reduce runs is
        answered at the next call. (Re-reading the local flag after the all-reduce let that
        rank leave the loop alone while its peers went on into the next step's collectives,
        and the job hung; found in CI.)
        """
        if self.runtime.world_size == 1:
            return guard.requested
        agreed = self.runtime.sum(1.0 if guard.requested else 0.0) > 0
        if agreed:
            guard.request("signal on another rank")
        return agreed

    def save(self, run: TrainRun, sampler: Any, history: RunHistory, guard: Any) -> Path:
        """Write the checkpoint of ``run.step`` (signals are held off meanwhile), remove old
        ones beyond ``keep``; returns its path. Raises :class:`CheckpointWriteError`."""
        assert self.directory is not None
        if self.last_step == run.step and self.last_path is not None and self.last_path.exists():
            return self.last_path
        with guard.saving():
            path = checkpoint_path(self.directory, run.step, self.sharded)
            rank_states = self.runtime.gather_object(capture_rank_state(sampler.generator))
            common = {"format": FORMAT, "version": FORMAT_VERSION, "step": run.step,
                      "world_size": self.runtime.world_size, "config": _config_payload(run.config),
                      "history": history.to_payload(),
                      "optimizer_steps_taken": getattr(run.optimizer, "steps_taken", None)}
            if self.sharded:
                train_state = {"scheduler": run.scheduler.state_dict(), "ranks": rank_states}
                save_sharded(path, run.model, run.optimizer, common, train_state, self.runtime)
            else:
                self._save_single(path, {**common, "model": run.model.state_dict(),
                                         "optimizer": run.optimizer.state_dict(),
                                         "scheduler": run.scheduler.state_dict(), "ranks": rank_states})
            if self.runtime.is_main:
                prune(self.directory, self.config.keep)
        self.mark_saved(run.step, path)
        return path

    def _save_single(self, path: Path, payload: dict[str, Any]) -> None:
        """Rank 0 writes; every rank learns whether it worked (so none waits forever)."""
        error: CheckpointWriteError | None = None
        if self.runtime.is_main:
            try:
                save_single(path, payload)
            except CheckpointWriteError as err:
                error = err
        failed = self.runtime.sum(1.0 if error else 0.0) > 0 if self.runtime.world_size > 1 else error is not None
        if error is not None:
            raise error
        if failed:
            raise CheckpointWriteError(path, OSError(5, "rank 0 could not write the checkpoint"))


def restore_run(info: CheckpointInfo, run: TrainRun, sampler: Any, history: RunHistory) -> None:
    """Load checkpoint ``info`` into ``run`` (built as for a fresh start) and ``sampler``."""
    runtime = run.runtime
    if info.sharded:
        from ..distributed.checkpoint import load_checkpoint

        payload = load_checkpoint(info.path, run.model, run.optimizer)
        _check_compatible(info.path, payload, run)
        try:
            payload.update(torch.load(info.path / TRAIN_STATE, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, EOFError) as err:
            raise CheckpointError(info.path / TRAIN_STATE, f"cannot be read ({err})") from None
    else:
        if runtime.mode == "fsdp":
            raise CheckpointError(info.path, "a single-file checkpoint (from a run without --distributed fsdp) "
                                             "cannot resume an FSDP run; resume it without FSDP, or start afresh")
        payload = load_file(info.path)
        _check_compatible(info.path, payload, run)
        try:
            run.model.load_state_dict(payload["model"])
            run.optimizer.load_state_dict(payload["optimizer"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(info.path, f"does not fit this run: {err}") from None
    run.scheduler.load_state_dict(payload["scheduler"])
    ranks = payload["ranks"]
    if len(ranks) == runtime.world_size:
        restore_rank_state(ranks[runtime.rank], sampler.generator)
    else:
        warnings.warn(f"{info.path}: saved by {len(ranks)} ranks, resumed by {runtime.world_size}: each rank "
                      "draws a new data stream (the run continues, but not bit-exactly)", stacklevel=2)
        restore_rank_state(ranks[0], sampler.generator)
        sampler.generator.manual_seed(run.config.seed * 100_003 + runtime.rank + 7_919 * int(payload["step"]))
    history.restore(payload["history"])
    run.step = int(payload["step"])
    if payload.get("optimizer_steps_taken") is not None and hasattr(run.optimizer, "steps_taken"):
        run.optimizer.steps_taken = int(payload["optimizer_steps_taken"])


def _check_compatible(path: Path, payload: dict[str, Any], run: TrainRun) -> None:
    if payload.get("format") != FORMAT:
        raise CheckpointError(path, f"not a pagedopt training checkpoint (format {payload.get('format')!r})")
    mismatch = describe_mismatch(payload.get("config", {}), _config_payload(run.config))
    if mismatch:
        raise CheckpointError(path, f"was written by another model or optimizer: {mismatch}")


def _config_payload(config: Any) -> dict[str, Any]:
    return {**config.to_dict(), "model_dims": list(config.model_dims())}
