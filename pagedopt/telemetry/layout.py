"""Which label each parameter reports under: its group, and its own name or ``__other__``.

Label cardinality stays bounded: per-parameter series exist only for the ``top_k``
parameters with the most optimizer-state bytes; every other parameter is folded into the
``__other__`` series. Membership is decided once, when the table is built (before the first
step, from the state each parameter *will* have - see :func:`expected_state_bytes`), so
series never appear and disappear while training runs. Parameters added later (new param
groups) report under ``__other__``.

Parameter names come from the optimizer (``named_parameters()`` given to it), else from the
``model`` passed in, else ``group<g>.param<i>``. Group labels are the group's ``"name"``
entry when it is a string, else its index.

Example:
    >>> import torch, pagedopt
    >>> from pagedopt.telemetry.layout import ParamTable
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 2))
    >>> opt = pagedopt.AdamW8bit(model.parameters())
    >>> table = ParamTable(opt, model=model, top_k=2)
    >>> table.top_names
    ['0.weight', '1.weight', '__other__']
    >>> table.entry(model[0].bias).top_label
    '__other__'
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..functional.quantization import num_blocks
from ..optim.memory import precision_of
from ..shards import local_tensor as _local

OTHER = "__other__"
# Per-parameter state tensors whose bytes are reported (qmaps are shared and reported once).
STATE_KEYS = ("state1", "state2", "absmax1", "absmax2", "gnorm_vec", "unorm_vec")
# Only these can be paged; the rest always live with the parameter.
PAGEABLE_KEYS = ("state1", "state2")


def group_label(group: Mapping[str, Any], index: int) -> str:
    name = group.get("name")
    return name if isinstance(name, str) and name else str(index)


def actual_state_bytes(state: Mapping[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for k in STATE_KEYS if isinstance(t := state.get(k), torch.Tensor))


def settings_of(optimizer: Any, group: Mapping[str, Any], p: torch.Tensor) -> Mapping[str, Any]:
    """The group's settings with the parameter's GlobalOptimManager overrides, read without
    side effects: the optimizer resolves (and caches) overrides when it creates the state, and
    users may still register overrides after the exporter is attached."""
    manager = getattr(optimizer, "mng", None)
    overrides = manager.overrides_for(p) if manager is not None and hasattr(manager, "overrides_for") else {}
    return {**group, **overrides} if overrides else group


def expected_state_bytes(optimizer: Any, gindex: int, pindex: int) -> int:
    """State bytes of a parameter: what it has, or what its first step will create.

    Mirrors ``Optimizer8bit.init_state``: 8-bit codes (1 byte per state value) plus one
    float32 absmax per block and state value when ``optim_bits == 8`` and the parameter has
    at least ``min_8bit_size`` elements, else 4 bytes per state value; 400 bytes of clip
    history with percentile clipping, 4 with a trust ratio.
    """
    group = optimizer.param_groups[gindex]
    p = group["params"][pindex]
    state = optimizer.state.get(p)
    if state:
        return actual_state_bytes(state)
    kind = getattr(optimizer, "kind", None)
    cfg = settings_of(optimizer, group, p)
    numel = _local(p).numel()
    values_per_element = (kind.num_states + kind.state1_moments - 1) if kind is not None else 2
    quantized = cfg.get("optim_bits", 32) == 8 and p.numel() >= cfg.get("min_8bit_size", 4096)
    total = numel * values_per_element * (1 if quantized else 4)
    if quantized:
        total += num_blocks(numel, cfg.get("block_wise", True)) * 4 * values_per_element
    if cfg.get("percentile_clipping", 100) < 100:
        total += 100 * 4
    if cfg.get("max_unorm", 0.0) > 0.0:
        total += 4
    return total


@dataclass
class ParamEntry:
    """One parameter's labels and slots."""

    param: torch.Tensor
    name: str
    group_index: int
    param_index: int  # position in its group (-1: unknown)
    group_label: str
    top_slot: int  # index into ParamTable.top_names (the last one is __other__)
    top_label: str
    expected_bytes: int


@dataclass
class StateBytes:
    """A snapshot of the optimizer state's size, in label space."""

    by_group: dict[tuple[str, str, str, str], int]  # (group, state, precision, residency) -> bytes
    by_param: dict[tuple[str, str], int]  # (top label or __other__, residency) -> bytes
    device_bytes: int  # state resident on the parameters' device
    host_bytes: int


