"""Building the training run's optimizer and measuring its state memory.

:func:`build_optimizer` is the one place the main job creates an optimizer: parameter groups
(weight decay on the linear layers' weight matrices only, parameter names attached so
:meth:`~pagedopt.optim.Optimizer8bit.memory_report` can show them), the family's default
learning rate, and pagedopt's extra arguments. :func:`state_memory` summarises the state's
bytes for the run summary, for pagedopt optimizers and for the ``torch-adamw`` baseline.

Example:
    >>> import torch
    >>> from pagedopt.train import TrainConfig
    >>> from pagedopt.train.optimizers import build_optimizer, state_memory
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))
    >>> opt = build_optimizer(model, TrainConfig(optimizer="AdamW8bit"))
    >>> [(g["weight_decay"], g["param_names"]) for g in opt.param_groups]
    [(0.1, ['0.weight', '1.weight']), (0.0, ['0.bias', '1.bias'])]
    >>> model(torch.randn(2, 64)).sum().backward(); opt.step()
    >>> memory = state_memory(opt)
    >>> memory.bytes_by_precision
    {'8bit-blockwise': 17040, '32bit': 10480}
    >>> memory.fp32_equivalent_bytes
    74816
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..optim import ALGORITHMS, get_optimizer_class
from .config import TORCH_BASELINE, TrainConfig

# Peak learning rates that train the demo model well in a few hundred steps, from a sweep
# (x3 grid) of the 8-bit variants on the "tiny" preset checked on "small" at 200 steps: Lion
# wants ~3x less than Adam, LAMB's trust ratio and SGD-style updates far more.
DEFAULT_LR: dict[str, float] = {
    "Adam": 3e-3, "AdamW": 3e-3, "AdEMAMix": 3e-3, "LAMB": 3e-2, "Lion": 1e-3,
    "SGD": 0.3, "LARS": 1.0, "RMSprop": 1e-3, "Adagrad": 3e-2,
}
# Decoupled decay (shrinks weights by lr * wd) tolerates GPT-style 0.1; L2-style decay (added
# to the gradient) at that size would fight the loss, so those default to 0.
DECOUPLED_WEIGHT_DECAY = frozenset({"AdamW", "Lion", "LAMB", "AdEMAMix"})
DEFAULT_DECOUPLED_WEIGHT_DECAY = 0.1
# Arguments some families need beyond lr/weight_decay (SGD and LARS require momentum > 0).
EXTRA_KWARGS: dict[str, dict[str, Any]] = {"SGD": {"momentum": 0.9}, "LARS": {"momentum": 0.9}}


def algorithm_of(optimizer_name: str) -> str:
    """The algorithm family of an optimizer name (``"PagedAdamW8bit"`` -> ``"AdamW"``).

    Example:
        >>> algorithm_of("PagedLion32bit"), algorithm_of("torch-adamw")
        ('Lion', 'AdamW')
    """
    if optimizer_name == TORCH_BASELINE:
        return "AdamW"
    stem = optimizer_name.removeprefix("Paged").removesuffix("8bit").removesuffix("32bit")
    if stem not in ALGORITHMS:
        raise ValueError(f"optimizer {optimizer_name!r} is not one of pagedopt's algorithms {ALGORITHMS}")
    return stem


def resolved_lr(config: TrainConfig) -> float:
    return config.lr if config.lr is not None else DEFAULT_LR[algorithm_of(config.optimizer)]


def resolved_weight_decay(config: TrainConfig) -> float:
    if config.weight_decay is not None:
        return config.weight_decay
    return DEFAULT_DECOUPLED_WEIGHT_DECAY if algorithm_of(config.optimizer) in DECOUPLED_WEIGHT_DECAY else 0.0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups of ``(name, parameter)`` pairs: weight matrices of ``nn.Linear`` layers
    (decayed) and everything else - biases, norms, embeddings (not decayed, as is usual for
    transformers). Frozen parameters are left out; a tied matrix appears once."""
    decayed: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.dim() >= 2:
            decayed.add(id(module.weight))
    for module in model.modules():  # a head tied to an embedding is an embedding
        if isinstance(module, nn.Embedding):
            decayed.discard(id(module.weight))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [(n, p) for n, p in named if id(p) in decayed], "weight_decay": weight_decay},
        {"params": [(n, p) for n, p in named if id(p) not in decayed], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` asks for, over ``model``'s trainable parameters (from its
    ``config_file`` when it has one: :func:`build_from_config_file`)."""
    if config.file_config is not None:
        return build_from_config_file(model, config)
    groups = param_groups(model, resolved_weight_decay(config))
    lr = resolved_lr(config)
    if config.optimizer == TORCH_BASELINE:
        return torch.optim.AdamW(groups, lr=lr)
    cls = get_optimizer_class(config.optimizer)
    kwargs = dict(EXTRA_KWARGS.get(algorithm_of(config.optimizer), {}))
    return cls(groups, lr=lr, percentile_clipping=config.percentile_clipping, **kwargs)


def build_from_config_file(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of ``config.config_file`` (:func:`pagedopt.build_optimizer`: its section,
    paging and rules by parameter name), with ``config``'s optimizer, lr, weight decay and
    percentile clipping as constructor arguments. :class:`TrainConfig` took those from the
    file unless they were set, so they change the file only where they were given (a
    command-line flag) or where the file is silent (the main job's per-family lr); the
    file's ``overrides`` rules still win for the parameters they match. Arguments a family
    needs (SGD/LARS momentum) are filled in when the file has none. A rule that matches no
    parameter warns (:class:`pagedopt.ConfigWarning`), or raises under ``strict: true``.

    Example:
        >>> import pathlib, tempfile, torch
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "opt.yaml"
        >>> _ = path.write_text("optimizer: {name: Lion8bit, lr: 2.0e-4}\\n"
        ...                     "overrides: [{match: bias, set: {lr: 1.0e-4}}]\\n")
        >>> model = torch.nn.Linear(64, 64)
        >>> opt = build_optimizer(model, TrainConfig(config_file=str(path), percentile_clipping=90))
        >>> [(g["param_names"], g["lr"], g["percentile_clipping"]) for g in opt.param_groups]
        [(['weight'], 0.0002, 90), (['bias'], 0.0001, 90)]
    """
    from ..config import build_optimizer as build_from_config

    file_config = config.file_config
    given = file_config.optimizer.given()
    kwargs: dict[str, Any] = {
        "name": config.optimizer,
        "lr": resolved_lr(config),
        "weight_decay": resolved_weight_decay(config),
        "percentile_clipping": config.percentile_clipping,
    }
    for key, value in EXTRA_KWARGS.get(algorithm_of(config.optimizer), {}).items():
        kwargs.setdefault(key, given.get(key, value))
    return build_from_config(model, file_config, **kwargs)


@dataclass
class StateMemory:
    """Optimizer-state bytes: by precision, in total, and what fp32 state would take.

    ``saving_ratio`` is ``fp32_equivalent_bytes / total_bytes`` (about 4 for 8-bit state).

    Example:
        >>> m = StateMemory({"8bit-blockwise": 2080, "32bit": 0}, shared_bytes=0, fp32_equivalent_bytes=8192)
        >>> round(m.saving_ratio, 2)
        3.94
    """

    bytes_by_precision: dict[str, int] = field(default_factory=dict)
    shared_bytes: int = 0
    fp32_equivalent_bytes: int = 0
    parameters_by_precision: dict[str, int] = field(default_factory=dict)
    bytes_by_residency: dict[str, int] = field(default_factory=dict)  # e.g. {"cuda:0": ..., "host": ...}
    paged: bool = False
    ranks: int = 1  # processes whose state is summed here (see combine_state_memory)
    replicated: bool = False  # every rank holds a full copy (DDP) rather than a shard (FSDP)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_precision.values()) + self.shared_bytes

    @property
    def saving_ratio(self) -> float:
        return self.fp32_equivalent_bytes / self.total_bytes if self.total_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes_by_precision": dict(self.bytes_by_precision),
            "parameters_by_precision": dict(self.parameters_by_precision),
            "bytes_by_residency": dict(self.bytes_by_residency),
            "paged": self.paged,
            "ranks": self.ranks,
            "replicated": self.replicated,
            "shared_bytes": self.shared_bytes,
            "total_bytes": self.total_bytes,
            "fp32_equivalent_bytes": self.fp32_equivalent_bytes,
            "saving_ratio": self.saving_ratio,
        }


def state_memory(optimizer: torch.optim.Optimizer) -> StateMemory:
    """State bytes of a pagedopt optimizer (from its ``memory_report()``) or of a torch
    optimizer (its state tensors, counted as ``"32bit"``)."""
    memory_report = getattr(optimizer, "memory_report", None)
    if callable(memory_report):
        report = memory_report()
        params: dict[str, int] = {}
        for row in report.rows:
            params[row.precision] = params.get(row.precision, 0) + row.numel
        return StateMemory(dict(report.bytes_by_precision), report.shared_bytes, report.fp32_equivalent_bytes, params,
                           dict(report.bytes_by_residency), bool(getattr(optimizer, "is_paged", False)))
    total = numel = params_with_state = 0
    residency: dict[str, int] = {}
    for p, state in optimizer.state.items():
        # torch keeps per-parameter tensors plus a scalar "step"; count the per-element ones.
        tensors = [t for k, t in state.items() if k != "step" and isinstance(t, torch.Tensor)]
        total += sum(t.numel() * t.element_size() for t in tensors)
        numel += sum(t.numel() for t in tensors)
        params_with_state += p.numel() if tensors else 0
        for t in tensors:
            residency[str(t.device)] = residency.get(str(t.device), 0) + t.numel() * t.element_size()
    return StateMemory({"32bit": total}, 0, 4 * numel, {"32bit": params_with_state}, residency)


def combine_state_memory(parts: list[StateMemory], replicated: bool) -> StateMemory:
    """The state memory of a whole data-parallel job from each rank's :func:`state_memory`.

    Bytes (by precision, residency, quantization maps, the fp32 equivalent) are summed over
    ranks: what the job holds in all. Parameter counts are the model's: summed over ranks
    when each holds a shard (FSDP), rank 0's when each holds a full replica (DDP).

    Example:
        >>> shard = StateMemory({"8bit-blockwise": 100}, 8, 400, {"8bit-blockwise": 50}, {"cpu": 100})
        >>> both = combine_state_memory([shard, shard], replicated=False)
        >>> both.bytes_by_precision, both.parameters_by_precision, both.total_bytes, both.ranks
        ({'8bit-blockwise': 200}, {'8bit-blockwise': 100}, 216, 2)
        >>> combine_state_memory([shard, shard], replicated=True).parameters_by_precision
        {'8bit-blockwise': 50}
    """
    if not parts:
        raise ValueError("combine_state_memory: no ranks")

    def summed(attr: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in parts:
            for key, value in getattr(part, attr).items():
                out[key] = out.get(key, 0) + value
        return out

    return StateMemory(
        bytes_by_precision=summed("bytes_by_precision"),
        shared_bytes=sum(p.shared_bytes for p in parts),
        fp32_equivalent_bytes=sum(p.fp32_equivalent_bytes for p in parts),
        parameters_by_precision=dict(parts[0].parameters_by_precision) if replicated
        else summed("parameters_by_precision"),
        bytes_by_residency=summed("bytes_by_residency"),
        paged=any(p.paged for p in parts),
        ranks=sum(p.ranks for p in parts),
        replicated=replicated,
    )
