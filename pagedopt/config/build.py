"""Applying a config to a model: rules by parameter name -> parameter groups -> the optimizer.

:func:`resolve` matches every rule against every trainable parameter once and returns a
:class:`Resolution` (one row per parameter: names, owning module classes, matching rules,
merged settings and paging). :func:`build_optimizer` turns it into parameter groups -
parameters with identical resolved settings share a group, each group lists its
``param_names`` - and constructs the optimizer. :func:`settings_table` prints what the
optimizer will actually do per parameter (``pagedopt config check``).

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 64))
    >>> opt = pagedopt.build_optimizer(model, {
    ...     "optimizer": {"name": "AdamW8bit", "lr": 1e-3, "weight_decay": 0.1},
    ...     "overrides": [{"match": "*.bias", "set": {"weight_decay": 0.0}},
    ...                   {"module": "Embedding", "set": {"optim_bits": 32, "lr": 5e-4}}]})
    >>> [(g["param_names"], g["weight_decay"], g["optim_bits"]) for g in opt.param_groups]
    [(['0.weight'], 0.1, 32), (['1.weight'], 0.1, 8), (['1.bias'], 0.0, 8)]
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..optim import GlobalOptimManager, Optimizer8bit
from ..optim.placement import BASE
from ..paging.config import PagingConfig
from . import optimizers
from .errors import ConfigError, ConfigIssue, ConfigWarning
from .load import as_config
from .models import PagedoptConfig, base_arguments, merge_paging

# Per-parameter paging: the rules set none (the parameter uses the optimizer's paging).
INHERIT = BASE


@dataclass
class ResolvedParam:
    """One trainable parameter after the rules: what the config says about it."""

    name: str
    param: torch.Tensor
    aliases: list[str]
    module_classes: list[str]
    rules: list[int] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    paging: Any = INHERIT  # INHERIT, None (not paged) or a PagingConfig

    @property
    def numel(self) -> int:
        return self.param.numel()


@dataclass
class Resolution:
    """Every trainable parameter of a model with the config's rules applied."""

    config: PagedoptConfig
    params: list[ResolvedParam]
    unmatched_rules: list[int]