class ParamTable:
    """Labels and top-k slots of every parameter of ``optimizer`` (see the module docstring).

    Args:
        optimizer: a pagedopt optimizer.
        model: optional module whose ``named_parameters()`` name the parameters.
        top_k: how many parameters get their own series (0: none, everything is __other__).

    Example:
        >>> import torch, pagedopt
        >>> w, b = torch.nn.Parameter(torch.randn(8192)), torch.nn.Parameter(torch.randn(8))
        >>> opt = pagedopt.AdamW8bit([{"params": [w], "name": "weights"}, {"params": [b]}])
        >>> table = ParamTable(opt, top_k=1)
        >>> table.group_labels, table.top_names, table.entry(b).top_label
        (['weights', '1'], ['group0.param0', '__other__'], '__other__')
    """

    def __init__(self, optimizer: Any, model: torch.nn.Module | None = None, top_k: int = 20):
        if not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k={top_k!r}: must be an integer >= 0")
        self.optimizer = optimizer
        self.top_k = top_k
        self._model_names = {p: n for n, p in model.named_parameters()} if model is not None else {}
        self._entries: dict[torch.Tensor, ParamEntry] = {}
        self._by_name: dict[str, ParamEntry] = {}
        self.group_labels: list[str] = []
        self._precision: dict[torch.Tensor, tuple[torch.dtype, str]] = {}
        self._build()

    def _name(self, group: Mapping[str, Any], gindex: int, pindex: int, p: torch.Tensor) -> str:
        names = group.get("param_names")
        if names is not None and pindex < len(names):
            return str(names[pindex])
        if p in self._model_names:
            return self._model_names[p]
        return f"group{gindex}.param{pindex}"

    def _build(self) -> None:
        candidates = []
        for gindex, group in enumerate(self.optimizer.param_groups):
            self.group_labels.append(group_label(group, gindex))
            for pindex, p in enumerate(group["params"]):
                nbytes = expected_state_bytes(self.optimizer, gindex, pindex)
                candidates.append((p, self._name(group, gindex, pindex, p), gindex, pindex, nbytes))
        # Most bytes first; ties keep the optimizer's order (stable sort).
        ranked = sorted(range(len(candidates)), key=lambda i: -candidates[i][4])
        top = set(ranked[: self.top_k])
        self.top_names = [candidates[i][1] for i in sorted(top, key=ranked.index)]
        slot_of = {name: s for s, name in enumerate(self.top_names)}
        self.top_names.append(OTHER)
        for i, (p, name, gindex, pindex, nbytes) in enumerate(candidates):
            slot = slot_of[name] if i in top else len(self.top_names) - 1
            self._add(ParamEntry(p, name, gindex, pindex, self.group_labels[gindex], slot, self.top_names[slot], nbytes))

    def _add(self, entry: ParamEntry) -> None:
        self._entries[entry.param] = entry
        self._by_name.setdefault(entry.name, entry)

    @property
    def other_slot(self) -> int:
        return len(self.top_names) - 1

    @property
    def entries(self) -> list[ParamEntry]:
        return list(self._entries.values())

    def entry(self, param: torch.Tensor | None, name: str | None = None, group: int | None = None) -> ParamEntry:
        """The entry of ``param`` (by identity), else by ``name``; unknown parameters (added
        to the optimizer after the table was built) join ``__other__`` of their group."""
        if param is not None:
            found = self._entries.get(param)
            if found is not None:
                return found
        elif name is not None and name in self._by_name:
            return self._by_name[name]
        return self._add_late(param, name, group)

    def _add_late(self, param: torch.Tensor | None, name: str | None, group: int | None,
                  pindex: int = -1) -> ParamEntry:
        gindex = group if group is not None else len(self.optimizer.param_groups) - 1
        while len(self.group_labels) <= gindex:
            index = len(self.group_labels)
            groups = self.optimizer.param_groups
            self.group_labels.append(group_label(groups[index], index) if index < len(groups) else str(index))
        entry = ParamEntry(param if param is not None else torch.empty(0), name or "?", gindex, pindex,
                           self.group_labels[gindex], self.other_slot, OTHER, 0)
        if param is not None:
            self._add(entry)
        return entry

    def sync_groups(self) -> None:
        """Pick up parameters of groups added with ``add_param_group`` since the last call."""
        for gindex, group in enumerate(self.optimizer.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p not in self._entries:
                    self._add_late(p, self._name(group, gindex, pindex, p), gindex, pindex)

    # -- state bytes -----------------------------------------------------------------------

    def _precision_of(self, entry: ParamEntry, state: Mapping[str, Any]) -> str:
        dtype = state["state1"].dtype if isinstance(state.get("state1"), torch.Tensor) else None
        cached = self._precision.get(entry.param)
        if cached is not None and cached[0] == dtype:
            return cached[1]
        block_wise = True
        groups = self.optimizer.param_groups
        if entry.group_index < len(groups):
            block_wise = bool(settings_of(self.optimizer, groups[entry.group_index], entry.param).get("block_wise", True))
        precision = precision_of(state, block_wise)
        self._precision[entry.param] = (dtype, precision)
        return precision

    def state_bytes(self) -> StateBytes:
        """Walk the optimizer's state once (call from the training thread)."""
        self.sync_groups()
        store = getattr(self.optimizer, "state_store", None)
        by_group: dict[tuple[str, str, str, str], int] = defaultdict(int)
        by_param: dict[tuple[str, str], int] = defaultdict(int)
        device_bytes = host_bytes = 0
        for entry in list(self._entries.values()):
            state = self.optimizer.state.get(entry.param)
            if not state:
                continue
            precision = self._precision_of(entry, state)
            paged = normalize_residency(
                store.residency(entry.param, state) if store is not None else entry.param.device.type,
                entry.param,
            )
            own = normalize_residency(_local(entry.param).device.type, entry.param)  # unpaged keys
            for key in STATE_KEYS:
                t = state.get(key)
                if not isinstance(t, torch.Tensor):
                    continue
                nbytes = t.numel() * t.element_size()
                residency = paged if key in PAGEABLE_KEYS else own
                by_group[(entry.group_label, key, precision, residency)] += nbytes
                by_param[(entry.top_label, residency)] += nbytes
                if residency == "host":
                    host_bytes += nbytes
                else:
                    device_bytes += nbytes
        return StateBytes(dict(by_group), dict(by_param), device_bytes, host_bytes)


def normalize_residency(residency: str, param: torch.Tensor) -> str:
    """``"device"`` for state on an accelerator (a pager's device, simulated included),
    ``"host"`` for host memory - which is where all state of CPU parameters that a pager did
    not place on a (simulated) device lives (CPU training); other residencies (e.g. a
    pager's ``"state1=device,state2=host"``) pass through."""
    device_type = _local(param).device.type
    if residency == "device":
        return "device"
    if residency in ("host", "cpu"):
        return "host"
    if residency in (device_type, "unpaged"):
        return "host" if device_type == "cpu" else "device"
    return residency
