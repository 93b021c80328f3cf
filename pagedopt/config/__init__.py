"""Config files for pagedopt optimizers: validated before the job starts, rules by parameter name.

A config is a YAML, TOML or JSON document::

    optimizer: {name: AdamW8bit, lr: 1.0e-3, weight_decay: 0.01}   # any of the 54 classes + its arguments
    paging: {policy: budgeted, device_budget_bytes: 2GiB}            # PagingConfig; human byte sizes
    memory: {target_free_bytes: 4GiB}                                # MemoryConfig: headroom, OOM recovery
    telemetry: {port: 9460, addr: 127.0.0.1, top_k: 20}              # Prometheus exporter (pagedopt train)
    strict: false                                                    # true: a rule matching nothing is an error
    overrides:                                                       # applied in order; later rules win
      - match: "*.bias"              # glob on the qualified parameter name; "re:<regex>" for a regex
        set: {weight_decay: 0.0}
      - module: Embedding            # class name of the owning module (base classes count)
        set: {optim_bits: 32}
      - min_numel: 1000000           # size bounds (inclusive), combinable with match/module
        set: {paging: {policy: offload}}

**optimizer** takes ``name`` and the arguments of that class's constructor, with their types
(``lr: "1e-3"`` is an error - but YAML's ``1e-3`` is read as a number here) and the
constructor's own value checks. ``optimizer: AdamW8bit`` is short for ``{name: AdamW8bit}``.

**paging** pages the optimizer's state; an unpaged class (``AdamW8bit``) with a ``paging``
section behaves like its ``Paged`` variant.

**overrides** rules select parameters by every condition they give - ``match`` (glob where
``*`` also crosses dots, or ``re:`` + a regex matched against the whole name), ``module``
(``Linear``, ``torch.nn.Linear``; a subclass such as ``StableEmbedding`` matches
``Embedding``), ``min_numel``/``max_numel`` - and ``set`` any per-parameter argument of the
chosen optimizer (``lr``, ``betas``, ``eps``, ``weight_decay``, ``optim_bits``,
``min_8bit_size``, ``percentile_clipping``, ``block_wise``, ``max_unorm``, ``skip_zeros``,
``momentum`` for SGD, ...) plus ``paging``. A tied parameter matches when any of its names
does. ``set.paging`` takes PagingConfig fields that replace the inherited ones (the
``paging`` section, or PagingConfig's defaults), ``false`` (not paged) or ``true``; every
distinct paging config becomes its own pool with its own budget (see
:mod:`pagedopt.optim.placement`). Frozen parameters are left out of the optimizer.

**Precedence**, highest first:

1. :class:`~pagedopt.GlobalOptimManager` overrides set in code on a tensor or module
   (``StableEmbedding`` keeps 32-bit state even under a rule ``{match: "*", set: {optim_bits: 8}}``);
2. ``overrides`` rules, later rules over earlier ones (they become parameter groups, so LR
   schedulers scale them like any group);
3. keyword arguments given to :func:`build_optimizer` (e.g. a command line's ``--lr``);
4. the ``optimizer`` section;
5. the optimizer class's defaults (``AdamW8bit``'s ``optim_bits=8`` included - a rule may
   still set ``optim_bits: 32`` for some parameters).

Errors: :class:`ConfigError` (a ``ValueError``) lists every problem as
``file: key.path: message (got value)`` - misspelled keys (with a suggestion), bad values (the
optimizer's own message), unknown optimizer names (with close matches), settings the chosen
optimizer does not have, bad byte sizes. A rule that matches no parameter warns
(:class:`ConfigWarning`, naming the rule's index and conditions), or errors under
``strict: true``.

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Sequential(pagedopt.StableEmbedding(1000, 64), torch.nn.Linear(64, 64))
    >>> config = {"optimizer": {"name": "AdamW8bit", "lr": 1e-3},
    ...           "overrides": [{"match": "*.bias", "set": {"weight_decay": 0.0}}]}
    >>> opt = pagedopt.build_optimizer(model, config)
    >>> [(g["param_names"], g["weight_decay"]) for g in opt.param_groups]
    [(['0.weight', '0.norm.weight', '1.weight'], 0.01), (['0.norm.bias', '1.bias'], 0.0)]
    >>> opt.get_config(0, 0, opt.param_groups[0])["optim_bits"]  # StableEmbedding's override
    32
"""

from __future__ import annotations

from .build import (
    Resolution, ResolvedParam, SettingsRow, build_optimizer, optimizer_for, resolve, settings_rows, settings_table,
)
from .errors import ConfigError, ConfigIssue, ConfigWarning
from .load import as_config, json_schema, load_config, validate_document
from .models import OverrideRule, PagedoptConfig, PagingOverride, Settings, TelemetryConfig

__all__ = [
    "load_config", "build_optimizer", "resolve", "optimizer_for", "settings_rows", "settings_table",
    "validate_document", "as_config", "json_schema",
    "PagedoptConfig", "OverrideRule", "Settings", "PagingOverride", "TelemetryConfig",
    "ConfigError", "ConfigIssue", "ConfigWarning", "Resolution", "ResolvedParam", "SettingsRow",
]