def named_trainable_parameters(model: torch.nn.Module, trainable_only: bool = True) -> list[ResolvedParam]:
    """Each parameter once (tied parameters under their first name, others as aliases), with
    the class names of every module owning it (base classes and dotted names included)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"build_optimizer: expected a torch.nn.Module, got {type(model).__name__}")
    found: dict[int, ResolvedParam] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local_name, p in module.named_parameters(recurse=False):
            if trainable_only and not p.requires_grad:
                continue
            name = f"{module_name}.{local_name}" if module_name else local_name
            entry = found.get(id(p))
            if entry is None:
                found[id(p)] = entry = ResolvedParam(name=name, param=p, aliases=[], module_classes=[])
            elif name != entry.name and name not in entry.aliases:
                entry.aliases.append(name)
            for class_name in _class_names(type(module)):
                if class_name not in entry.module_classes:
                    entry.module_classes.append(class_name)
    return list(found.values())


def _class_names(cls: type) -> list[str]:
    names = []
    for base in cls.__mro__:
        if not (isinstance(base, type) and issubclass(base, torch.nn.Module)) or base is torch.nn.Module:
            continue
        names.append(base.__name__)
        names.append(f"{base.__module__}.{base.__qualname__}")
        # Public spellings of nested modules: torch.nn.modules.linear.Linear -> torch.nn.Linear
        parts = base.__module__.split(".")
        names.extend(f"{'.'.join(parts[:i])}.{base.__qualname__}" for i in range(1, len(parts)))
    return names


def resolve(model: torch.nn.Module, config: Any, *, trainable_only: bool = True) -> Resolution:
    """Apply the config's rules, in order, to every (trainable) parameter of ``model``.

    A rule that matches no parameter warns (:class:`~pagedopt.config.ConfigWarning`) or, with
    ``strict: true``, raises :class:`~pagedopt.ConfigError`.
    """
    config = as_config(config)
    params = named_trainable_parameters(model, trainable_only)
    matched = [False] * len(config.overrides)
    for entry in params:
        names = [entry.name, *entry.aliases]
        for index, rule in enumerate(config.overrides):
            if not rule.matches(names, entry.module_classes, entry.numel):
                continue
            matched[index] = True
            entry.rules.append(index)
            given = rule.set.given()
            if "paging" in given:
                start = entry.paging if isinstance(entry.paging, PagingConfig) else config.paging
                entry.paging = merge_paging(start, given.pop("paging"))
            entry.settings.update(given)
    unmatched = [i for i, hit in enumerate(matched) if not hit]
    _report_unmatched(config, model, params, unmatched)
    return Resolution(config, params, unmatched)


def _report_unmatched(config: PagedoptConfig, model: torch.nn.Module, params: list[ResolvedParam],
                      unmatched: list[int]) -> None:
    if not unmatched:
        return
    examples = ", ".join(repr(p.name) for p in params[:4]) + (", ..." if len(params) > 4 else "")
    issues = [
        ConfigIssue(
            config.source, f"overrides[{i}]",
            f"rule ({config.overrides[i].describe()}) matches no trainable parameter of "
            f"{type(model).__name__} ({len(params)} parameters: {examples})",
        )
        for i in unmatched
    ]
    if config.strict:
        raise ConfigError(issues)
    for issue in issues:
        warnings.warn(str(issue), ConfigWarning, stacklevel=4)


def build_optimizer(
    model: torch.nn.Module,
    config_or_path: PagedoptConfig | str | os.PathLike[str] | Mapping[str, Any],
    *,
    trainable_only: bool = True,
    **optimizer_args: Any,
) -> Optimizer8bit:
    """The optimizer described by a config, for ``model``'s parameters.

    Args:
        model: the module whose parameters to optimize (frozen ones are left out unless
            ``trainable_only=False``).
        config_or_path: a :class:`~pagedopt.config.PagedoptConfig`, a path to a YAML/TOML/JSON
            file, or a parsed document (dict).
        optimizer_args: constructor arguments that replace the optimizer section's (e.g. a
            command line's ``--lr``); rules still win for the parameters they match.

    Every ``overrides`` rule is applied by parameter name; parameters with identical resolved
    settings share a parameter group, and each group carries ``param_names``.
    GlobalOptimManager overrides (e.g. :class:`~pagedopt.StableEmbedding`'s 32-bit state)
    still win over the rules.

    Example:
        >>> import torch, pagedopt
        >>> model = torch.nn.Linear(256, 256)
        >>> opt = pagedopt.build_optimizer(model, {"optimizer": {"name": "Lion8bit"}}, lr=3e-5)
        >>> type(opt).__name__, opt.defaults["lr"], opt.param_groups[0]["param_names"]
        ('Lion8bit', 3e-05, ['weight', 'bias'])
    """
    config = as_config(config_or_path, **optimizer_args)
    return optimizer_for(resolve(model, config, trainable_only=trainable_only))


def optimizer_for(resolution: Resolution) -> Optimizer8bit:
    """Construct the optimizer of a :class:`Resolution` (see :func:`build_optimizer`)."""
    config = resolution.config
    cls = config.optimizer.optimizer_class
    base_defaults = dict(optimizers.probe(cls, config.optimizer.given()).defaults)
    base_paging = config.effective_paging()
    algorithm_class = getattr(optimizers.optim, optimizers.algorithm_of(cls.__name__))
    group_extras: dict[str, dict[str, Any]] = {}
    group_params: dict[str, list[tuple[str, torch.Tensor]]] = {}
    probed: dict[str, dict[str, Any]] = {}
    for entry in resolution.params:
        extra = _group_values(entry, config, algorithm_class, base_defaults, probed)
        if entry.paging is not INHERIT and entry.paging != base_paging:
            extra["paging"] = entry.paging.model_dump() if entry.paging is not None else False
        key = repr(sorted(extra.items()))
        group_extras.setdefault(key, extra)
        group_params.setdefault(key, []).append((entry.name, entry.param))
    groups = [{"params": group_params[key], **group_extras[key]} for key in group_params]
    kwargs = config.optimizer.given()
    if config.paging is not None:
        kwargs["paging"] = config.paging
    optimizer = cls(groups, **kwargs)
    optimizer.numerics = config.numerics
    optimizer.cuda_graph = config.cuda_graph
    optimizer.update_in_backward = config.update_in_backward
    if config.memory is not None:
        from ..paging.controller import MemoryController

        MemoryController(optimizer, config.memory)  # attaches itself as optimizer.memory_controller
    return optimizer


def _group_values(entry: ResolvedParam, config: PagedoptConfig, algorithm_class: type,
                  base_defaults: Mapping[str, Any], probed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The group values (those that differ from the optimizer's defaults) for ``entry``'s
    rule settings, computed by the algorithm's own constructor (``momentum`` -> ``betas``)."""
    if not entry.settings:
        return {}
    key = repr(sorted(entry.settings.items()))
    if key not in probed:
        kwargs = {**base_arguments(config.optimizer), **entry.settings}
        try:
            defaults = optimizers.probe(algorithm_class, kwargs).defaults
        except (ValueError, TypeError) as e:
            rules = ", ".join(f"overrides[{i}]" for i in entry.rules)
            raise ConfigError([ConfigIssue(
                config.source, rules,
                f"the settings of these rules together are invalid for parameter {entry.name!r}: {e}",
                entry.settings)]) from None
        probed[key] = {k: v for k, v in defaults.items() if base_defaults.get(k, object()) != v}
    return dict(probed[key])


# -- the resolved table (pagedopt config check) ------------------------------------------------


@dataclass
class SettingsRow:
    """What the optimizer will do with one parameter."""

    name: str
    shape: tuple[int, ...]
    precision: str
    paging: str
    rules: list[int]
    changed: dict[str, Any]  # settings that differ from the optimizer's defaults
    from_manager: list[str]  # which of them come from GlobalOptimManager overrides


def settings_rows(optimizer: Optimizer8bit, resolution: Resolution) -> list[SettingsRow]:
    """One row per parameter, read back from the built optimizer (so it shows exactly what
    the optimizer resolves, GlobalOptimManager overrides included)."""
    rules_of = {id(e.param): e.rules for e in resolution.params}
    order = {id(e.param): i for i, e in enumerate(resolution.params)}
    manager = GlobalOptimManager.get_instance()
    rows: list[tuple[int, SettingsRow]] = []
    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, p in enumerate(group["params"]):
            cfg = optimizer._settings(group, p)
            changed = {
                k: v for k, v in cfg.items()
                if k not in ("params", "param_names", "paging") and optimizer.defaults.get(k, object()) != v
            }
            if optimizer._uses_8bit(p, cfg):
                precision = "8bit-blockwise" if cfg["block_wise"] else "8bit-tensorwise"
            else:
                precision = "32bit"
            rows.append((order.get(id(p), len(order)), SettingsRow(
                name=optimizer._param_name(group, gindex, pindex),
                shape=tuple(p.shape),
                precision=precision,
                paging=_describe_paging(cfg.get("paging", BASE), optimizer.paging),
                rules=rules_of.get(id(p), []),
                changed=changed,
                from_manager=sorted(set(manager.overrides_for(p)) & set(changed)),
            )))
    return [row for _, row in sorted(rows, key=lambda item: item[0])]  # model order


def _describe_paging(value: Any, base: PagingConfig | None) -> str:
    from ..optim.manager import check_paging_value

    if value is not BASE:
        value = check_paging_value(value, "paging")
        value = (base or PagingConfig()) if value is True else value
    config = base if value is BASE else (None if value is False else value)
    if config is None:
        return "off"
    text = config.policy
    if config.device_budget_bytes is not None:
        text += f" {_human_bytes(config.device_budget_bytes)}"
    return text


def _human_bytes(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size and n % (size // 1024 or 1) == 0:
            return f"{n / size:g}{unit}"
    return f"{n}B"


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else repr(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def settings_table(optimizer: Optimizer8bit, resolution: Resolution) -> str:
    """A printable table of :func:`settings_rows`, with a header naming the optimizer."""
    rows = settings_rows(optimizer, resolution)
    cls = type(optimizer)
    class_defaults = {n: p.default for n, p in optimizers.constructor_arguments(cls).items()}
    given = resolution.config.optimizer.given()
    header_args = ", ".join(f"{k}={_format_value(v)}" for k, v in given.items() if class_defaults.get(k) != v)
    lines = [f"{cls.__name__}({header_args})  paging: {_describe_paging(BASE, optimizer.paging)}"]
    table = [("parameter", "shape", "state", "paging", "rules", "settings (vs. the optimizer's)")]
    for r in rows:
        settings = ", ".join(
            f"{k}={_format_value(v)}" + (" [manager]" if k in r.from_manager else "") for k, v in r.changed.items()
        )
        table.append((
            r.name, "x".join(map(str, r.shape)) or "scalar", r.precision, r.paging,
            ",".join(map(str, r.rules)) or "-", settings or "-",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    n8 = sum(1 for r in rows if r.precision.startswith("8bit"))
    lines.append(f"{len(rows)} parameters in {len(optimizer.param_groups)} groups; "
                 f"8-bit state for {n8}, 32-bit for {len(rows) - n8}")
    return "\n".join(lines)


__all__ = ["build_optimizer", "resolve", "optimizer_for", "settings_rows", "settings_table",
           "Resolution", "ResolvedParam", "SettingsRow", "named_trainable_parameters"]
