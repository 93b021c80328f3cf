"""``pagedopt train``: train the demo byte-level transformer and report optimizer memory.

Every flag maps to one :class:`pagedopt.train.TrainConfig` field (``--batch-size`` ->
``batch_size``); flags that are not given keep the field's default, so other sources of
settings (a config file) can sit underneath the command line.

Example:
    >>> from pagedopt.cli import build_parser
    >>> from pagedopt.commands.train import config_from_args
    >>> args = build_parser().parse_args(["train", "--steps", "50", "--optimizer", "lion8bit"])
    >>> cfg = config_from_args(args)
    >>> cfg.steps, cfg.optimizer, cfg.seed
    (50, 'Lion8bit', 0)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any

COMMAND = "train"
# Exit code of a run stopped by Ctrl-C (the shell's 128 + SIGINT).
EXIT_INTERRUPTED = 130


def _field_defaults() -> dict[str, Any]:
    from ..train.config import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def flag_for(field_name: str) -> str:
    """The command-line flag of a :class:`TrainConfig` field (``json_path`` -> ``--json``)."""
    return {"json_path": "--json", "save_path": "--save"}.get(field_name, "--" + field_name.replace("_", "-"))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..train.config import AMP_MODES, EMBEDDINGS, MODEL_PRESETS, PROGRESS_MODES, TORCH_BASELINE

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

    opt = parser.add_argument_group("optimizer")
    opt.add_argument("--optimizer", metavar="NAME",
                     help=f"a pagedopt optimizer class such as AdamW8bit, PagedLion8bit, SGD32bit "
                          f"(case-insensitive), or '{TORCH_BASELINE}' for torch.optim.AdamW (default {d['optimizer']})")
    opt.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (default: per optimizer family)")
    opt.add_argument("--weight-decay", type=float, metavar="WD",
                     help="weight decay of the weight matrices (default 0.1 for AdamW/Lion/LAMB/AdEMAMix, else 0)")
    opt.add_argument("--warmup-steps", type=int, metavar="N", help="linear warm-up steps (default 5%% of --steps)")
    opt.add_argument("--min-lr-ratio", type=float, metavar="R",
                     help=f"cosine decay ends at this fraction of the peak lr (default {d['min_lr_ratio']})")
    opt.add_argument("--max-grad-norm", type=float, metavar="X",
                     help=f"clip the global gradient norm, 0 disables (default {d['max_grad_norm']})")
    opt.add_argument("--percentile-clipping", type=int, metavar="P",
                     help="pagedopt's adaptive clipping at this percentile of the last 100 gradient norms, "
                          "100 disables (default 100)")

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
    out.add_argument("--save", dest="save_path", metavar="FILE",
                     help="save model and optimizer state dicts to FILE at the end (torch.save)")
    parser.set_defaults(func=run_command)
    return parser


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None):
    """A :class:`TrainConfig` from ``base`` settings overridden by the flags given in ``args``."""
    from ..train.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return TrainConfig(**{**(base or {}), **given})


def _error(message: str) -> int:
    print(f"pagedopt {COMMAND}: error: {message}", file=sys.stderr)
    return 2


def run_command(args: argparse.Namespace) -> int:
    from ..train import TrainConfigError, train
    from ..train.data import DataError

    try:
        config = config_from_args(args)
        result = train(config)
    except TrainConfigError as exc:
        return _error(f"{flag_for(exc.field)} {exc.value}: {exc.reason}")
    except DataError as exc:
        return _error(str(exc))
    if result.interrupted:
        return EXIT_INTERRUPTED
    if not math.isfinite(result.final_val_loss):
        return _error(f"training diverged: final validation loss is {result.final_val_loss}")
    return 0
