"""``pagedopt train``: train the demo byte-level transformer and report optimizer memory.

Every flag in the run, optimizer, model and output groups maps to one
:class:`pagedopt.train.TrainConfig` field (``--batch-size`` -> ``batch_size``); flags that
are not given keep the field's default, so a config file (``--config``) can sit underneath
the command line: flags given explicitly override the file's ``optimizer`` section, the
file's ``overrides`` rules still win for the parameters they match. The metrics flags
(:func:`pagedopt.telemetry.training.add_metrics_arguments`) override the file's
``telemetry`` section the same way.

Exit status (docs/train.md): 0 done, or preempted with ``--checkpoint-dir`` (SIGTERM, SIGINT
or SIGUSR1: the current step finishes, a checkpoint is written, and the run prints
``preempted at step N, checkpoint at PATH``); 2 bad input (a flag's value, the config file -
invalid, or a rule matching nothing under ``strict: true`` -, the data, an output path, a
checkpoint that cannot resume this run) or a diverged run; 74 an output could not be written
(a checkpoint, ``--save``, ``--json``: one line naming the path and the errno; earlier
checkpoints are intact); 130 interrupted without ``--checkpoint-dir`` (the run stops after the
current step, evaluates, reports and writes its outputs) or aborted by a second Ctrl-C.
``pagedopt config check`` exits 1 for an invalid file instead: there validation is the result,
here it is bad input like any other.

Example:
    >>> from pagedopt.cli import build_parser
    >>> from pagedopt.commands.train import config_from_args
    >>> args = build_parser().parse_args(["train", "--steps", "50", "--optimizer", "lion8bit"])
    >>> cfg = config_from_args(args)
    >>> cfg.steps, cfg.optimizer, cfg.seed, cfg.distributed
    (50, 'Lion8bit', 0, 'none')
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import warnings
from typing import Any, Iterator

COMMAND = "train"
# Exit code of a run stopped by Ctrl-C (the shell's 128 + SIGINT).
EXIT_INTERRUPTED = 130
# Exit code when a checkpoint, --save or --json could not be written (sysexits.h EX_IOERR).
EXIT_WRITE_FAILED = 74


def _field_defaults() -> dict[str, Any]:
    from ..train.config import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def flag_for(field_name: str) -> str:
    """The command-line flag of a :class:`TrainConfig` field (``json_path`` -> ``--json``)."""
    return {"json_path": "--json", "save_path": "--save", "config_file": "--config", "keep": "--keep"}.get(
        field_name, "--" + field_name.replace("_", "-"))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..distributed.runtime import MODES
    from ..telemetry.training import add_metrics_arguments
    from ..train.config import (
        AMP_MODES, DEFAULT_OPTIMIZER, DEFAULT_PERCENTILE_CLIPPING, EMBEDDINGS, MODEL_PRESETS, PROGRESS_MODES,
        TORCH_BASELINE,
    )

    d = _field_defaults()
    parser = subparsers.add_parser(
        COMMAND,
        help="train a small transformer on the Python standard library (the main job)",
        description=(
            "Train a small byte-level decoder-only transformer on the running Python's own standard "
            "library source with a pagedopt optimizer (8-bit AdamW by default), showing loss=<value> "
            "progress, then print the final losses and the optimizer-state memory next to what fp32 "
            "states would take."
        ),
        argument_default=argparse.SUPPRESS,  # only given flags override TrainConfig's defaults
    )
    run = parser.add_argument_group("run")
    run.add_argument("--steps", type=int, metavar="N", help=f"optimizer steps (default {d['steps']})")
    run.add_argument("--seed", type=int, metavar="N", help=f"random seed (default {d['seed']})")
    run.add_argument("--device", metavar="DEV",
                     help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ... (default auto)")
    run.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    run.add_argument("--amp", choices=AMP_MODES, help=f"autocast precision for forward/backward (default {d['amp']})")
    run.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    run.add_argument("--memory-limit", metavar="BYTES",
                     help="device memory the job may use, e.g. 24GiB: caps torch's allocator and the pager's "
                          "device budget together, guards steps against OOM, prints the memory plan and peak")
    run.add_argument("--update-in-backward", action="store_true",
                     help="update each parameter as soon as backward has its gradient and free the gradient "
                          "(lower peak memory; needs --max-grad-norm 0, percentile clipping still works)")
    run.add_argument("--distributed", choices=MODES,
                     help="data parallelism under torchrun: 'ddp' (DistributedDataParallel) or 'fsdp' (FSDP2 "
                          "fully_shard, sharded optimizer state); e.g. torchrun --nproc-per-node 8 -m pagedopt "
                          "train --distributed fsdp (default none)")

    opt = parser.add_argument_group("optimizer")
    opt.add_argument("--config", dest="config_file", metavar="FILE",
                     help="a pagedopt config file (YAML, TOML, JSON; see 'pagedopt config check'): optimizer, "
                          "paging, telemetry and per-parameter override rules; the flags below override its "
                          "optimizer section only when given")
    opt.add_argument("--optimizer", metavar="NAME",
                     help=f"a pagedopt optimizer class such as AdamW8bit, PagedLion8bit, SGD32bit "
                          f"(case-insensitive), or '{TORCH_BASELINE}' for torch.optim.AdamW (default: the "
                          f"--config file's, else {DEFAULT_OPTIMIZER})")
    opt.add_argument("--lr", type=float, metavar="LR",
                     help="peak learning rate (default: the --config file's, else per optimizer family)")
    opt.add_argument("--weight-decay", type=float, metavar="WD",
                     help="weight decay of the weight matrices (default 0.1 for AdamW/Lion/LAMB/AdEMAMix, else 0); "
                          "with --config: of every parameter the file's rules do not set (default: the file's, "
                          "else the optimizer class's)")
    opt.add_argument("--warmup-steps", type=int, metavar="N", help="linear warm-up steps (default 5%% of --steps)")
    opt.add_argument("--min-lr-ratio", type=float, metavar="R",
                     help=f"cosine decay ends at this fraction of the peak lr (default {d['min_lr_ratio']})")
    opt.add_argument("--max-grad-norm", type=float, metavar="X",
                     help=f"clip the global gradient norm, 0 disables (default {d['max_grad_norm']})")
    opt.add_argument("--percentile-clipping", type=int, metavar="P",
                     help="pagedopt's adaptive clipping at this percentile of the last 100 gradient norms, "
                          f"100 disables (default: the --config file's, else {DEFAULT_PERCENTILE_CLIPPING}; "
                          f"100 for {TORCH_BASELINE})")

    model = parser.add_argument_group("model and data")
    model.add_argument("--model-size", choices=tuple(MODEL_PRESETS),
                       help="preset (d_model, layers, heads): "
                            + ", ".join(f"{k} {v}" for k, v in MODEL_PRESETS.items()) + f" (default {d['model_size']})")
    model.add_argument("--d-model", type=int, metavar="N", help="override the preset's width")
    model.add_argument("--layers", type=int, metavar="N", help="override the preset's number of blocks")
    model.add_argument("--heads", type=int, metavar="N", help="override the preset's attention heads")
    model.add_argument("--embedding", choices=EMBEDDINGS,
                       help=f"token embedding: pagedopt.StableEmbedding or nn.Embedding (default {d['embedding']})")
    model.add_argument("--tie-weights", action="store_true", help="share the token embedding with the output head")
    model.add_argument("--batch-size", type=int, metavar="N", help=f"sequences per step (default {d['batch_size']})")
    model.add_argument("--seq-len", type=int, metavar="N", help=f"bytes per sequence (default {d['seq_len']})")
    model.add_argument("--data", metavar="PATH",
                       help="a text file or directory to train on (default: the standard library sources)")
    model.add_argument("--data-glob", metavar="GLOB", help=f"file pattern under a --data directory (default {d['data_glob']})")
    model.add_argument("--max-corpus-bytes", type=int, metavar="N",
                       help=f"read at most this many bytes (default {d['max_corpus_bytes']:,})")
    model.add_argument("--val-fraction", type=float, metavar="F",
                       help=f"share of files held out for validation (default {d['val_fraction']})")

    out = parser.add_argument_group("output")
    out.add_argument("--log-every", type=int, metavar="N", help="steps between progress lines (default steps/10)")
    out.add_argument("--eval-every", type=int, metavar="N",
                     help="steps between validation passes; 0 evaluates at the start and end only (default 0)")
    out.add_argument("--eval-batches", type=int, metavar="N",
                     help=f"batches in the fixed validation set (default {d['eval_batches']})")
    out.add_argument("--progress", choices=PROGRESS_MODES,
                     help="'auto': a live line on a terminal, plain lines otherwise (default auto)")
    out.add_argument("--json", dest="json_path", metavar="FILE", help="write the run summary as JSON to FILE")
    out.add_argument("--save", dest="save_path", metavar="PATH",
                     help="save model and optimizer state dicts to PATH at the end (torch.save; with "
                          "--distributed fsdp a torch.distributed.checkpoint directory, loadable at any world "
                          "size with pagedopt.distributed.load_checkpoint)")

    add_checkpoint_arguments(parser)
    add_metrics_arguments(parser)
    for action in parser._actions:
        if action.dest in METRICS_FIELDS:
            # Not-given flags must be told apart from their defaults: the config file's telemetry
            # section sits underneath them (see metrics_settings).
            action.default = argparse.SUPPRESS
    parser.set_defaults(func=run_command)
    return parser


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``checkpoints`` group: periodic checkpoints, resume, retention."""
    from ..train.config import RESUME_LATEST

    ckpt = parser.add_argument_group(
        "checkpoints", "resumable checkpoints (model, optimizer, scheduler, data position, RNG states, step); "
                       "SIGTERM/SIGINT/SIGUSR1 finish the current step, write one and exit 0")
    ckpt.add_argument("--checkpoint-dir", metavar="DIR",
                      help="write checkpoints to DIR (step-NNNNNNNN.pt, or a DCP directory per step under "
                           "--distributed fsdp), atomically: periodic ones, one when preempted, one at the end")
    ckpt.add_argument("--checkpoint-every", type=int, metavar="N", help="a checkpoint every N steps")
    ckpt.add_argument("--checkpoint-interval", type=float, metavar="SECONDS",
                      help="a checkpoint when SECONDS have passed since the last one")
    ckpt.add_argument("--keep", type=int, metavar="K", help="complete checkpoints kept in DIR (default 2)")
    ckpt.add_argument("--resume", nargs="?", const=RESUME_LATEST, metavar="PATH",
                      help="continue from the newest complete checkpoint in --checkpoint-dir (a fresh start "
                           "when there is none yet, so a requeued job can always pass it), or from PATH")


