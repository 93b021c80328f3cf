"""Console output of the main job: a header, progress with ``loss=<value>``, and a summary.

On a terminal the current step is one live line, redrawn at most ten times a second, and
every ``log_every`` steps a permanent line is left in the scrollback. Elsewhere (a pipe, a
log file, CI) only the permanent lines are printed::

    step 20/200 loss=3.1234 lr=3.00e-03 gnorm=0.812 tok/s=7,412 elapsed=0:05 eta=0:49

``loss`` is the mean training loss of the steps since the previous line. Reading it waits for
the device, which is why it is read only when something is printed.

Example:
    >>> import io
    >>> from pagedopt.train import TrainConfig, train
    >>> out = io.StringIO()
    >>> _ = train(TrainConfig(steps=2, model_size="tiny", seq_len=16, batch_size=2, log_every=1,
    ...                       max_corpus_bytes=50_000, eval_batches=1, progress="lines"), stream=out)
    >>> [line.split(" loss=")[0] for line in out.getvalue().splitlines() if line.startswith("step ")]
    ['step 1/2', 'step 2/2']
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

import torch

from .types import Callback, EvalInfo, StepInfo, TrainResult, TrainRun
from .optimizers import StateMemory, resolved_lr, resolved_weight_decay

LIVE_REFRESH_SECONDS = 0.1
CLEAR_TO_END = "\x1b[K"


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` or ``m:ss``.

    Example:
        >>> format_duration(65.2), format_duration(3725)
        ('1:05', '1:02:05')
    """
    if not math.isfinite(seconds):
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_bytes(n: float) -> str:
    """Bytes with a binary unit.

    Example:
        >>> format_bytes(1536), format_bytes(3 * 2**20)
        ('1.50 KiB', '3.00 MiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _window(n: int) -> str:
    return "the last step" if n == 1 else f"mean of the last {n} steps"


def bits_per_byte(loss_nats: float) -> float:
    return loss_nats / math.log(2)


class ConsoleReporter(Callback):
    """Prints the run to ``stream``: ``mode`` is ``"auto"`` (live on a terminal, lines
    otherwise), ``"live"`` or ``"lines"``.

    Example:
        >>> import io
        >>> ConsoleReporter("auto", io.StringIO()).live  # a StringIO is not a terminal
        False
    """

    def __init__(self, mode: str = "auto", stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "live" if callable(isatty) and isatty() else "lines"
        self.live = mode == "live"
        self._window: list[torch.Tensor] = []  # losses since the last printed value
        self._last_draw = 0.0
        self._live_shown = False

    # -- output helpers -------------------------------------------------------------------------

    def _print(self, line: str) -> None:
        if self._live_shown:  # replace the live line instead of leaving it half-overwritten
            line = "\r" + line + CLEAR_TO_END
            self._live_shown = False
        self.stream.write(line + "\n")
        self.stream.flush()

    def _draw_live(self, line: str) -> None:
        self.stream.write("\r" + line + CLEAR_TO_END)
        self.stream.flush()
        self._live_shown = True

    # -- callbacks ------------------------------------------------------------------------------

    def on_train_start(self, run: TrainRun) -> None:
        cfg, model, runtime = run.config, run.model, run.runtime
        m = model.cfg
        where = str(runtime.device)
        if runtime.world_size > 1 or runtime.mode != "none":
            where += f" x {runtime.world_size} {'rank' if runtime.world_size == 1 else 'ranks'} ({runtime.mode}, {runtime.backend})"
        self._print(f"pagedopt train: {cfg.steps} steps on {where}, seed {cfg.seed}")
        self._print(f"  model     decoder-only transformer, {model.num_parameters():,} parameters "
                    f"(d_model={m.d_model}, layers={m.layers}, heads={m.heads}, seq_len={cfg.seq_len}, "
                    f"{cfg.embedding} embedding{', tied head' if m.tie_weights else ''}"
                    f"{', bf16 autocast' if cfg.amp == 'bf16' else ''}{', compiled' if cfg.compile else ''})")
        self._print(f"  data      {run.corpus.describe()}")
        extras = [f"batch {cfg.batch_size}x{cfg.seq_len} bytes"]
        if cfg.max_grad_norm > 0:
            extras.append(f"grad-norm clip {cfg.max_grad_norm:g}")
        if cfg.percentile_clipping < 100:
            extras.append(f"percentile clipping {cfg.percentile_clipping}")
        self._print(f"  optimizer {cfg.optimizer}, lr {resolved_lr(cfg):.2e} (warm-up {_steps(cfg.resolved_warmup_steps)}, "
                    f"cosine to {cfg.min_lr_ratio:g}x), weight decay {resolved_weight_decay(cfg):g}, "
                    f"{', '.join(extras)}")
        if cfg.file_config is not None:
            self._print(f"  config    {config_file_summary(cfg)}")

    def on_step_end(self, run: TrainRun, info: StepInfo) -> None:
        self._window.append(info.loss)
        cfg = run.config
        permanent = info.step % cfg.resolved_log_every == 0 or info.step == cfg.steps
        now = time.perf_counter()
        if not permanent and not (self.live and now - self._last_draw >= LIVE_REFRESH_SECONDS):
            return
        self._last_draw = now
        loss = float(torch.stack(self._window).mean())
        line = self._progress_line(run, info, loss)
        if permanent:
            self._window.clear()
            self._print(line)
        else:
            self._draw_live(line)

    def _progress_line(self, run: TrainRun, info: StepInfo, loss: float) -> str:
        steps = run.config.steps
        rate = info.tokens / info.train_seconds if info.train_seconds > 0 else 0.0
        eta = info.train_seconds / info.step * (steps - info.step)
        parts = [f"step {info.step}/{steps}", f"loss={loss:.4f}", f"lr={info.lr:.2e}"]
        if info.grad_norm is not None:
            parts.append(f"gnorm={float(info.grad_norm):.3f}")
        parts += [f"tok/s={rate:,.0f}", f"elapsed={format_duration(info.train_seconds)}",
                  f"eta={format_duration(eta)}"]
        return " ".join(parts)

    def on_eval(self, run: TrainRun, info: EvalInfo) -> None:
        self._print(f"eval step {info.step}/{run.config.steps} val_loss={info.val_loss:.4f} "
                    f"({bits_per_byte(info.val_loss):.3f} bits/byte)")

    def on_train_end(self, run: TrainRun, result: TrainResult) -> None:
        for line in summary_lines(result):
            self._print(line)


def config_file_summary(cfg) -> str:
    """One line about the optimizer config file: path, rules, paging, groups."""
    file_config = cfg.file_config
    rules = len(file_config.overrides)
    parts = [f"{cfg.config_file}: {rules} override {'rule' if rules == 1 else 'rules'}"]
    if file_config.paging is not None:
        parts.append(f"paging {file_config.paging.policy}")
    if file_config.strict:
        parts.append("strict")
    return ", ".join(parts) + " (rules win over the values above for the parameters they match)"


def summary_lines(result: TrainResult) -> list[str]:
    """The end-of-run summary: steps and speed, final losses, optimizer-state memory."""
    status = "preempted" if result.preempted else "interrupted" if result.interrupted else "done"
    resumed = f" (resumed at step {result.resumed_from_step})" if result.resumed_from_step else ""
    lines = [
        f"{status}: {result.steps_completed}/{result.config.steps} steps in {format_duration(result.total_seconds)} "
        f"(training {result.train_seconds:.1f} s, evaluation {result.eval_seconds:.1f} s), "
        f"{result.tokens_per_second:,.0f} tokens/s{resumed}",
        f"final loss: train={result.final_train_loss:.4f} ({_window(result.loss_window)}) "
        f"val={result.final_val_loss:.4f} ({bits_per_byte(result.final_val_loss):.3f} bits/byte; "
        f"initial val={result.initial_val_loss:.4f})",
    ]
    return lines + memory_lines(result.optimizer, result.memory)


def memory_lines(optimizer: str, memory: StateMemory) -> list[str]:
    """Optimizer-state bytes by precision and the comparison with fp32 state."""
    job = ""
    if memory.ranks > 1:
        kind = "a full replica on each" if memory.replicated else "each holds its shards"
        job = f", all {memory.ranks} ranks: {kind}"
    lines = [f"optimizer state ({optimizer}{job}): {memory.total_bytes:,} bytes ({format_bytes(memory.total_bytes)})"]
    for precision, nbytes in sorted(memory.bytes_by_precision.items()):
        params = memory.parameters_by_precision.get(precision, 0)
        lines.append(f"  {precision + ':':<18}{nbytes:>14,} bytes  for {params:,} parameters")
    if memory.shared_bytes:
        lines.append(f"  {'quantization maps:':<18}{memory.shared_bytes:>14,} bytes")
    if memory.paged or len(memory.bytes_by_residency) > 1:
        where = ", ".join(f"{place} {nbytes:,} bytes" for place, nbytes in sorted(memory.bytes_by_residency.items()))
        lines.append(f"  {'residency:':<18}{where}")
    saved = 1.0 - 1.0 / memory.saving_ratio if memory.saving_ratio > 0 else 0.0
    lines.append(f"  fp32 states would take {memory.fp32_equivalent_bytes:,} bytes "
                 f"({format_bytes(memory.fp32_equivalent_bytes)}): {memory.saving_ratio:.2f}x the memory "
                 f"({saved:.0%} saved)")
    return lines
