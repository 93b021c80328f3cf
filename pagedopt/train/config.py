"""``TrainConfig``: every setting of the main job, validated in one place.

The CLI (``pagedopt train``) and tests build a :class:`TrainConfig`; bad values raise
:class:`TrainConfigError`, which names the field so each front end can point at its own
spelling of it (``--steps`` on the command line).

``config_file`` names a pagedopt optimizer config (:func:`pagedopt.load_config`: optimizer,
paging, telemetry, per-parameter rules). It is read when the :class:`TrainConfig` is built:
the optimizer settings left unset here (``None``) are taken from the file's ``optimizer``
section, so a value given here (a command-line flag) overrides the file and the main job's
own defaults (per-family learning rates, percentile clipping at 95) only fill what the file
leaves out.

Example:
    >>> from pagedopt.train import TrainConfig
    >>> cfg = TrainConfig(steps=50, optimizer="adamw8bit")
    >>> cfg.optimizer, cfg.percentile_clipping, cfg.model_dims()
    ('AdamW8bit', 95, (128, 4, 4))
    >>> TrainConfig(steps=0)
    Traceback (most recent call last):
    ...
    pagedopt.train.config.TrainConfigError: steps=0: must be an integer >= 1
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from ..distributed.runtime import MODES as DISTRIBUTED_MODES
from ..optim import OPTIMIZER_NAMES

# The torch.optim.AdamW baseline (same hyperparameters, fp32 state, torch's fused/foreach path).
TORCH_BASELINE = "torch-adamw"
OPTIMIZER_CHOICES: tuple[str, ...] = (*OPTIMIZER_NAMES, TORCH_BASELINE)
DEFAULT_OPTIMIZER = "AdamW8bit"
# Percentile clipping is on by default so the clipping statistics (pagedopt_clip_threshold,
# pagedopt_clipped_updates_total, ...) are live in the metrics; 95 clips the gradients of the
# few steps whose norm exceeds 95% of the last 100 (a no-op on a smooth run, a guard against
# spikes). torch.optim.AdamW has no percentile clipping, so the baseline defaults to 100 (off).
DEFAULT_PERCENTILE_CLIPPING = 95

# name -> (d_model, layers, heads). "small" with the default batch (32 x 128 bytes): the default
# 200 steps take several minutes of CPU time on two cores (docs/train.md has measurements), the
# loss falls from ln 256 = 5.55 to ~2.35 nats, and every weight matrix (>= 4096 elements) has 8-bit state.
# "tiny" is for tests, "medium" for a GPU.
MODEL_PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 2, 2),
    "small": (128, 4, 4),
    "medium": (384, 6, 6),
    # GPT-2 124M/350M/774M and GPT-3 XL's 1.3B transformer bodies. The main job's vocabulary is
    # bytes (256 tokens), so these have fewer parameters than the published models (whose
    # 50257-token embeddings pagedopt.train.presets keeps, for `pagedopt plan --model`).
    "gpt2-124m": (768, 12, 12),
    "gpt2-350m": (1024, 24, 16),
    "gpt2-774m": (1280, 36, 20),
    "gpt-1.3b": (2048, 24, 16),
}

DEVICE_AUTO = "auto"
RESUME_LATEST = "latest"  # resume from the newest complete checkpoint in checkpoint_dir
PROGRESS_MODES = ("auto", "live", "lines", "off")
AMP_MODES = ("none", "bf16")
EMBEDDINGS = ("stable", "plain")


class TrainConfigError(ValueError):
    """A setting of :class:`TrainConfig` is invalid; ``field`` names it, ``reason`` says why.

    Example:
        >>> try:
        ...     TrainConfig(lr=-1.0)
        ... except TrainConfigError as exc:
        ...     print(exc.field, "|", exc.reason)
        lr | must be > 0
    """

    def __init__(self, field_name: str, value: Any, reason: str) -> None:
        self.field = field_name
        self.value = value
        self.reason = reason
        super().__init__(f"{field_name}={value!r}: {reason}")


def canonical_optimizer_name(name: str) -> str:
    """The spelling in :data:`OPTIMIZER_CHOICES` of ``name`` (case-insensitive).

    Example:
        >>> canonical_optimizer_name("pagedadamw8bit")
        'PagedAdamW8bit'
    """
    by_lower = {n.lower(): n for n in OPTIMIZER_CHOICES}
    found = by_lower.get(str(name).lower())
    if found is None:
        raise TrainConfigError("optimizer", name, f"unknown optimizer; expected one of {', '.join(OPTIMIZER_CHOICES)}")
    return found


@dataclass
class TrainConfig:
    """Settings of one training run of the demo byte-level transformer.

    Args:
        steps: optimizer steps.
        optimizer: a class name from :data:`pagedopt.optim.OPTIMIZER_NAMES` (case-insensitive)
            or ``"torch-adamw"`` for ``torch.optim.AdamW`` as a baseline; ``None``: the
            ``config_file``'s optimizer, else ``"AdamW8bit"``.
        lr: peak learning rate; ``None``: the ``config_file``'s, else the optimizer family's
            default (:data:`pagedopt.train.optimizers.DEFAULT_LR`).
        weight_decay: without ``config_file`` applied to weight matrices only, and ``None``
            means 0.1 for decoupled decay (AdamW, Lion, LAMB, AdEMAMix), 0 for L2-style decay
            (Adam, SGD, ...). With ``config_file`` the file's rules decide which parameters
            decay, and ``None`` means the file's value, else the optimizer class's default.
        warmup_steps: linear warm-up; ``None``: 5% of ``steps`` (at least 1). Cosine decay to
            ``min_lr_ratio * lr`` follows.
        max_grad_norm: clip the global gradient norm (0 disables).
        percentile_clipping: pagedopt's adaptive clipping at this percentile of the last 100
            gradient norms (100 disables); ``None``: the ``config_file``'s, else 95 (100 for
            ``torch-adamw``).
        config_file: a pagedopt config file (YAML, TOML, JSON) for the optimizer: its section's
            arguments, ``paging`` and ``overrides`` rules (see :mod:`pagedopt.config`); fields
            of this class that are set win over the file's ``optimizer`` section.
        distributed: ``"none"``, ``"ddp"`` or ``"fsdp"`` (FSDP2); under ``torchrun`` every
            rank runs :func:`~pagedopt.train.train` (see :mod:`pagedopt.distributed`).
        batch_size, seq_len: sequences per step and bytes per sequence.
        model_size: a :data:`MODEL_PRESETS` name; ``d_model``/``layers``/``heads`` override it.
        embedding: ``"stable"`` (:class:`pagedopt.StableEmbedding`, 32-bit state) or ``"plain"``.
        tie_weights: share the token embedding with the output head.
        device: ``"auto"`` (CUDA when available, else CPU) or a torch device string.
        amp: ``"bf16"`` runs forward/backward under bfloat16 autocast; ``"none"`` is fp32.
        compile: wrap the model with ``torch.compile``.
        update_in_backward: update each parameter inside ``loss.backward()`` as soon as its
            gradient is ready and free the gradient (:mod:`pagedopt.optim.backward_update`);
            needs ``max_grad_norm=0`` and a pagedopt optimizer; one process only (not DDP, FSDP2).
        seed: seeds parameters, batch sampling and everything else random.
        data: a text file or directory (read recursively, ``data_glob``); ``None`` is the
            running interpreter's standard library source.
        max_corpus_bytes: read files (sorted by path) until this many bytes.
        val_fraction: share of files held out for validation (chosen by a hash of the path).
        log_every: steps between progress lines; ``None``: ``steps // 10`` (at least 1).
        eval_every: steps between validation passes (0: only at the end).
        eval_batches: batches of the fixed validation set.
        progress: ``"auto"`` (a live line on a terminal, plain lines otherwise), ``"live"``,
            ``"lines"`` or ``"off"``.
        json_path: write the run summary as JSON here.
        save_path: save model and optimizer state dicts here at the end (``torch.save``).
        threads: ``torch.set_num_threads`` (``None`` leaves torch's default).
        checkpoint_dir: write resumable checkpoints here (see :mod:`pagedopt.train.checkpoint`):
            every ``checkpoint_every`` steps and/or ``checkpoint_interval`` seconds, when a
            preemption signal arrives, and at the end.
        checkpoint_every: steps between periodic checkpoints (``None``: no step-based ones).
        checkpoint_interval: seconds between periodic checkpoints (``None``: no time-based ones).
        keep: complete checkpoints kept in ``checkpoint_dir`` (older ones are removed).
        resume: ``"latest"``: continue from the newest complete checkpoint in
            ``checkpoint_dir`` (start afresh when there is none yet, as on a job's first
            start); or a checkpoint file/directory path. ``None``: a fresh start.

    Example:
        >>> TrainConfig(model_size="tiny", d_model=96).model_dims()
        (96, 2, 2)
    """

    steps: int = 200
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    percentile_clipping: int | None = None
    batch_size: int = 32
    seq_len: int = 128
    model_size: str = "small"
    d_model: int | None = None
    layers: int | None = None
    heads: int | None = None
    embedding: str = "stable"
    tie_weights: bool = False
    device: str = DEVICE_AUTO
    amp: str = "none"
    compile: bool = False
    seed: int = 0
    data: str | None = None
    data_glob: str = "*.py"
    max_corpus_bytes: int = 4_000_000
    val_fraction: float = 0.05
    log_every: int | None = None
    eval_every: int = 0
    eval_batches: int = 8
    progress: str = "auto"
    json_path: str | None = None
    save_path: str | None = None
    threads: int | None = None
    config_file: str | None = None
    distributed: str = "none"
    # -- checkpoints and resume (pagedopt.train.checkpoint) --
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    checkpoint_interval: float | None = None
    keep: int = 2
    resume: str | None = None
    # -- memory (pagedopt.train.memory) --
    memory_limit: int | str | None = None
    update_in_backward: bool = False  # update each parameter in backward, free its gradient at once

    def __post_init__(self) -> None:
        self._file = self._load_config_file()
        if self.optimizer is None:
            self.optimizer = self._file.optimizer.name if self._file is not None else DEFAULT_OPTIMIZER
        self.optimizer = canonical_optimizer_name(self.optimizer)
        self._fill_from_file()
        if self.percentile_clipping is None:
            self.percentile_clipping = 100 if self.optimizer == TORCH_BASELINE else DEFAULT_PERCENTILE_CLIPPING
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "max_corpus_bytes"):
            _at_least(name, getattr(self, name), 1)
        for name in ("d_model", "layers", "heads", "log_every", "warmup_steps", "threads"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 0 if name == "warmup_steps" else 1)
        _at_least("eval_every", self.eval_every, 0)
        _choice("model_size", self.model_size, tuple(MODEL_PRESETS))
        if self.memory_limit is not None:
            from ..paging.config import parse_bytes

            try:
                self.memory_limit = int(parse_bytes(self.memory_limit))
            except ValueError as exc:
                raise TrainConfigError("memory_limit", self.memory_limit, str(exc)) from None
            _at_least("memory_limit", self.memory_limit, 1)
        _choice("embedding", self.embedding, EMBEDDINGS)
        _choice("progress", self.progress, PROGRESS_MODES)
        _choice("amp", self.amp, AMP_MODES)
        _choice("distributed", self.distributed, DISTRIBUTED_MODES)
        if self.lr is not None:
            _positive_float("lr", self.lr)
        if self.weight_decay is not None:
            _finite_float("weight_decay", self.weight_decay, low=0.0)
        _finite_float("max_grad_norm", self.max_grad_norm, low=0.0)
        self._check_update_in_backward()
        _finite_float("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        _finite_float("val_fraction", self.val_fraction, low=0.0, high=1.0)
        if not 0.0 < self.val_fraction < 1.0:
            raise TrainConfigError("val_fraction", self.val_fraction, "must be strictly between 0 and 1")
        if not isinstance(self.percentile_clipping, int) or not 1 <= self.percentile_clipping <= 100:
            raise TrainConfigError("percentile_clipping", self.percentile_clipping, "must be an integer in 1..100")
        if self.percentile_clipping < 100 and self.optimizer == TORCH_BASELINE:
            raise TrainConfigError("percentile_clipping", self.percentile_clipping,
                                   f"percentile clipping needs a pagedopt optimizer, not {TORCH_BASELINE}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise TrainConfigError("seed", self.seed, "must be a non-negative integer")
        self._check_checkpoint_settings()
        d_model, _, heads = self.model_dims()
        if d_model % heads:
            raise TrainConfigError("d_model", d_model, f"must be divisible by heads ({heads})")

    # -- the optimizer config file ----------------------------------------------------------------

    @property
    def file_config(self) -> Any:
        """The validated :class:`pagedopt.config.PagedoptConfig` of ``config_file`` (or ``None``)."""
        return self._file

    def _load_config_file(self) -> Any:
        """Read and validate ``config_file`` (raises :class:`pagedopt.ConfigError` naming the
        file, key and value)."""
        if self.config_file is None:
            return None
        if isinstance(self.config_file, os.PathLike):
            self.config_file = os.fspath(self.config_file)
        if not isinstance(self.config_file, str) or not self.config_file:
            raise TrainConfigError("config_file", self.config_file, "must be a file path")
        if self.optimizer is not None and canonical_optimizer_name(self.optimizer) == TORCH_BASELINE:
            raise TrainConfigError("config_file", self.config_file,
                                   f"configures a pagedopt optimizer; it cannot be combined with {TORCH_BASELINE}")
        from ..config import load_config

        return load_config(self.config_file)

    def _fill_from_file(self) -> None:
        """Unset optimizer settings from the file's ``optimizer`` section. Weight decay falls
        back to the class's default (not the main job's 0.1 on weight matrices): with a file,
        its rules decide per parameter, and one value for every parameter must be a mild one."""
        if self._file is None:
            return
        from ..config.optimizers import constructor_arguments
        from ..optim import get_optimizer_class

        given = self._file.optimizer.given()
        if self.lr is None and "lr" in given:
            self.lr = given["lr"]
        if self.percentile_clipping is None and "percentile_clipping" in given:
            self.percentile_clipping = given["percentile_clipping"]
        if self.weight_decay is None:
            argument = constructor_arguments(get_optimizer_class(self.optimizer)).get("weight_decay")
            self.weight_decay = given.get("weight_decay", argument.default if argument is not None else 0.0)

    def _check_update_in_backward(self) -> None:
        """``update_in_backward`` frees each gradient as soon as its parameter is updated, so
        nothing that needs every gradient at once can run (pagedopt.optim.backward_update)."""
        if not self.update_in_backward:
            return
        if self.optimizer == TORCH_BASELINE:
            raise TrainConfigError("update_in_backward", True, f"needs a pagedopt optimizer, not {TORCH_BASELINE}")
        if self.max_grad_norm > 0:
            raise TrainConfigError(
                "update_in_backward", True,
                "global gradient-norm clipping (max_grad_norm > 0) needs every gradient at once; set "
                "max_grad_norm to 0 (--max-grad-norm 0): percentile clipping still works per parameter")
        if self.distributed == "fsdp":
            raise TrainConfigError("update_in_backward", True, "is not supported with FSDP2 (DTensor) parameters")
        if self.distributed == "ddp":
            raise TrainConfigError(
                "update_in_backward", True,
                "is not supported with DDP: each rank would apply its own gradient before DDP averages them")

    def _check_checkpoint_settings(self) -> None:
        for name in ("checkpoint_dir", "resume"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif value is not None and (not isinstance(value, str) or not value):
                raise TrainConfigError(name, value, "must be a path")
        if self.checkpoint_every is not None:
            _at_least("checkpoint_every", self.checkpoint_every, 1)
        if self.checkpoint_interval is not None:
            _positive_float("checkpoint_interval", self.checkpoint_interval)
        _at_least("keep", self.keep, 1)
        if self.checkpoint_dir is None:
            for name in ("checkpoint_every", "checkpoint_interval"):
                if getattr(self, name) is not None:
                    raise TrainConfigError(name, getattr(self, name), "needs checkpoint_dir (--checkpoint-dir)")
            if self.resume == RESUME_LATEST:
                raise TrainConfigError("resume", self.resume, "without a path needs checkpoint_dir (--checkpoint-dir)")

    def model_dims(self) -> tuple[int, int, int]:
        """``(d_model, layers, heads)``: the preset with any explicit overrides applied."""
        d_model, layers, heads = MODEL_PRESETS[self.model_size]
        return (self.d_model or d_model, self.layers or layers, self.heads or heads)

    @property
    def resolved_log_every(self) -> int:
        return self.log_every or max(1, self.steps // 10)

    @property
    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.steps)
        return max(1, self.steps // 20)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data (for JSON summaries and checkpoints)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _at_least(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise TrainConfigError(name, value, f"must be an integer >= {low}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TrainConfigError(name, value, f"expected one of {', '.join(choices)}")


def _finite_float(name: str, value: Any, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TrainConfigError(name, value, "must be a finite number")
    if low is not None and value < low:
        raise TrainConfigError(name, value, f"must be >= {low}")
    if high is not None and value > high:
        raise TrainConfigError(name, value, f"must be <= {high}")


def _positive_float(name: str, value: Any) -> None:
    _finite_float(name, value)
    if value <= 0:
        raise TrainConfigError(name, value, "must be > 0")