# The flags add_metrics_arguments adds (argparse dests).
METRICS_FIELDS = ("metrics_port", "metrics_addr", "metrics_top_k", "linger")
# The config file's telemetry section: TelemetryConfig field -> metrics flag.
_TELEMETRY_TO_FLAG = {"port": "metrics_port", "addr": "metrics_addr", "top_k": "metrics_top_k"}


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None):
    """A :class:`TrainConfig` from ``base`` settings overridden by the flags given in ``args``."""
    from ..train.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return TrainConfig(**{**(base or {}), **given})


def metrics_settings(args: argparse.Namespace, telemetry: Any = None) -> argparse.Namespace:
    """The metrics flags as :func:`pagedopt.telemetry.training.metrics_callback` reads them:
    the flags given, else the config file's ``telemetry`` section (when ``enabled``), else
    the flags' defaults (metrics off).

    Example:
        >>> from pagedopt.cli import build_parser
        >>> from pagedopt.config import TelemetryConfig
        >>> args = build_parser().parse_args(["train", "--metrics-addr", "0.0.0.0"])
        >>> ns = metrics_settings(args, TelemetryConfig(port=9470, addr="127.0.0.1"))
        >>> ns.metrics_port, ns.metrics_addr, ns.metrics_top_k, ns.linger
        (9470, '0.0.0.0', 20, 0.0)
    """
    from ..telemetry.training import add_metrics_arguments

    defaults = argparse.ArgumentParser(add_help=False)
    add_metrics_arguments(defaults)
    values = vars(defaults.parse_args([]))
    if telemetry is not None and telemetry.enabled:
        values.update({flag: getattr(telemetry, key) for key, flag in _TELEMETRY_TO_FLAG.items()})
    values.update({k: v for k, v in vars(args).items() if k in METRICS_FIELDS})
    return argparse.Namespace(**values)


