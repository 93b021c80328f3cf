"""The step plan: what a step updates and how, decided once and reused until it changes.

A :class:`StepPlan` records, for the parameters that have gradients, their state, resolved
settings and names (:class:`PlanEntry`), and splits them into

* **launch groups** (:class:`LaunchGroup`): parameters of one param group with the same
  overrides, step count and device whose update the backend can run as one prepared launch
  (the native CPU kernels, :mod:`pagedopt.backends.cpu_plan`; CUDA,
  :mod:`pagedopt.backends.cuda_prepared`). Per step the group
  reads its hyperparameters from the live param group (so a learning-rate schedule, new
  betas or the step count never rebuild anything) and computes the step scalars once;
  A group with percentile clipping computes its scales before the launch
  (:mod:`pagedopt.optim.launch_clipping`); a group with trust ratios or tensor-wise 8-bit
  state runs its prepare pass as a launch before the update
  (:mod:`pagedopt.optim.launch_prepare`); DTensor (FSDP2) parameters launch on their local
  shards;
* **per-item entries**: everything else (paged state, other devices), which runs through
  the batched per-item passes of :mod:`pagedopt.optim.passes` every step.

The plan is rebuilt only when something that shapes it changes (:meth:`StepPlan.still_valid`):
``add_param_group``/``load_state_dict`` (the optimizer's plan generation), a
:class:`~pagedopt.GlobalOptimManager` change, the state store (per-parameter paging), the
state-shaping settings of a group, the parameter list, which parameters have gradients
(frozen/unfrozen parameters, state created for a parameter's first gradient), a parameter's
storage (``p.data = ...``) or its state tensors being replaced. These checks are C-level
comparisons of lists, a few hundred nanoseconds per parameter; the per-parameter Python
work of the old step (settings, scalars, argument packing: ~36 us each) is gone.

Example:
    >>> import torch, pagedopt
    >>> ws = [torch.nn.Parameter(torch.randn(4096)) for _ in range(3)]
    >>> opt = pagedopt.AdamW8bit(ws)
    >>> for _ in range(3):
    ...     for w in ws: w.grad = torch.randn(4096)
    ...     opt.param_groups[0]["lr"] *= 0.5   # a schedule: no rebuild
    ...     opt.step()
    >>> opt.plan_builds
    1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from operator import is_, methodcaller
from typing import Any, Mapping

import torch

from ..shards import local_tensor
from . import validation

# Group settings whose change re-plans (they decide state shape and which path a parameter takes).
PLAN_SHAPING_KEYS = tuple(validation.STATIC_KEYS) + ("paging",)


@dataclass(eq=False)
class PlanEntry:
    """One parameter with a gradient at plan time."""

    key: torch.Tensor = field(repr=False)  # the parameter (state key)
    param: torch.Tensor = field(repr=False)  # the tensor the kernels update (shard-local under FSDP2)
    position: int  # index in the plan's flat parameter list
    gindex: int
    pindex: int
    name: str
    state: dict[str, Any] = field(repr=False)


@dataclass(eq=False)
class LaunchGroup:
    """Parameters updated by one prepared backend launch with shared step scalars."""

    gindex: int
    overrides: Mapping[str, Any]
    skip_zeros: bool
    entries: list[PlanEntry]
    launch: Any = None  # e.g. a pagedopt.backends.cpu_plan.CpuLaunch
    # Filled by the optimizer when the plan is built, for the per-step bulk checks:
    positions: list[int] = field(default_factory=list)  # each entry's index in the gradient list
    shapes: list[torch.Size] = field(default_factory=list)
    dtypes: list[torch.dtype] = field(default_factory=list)
    devices: list[torch.device] = field(default_factory=list)
    state_list: list[dict[str, Any]] = field(default_factory=list)
    sharded: bool = False  # DTensor (FSDP2) entries: gradients are read through their local shard
    last_ptrs: list[int] | None = None  # gradient pointers of the last run
    grad_copies: list[torch.Tensor] | None = None  # contiguous copies the last run read (non-contiguous grads)
    precisions: list[str] = field(default_factory=list)  # each entry's state precision (telemetry)
    items: list[Any] = field(default_factory=list)  # the UpdateItems the launch was built from (grad=None)
    clip_percentile: int = 100  # percentile clipping of the group (100: none)
    clip_scales: torch.Tensor | None = None  # the scales the launch reads (pagedopt.optim.launch_clipping)
    last_clip: Any = None  # this step's clipping, StackedClip (telemetry rows)
    prepare_launch: Any = None  # the prepare pass before the update (pagedopt.optim.launch_prepare)
    prepare_buffers: Any = None  # what it writes for the update: PrepareBuffers
    last_trust: torch.Tensor | None = None  # this step's trust-ratio update scales (telemetry rows)

    def freeze(self) -> None:
        """Record what the per-step checks compare against (after the entries are final)."""
        self.positions = [e.position for e in self.entries]
        self.shapes = [e.param.shape for e in self.entries]  # (local shards for DTensors)
        self.dtypes = [e.key.dtype for e in self.entries]
        self.devices = [e.param.device for e in self.entries]
        self.state_list = [e.state for e in self.entries]
        self.sharded = any(e.param is not e.key for e in self.entries)


@dataclass(eq=False, repr=False)
class StepPlan:
    """See the module docstring. Built by :meth:`Optimizer8bit._build_plan`."""

    params: list[torch.Tensor]  # every parameter of every group, in order
    has_grad: list[bool]
    param_ptrs: list[int]  # storage of the planned parameters (p.data replaced -> re-plan)
    state_dicts: list[Any]  # every entry's state dict (state replaced -> re-plan)
    state_tensors: list[Any]  # state1 of every launched entry (tensor replaced -> re-plan)
    generation: tuple[Any, ...]
    group_signatures: list[tuple[Any, ...]]
    entries: list[PlanEntry] = field(default_factory=list)
    launch_groups: list[LaunchGroup] = field(default_factory=list)
    per_item: list[PlanEntry] = field(default_factory=list)

    def still_valid(self, generation: tuple[Any, ...], param_groups: list[dict[str, Any]],
                    params: list[torch.Tensor], grads: list[Any], state: Mapping[Any, Any]) -> bool:
        if generation != self.generation or len(params) != len(self.params):
            return False
        if not all(map(is_, params, self.params)):
            return False
        if [g is not None for g in grads] != self.has_grad:
            return False
        if group_signatures(param_groups) != self.group_signatures:
            return False
        # (map() over bound methods: C-level loops, no Python frame per parameter)
        keys = self._keys
        if list(map(_data_ptr, keys)) != self.param_ptrs:
            return False
        if not all(map(is_, map(state.get, keys), self.state_dicts)):
            return False
        # Launched DTensor parameters: their wrapper has no storage (data_ptr() is 0), so the
        # local shards' storage is checked (the launches hold pointers to it).
        if self._sharded_keys and [local_tensor(k).data_ptr() for k in self._sharded_keys] != self._sharded_ptrs:
            return False
        # Prepared launches hold pointers to the state tensors: they must not have been replaced.
        # (Paged state is replaced by the pager as it moves; it never joins a launch.)
        return all(map(is_, map(_get_state1, self._launched_states), self.state_tensors))

    def freeze(self) -> None:
        """Record the state tensors the launches hold (after the launch groups are built)."""
        self._keys = [e.key for e in self.entries]
        self._launched_states = [e.state for lg in self.launch_groups for e in lg.entries]
        self.state_tensors = list(map(_get_state1, self._launched_states))
        self._sharded_keys = [e.key for lg in self.launch_groups for e in lg.entries if e.param is not e.key]
        self._sharded_ptrs = [local_tensor(k).data_ptr() for k in self._sharded_keys]


_data_ptr = methodcaller("data_ptr")
_get_state1 = methodcaller("get", "state1")


def flat_params(param_groups: list[dict[str, Any]]) -> list[torch.Tensor]:
    return list(chain.from_iterable(g["params"] for g in param_groups))


def group_signatures(param_groups: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Per group, the values of the settings that shape the plan (O(groups) per step)."""
    return [tuple(repr(g.get(k)) if k == "paging" else g.get(k) for k in PLAN_SHAPING_KEYS) for g in param_groups]


def overrides_key(overrides: Mapping[str, Any]) -> Any:
    """A hashable key for grouping parameters by their override values."""
    try:
        key = tuple(sorted(overrides.items()))
        hash(key)
        return key
    except TypeError:
        return ("id", id(overrides))