def _error(message: str) -> int:
    print(f"pagedopt {COMMAND}: error: {message}", file=sys.stderr)
    return 2


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


@contextlib.contextmanager
def _cli_warnings() -> Iterator[None]:
    """Config-file warnings (a rule matching no parameter) as ``pagedopt train: warning:``
    lines on the main rank; other warnings as usual."""
    from ..config import ConfigWarning

    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, ConfigWarning):
                if _is_main_process():
                    print(f"pagedopt {COMMAND}: warning: {message}", file=sys.stderr, flush=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.simplefilter("always", ConfigWarning)
        yield


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, Kubernetes, Slurm, torchrun stopping its workers) stops the run like
    Ctrl-C: after the current step, with the evaluation, summary and outputs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ReportedMetrics:
    """The metrics callback, announcing its endpoint and its linger on the console (main rank).

    Example:
        >>> from pagedopt.telemetry.training import MetricsCallback
        >>> ReportedMetrics(MetricsCallback(port=0), announce=False).metrics.port
        0
    """

    def __init__(self, metrics: Any, announce: bool = True) -> None:
        self.metrics = metrics
        self.announce = announce

    def _say(self, run: Any, text: str) -> None:
        if self.announce and run.runtime.is_main and run.config.progress != "off":
            print(text, flush=True)

    def on_train_start(self, run: Any) -> None:
        self.metrics.on_train_start(run)
        exporter = self.metrics.exporter
        if exporter is not None and exporter.url:
            per_rank = " (+ LOCAL_RANK on the other ranks)" if run.runtime.world_size > 1 else ""
            self._say(run, f"  metrics   {exporter.url}{per_rank}")

    def on_step_end(self, run: Any, info: Any) -> None:
        self.metrics.on_step_end(run, info)

    def on_eval(self, run: Any, info: Any) -> None:
        self.metrics.on_eval(run, info)

    def on_train_end(self, run: Any, result: Any) -> None:
        try:
            exporter = self.metrics.exporter
            if exporter is not None and exporter.url and self.metrics.linger > 0:
                self._say(run, f"serving the final metrics for {self.metrics.linger:g} s (--linger); "
                               "Ctrl-C or SIGTERM ends it")
            self.metrics.on_train_end(run, result)
        except KeyboardInterrupt:  # training is over: an interrupt here only ends the linger
            self.metrics.linger = 0.0
            self.metrics.stop()


def run_command(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..fileio import AtomicWriteError
    from ..telemetry.training import metrics_callback
    from ..train import TrainConfigError, train
    from ..train.checkpoint import CheckpointError
    from ..train.data import DataError

    try:
        with _cli_warnings(), _sigterm_interrupts():
            config = config_from_args(args)
            file_config = config.file_config
            metrics = metrics_callback(metrics_settings(args, file_config.telemetry if file_config else None))
            callbacks = [ReportedMetrics(metrics)] if metrics is not None else []
            result = train(config, callbacks)
    except TrainConfigError as exc:
        return _error(f"{flag_for(exc.field)} {exc.value}: {exc.reason}")
    except ConfigError as exc:
        return _error(f"invalid config file:\n{exc}" if len(exc.issues) > 1 else str(exc))
    except (DataError, CheckpointError) as exc:
        return _error(str(exc))
    except AtomicWriteError as exc:  # a checkpoint, --save or --json: one line, path and errno
        print(f"pagedopt {COMMAND}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_WRITE_FAILED
    except KeyboardInterrupt:  # a second Ctrl-C, or before training started
        print(f"pagedopt {COMMAND}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.preempted:
        if _is_main_process():
            print(f"pagedopt {COMMAND}: preempted at step {result.steps_completed}, checkpoint at {result.checkpoint}",
                  flush=True)
        return 0
    if result.interrupted:
        return EXIT_INTERRUPTED
    if not math.isfinite(result.final_val_loss):
        return _error(f"training diverged: final validation loss is {result.final_val_loss}")
    return 0
