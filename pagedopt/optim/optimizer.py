"""Optimizer8bit, Optimizer2State and Optimizer1State: the bitsandbytes 0.49 base classes.

These classes validate arguments, resolve each parameter's settings once, create state
lazily, and run a step as a few batched passes over all parameters:

1. collect the parameters with gradients (checking each gradient) and create missing state;
2. percentile clipping: gradient norms of all clipped parameters at once, scales on device;
3. a prepare pass where needed (trust ratio norms, tensor-wise 8-bit maxima);
4. the fused update, through the backend chosen by the tensors' device.

The math lives in :mod:`pagedopt.functional`; where state lives is up to the
:class:`~pagedopt.paging.store.StateStore` (unpaged, or a pager for the ``Paged*`` classes).

Settings resolve per parameter with this precedence (highest first): per-parameter overrides
(:class:`~pagedopt.GlobalOptimManager`), the parameter group's values, the constructor
arguments (or the ``args`` object, which replaces the constructor's 8-bit settings as in
bitsandbytes). Overrides are resolved once per parameter and re-resolved only when the
manager changed; settings that shape the state are fixed once it exists (see
:mod:`pagedopt.optim.manager`). A ``paging`` group value or override places that parameter's
state under its own paging config (see :mod:`pagedopt.optim.placement`).

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(128, 64)
    >>> opt = pagedopt.optim.Optimizer2State("adamw", model.parameters(), lr=1e-3, optim_bits=8,
    ...                                      min_8bit_size=1024)
    >>> model(torch.randn(4, 128)).sum().backward()
    >>> opt.step()
    >>> opt.state[model.weight]["state1"].dtype, opt.state[model.bias]["state1"].dtype
    (torch.uint8, torch.float32)
"""

from __future__ import annotations
from __future__ import annotations

import warnings
from copy import deepcopy
from collections import defaultdict
from itertools import chain
from typing import Any, Iterable, Mapping

import torch

from ..functional.kinds import UpdateKind, kind_for
from ..paging.config import PagingConfig
from ..paging.store import DeviceStateStore, StateStore
from ..telemetry.sink import NULL_SINK, StatsSink
from . import validation
from .backward_update import BackwardUpdateMixin
from .execute import StepMixin
from .hooks import HooksMixin
from .manager import STATE_SHAPING_SETTINGS, GlobalOptimManager, check_paging_value
from .memory import MemoryReportMixin
from .nonfinite import NonfiniteGradWatch
from .options import accept_runtime_options, check_numerics
from .passes import PerItemPassesMixin
from .state_init import StateInitMixin
from .state_io import (  # noqa: F401  (re-exported: the names lived here before the split)
    NON_CASTABLE_KEYS,
    QUANT_STATE_KEY,
    STATE_TENSOR_KEYS,
    StateImportMixin,
    local_tensor,
)

class MockArgs:
    """bitsandbytes' ``args`` container: attributes from a dict."""

    def __init__(self, initial_data: Mapping[str, Any]):
        for key, value in initial_data.items():
            setattr(self, key, value)



class Optimizer8bit(
    StepMixin, PerItemPassesMixin, HooksMixin, BackwardUpdateMixin, StateInitMixin, StateImportMixin, MemoryReportMixin,
    torch.optim.Optimizer,
):
    """Base class of every pagedopt optimizer (bitsandbytes' ``Optimizer8bit``).

    Args:
        params: parameters or parameter groups (``named_parameters()`` works too and gives
            :meth:`memory_report` its names).
        defaults: default hyperparameters of the groups.
        optim_bits: 8 or 32 bits of optimizer state.
        is_paged: page the state between device and host memory.
        paging: a :class:`~pagedopt.PagingConfig` (or a dict of its fields); implies paging.
        numerics: ``"fast"`` (default) or ``"strict"``: the CUDA kernels' math mode. ``strict``
            keeps CPU and GPU results bit-identical; ``fast`` lets the CUDA kernels use FMA and
            fast reciprocal square roots (within the documented tolerances). CPU and the
            reference are always strict. Settable later as ``opt.numerics``.
        cuda_graph: replay a stable step plan as a CUDA graph on CUDA devices (default
            ``True``; no effect on CPU). Settable later as ``opt.cuda_graph``.
        update_in_backward: update each parameter in backward as soon as its gradient is
            ready and free the gradient (see :mod:`pagedopt.optim.backward_update`).

    The step is planned once and reused (:mod:`pagedopt.optim.plan`); subclasses that override
    bitsandbytes' hooks get the per-parameter loop (:mod:`pagedopt.optim.hooks`).

    Example:
        >>> import torch, pagedopt
        >>> p = torch.nn.Parameter(torch.randn(4096))
        >>> opt = pagedopt.AdamW8bit([p])
        >>> isinstance(opt, pagedopt.optim.Optimizer8bit)
        True
    """

    _FSDP_WRAPPED_QUANT_STATE_KEY = QUANT_STATE_KEY
    kind: UpdateKind | None = None
    betas_len: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            cls.__init__ = accept_runtime_options(init)

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        optim_bits: int = 32,
        is_paged: bool = False,
        *,
        paging: PagingConfig | Mapping[str, Any] | None = None,
        numerics: str = "fast",
        cuda_graph: bool = True,
        update_in_backward: bool = False,
    ):
        validation.check_static({"optim_bits": optim_bits})
        self._numerics = check_numerics(numerics)
        self.cuda_graph = bool(cuda_graph)
        self.optim_bits = optim_bits
        self.is_paged = bool(is_paged) or paging is not None
        if paging is not None and not isinstance(paging, PagingConfig):
            paging = PagingConfig(**dict(paging))
        self.paging: PagingConfig | None = (paging or PagingConfig()) if self.is_paged else None
        self.mng = GlobalOptimManager.get_instance()
        self.non_castable_tensor_keys = set(NON_CASTABLE_KEYS)
        self.name2qmap: dict[str, torch.Tensor] = {}
        self.sink: StatsSink = NULL_SINK
        self._quant_probe = None  # set by a sink for one step (pagedopt.telemetry.quant_error)
        self.steps_taken = 0
        self._overrides: dict[torch.Tensor, dict[str, Any]] = {}
        self._overrides_generation = self.mng.generation
        self._late_override_warned: set[tuple[int, str]] = set()
        self._qmaps: dict[tuple[torch.device, bool], torch.Tensor] = {}
        self.state_store: StateStore = self._make_state_store()
        super().__init__(params, defaults)
        if update_in_backward:
            self.update_in_backward = True
        self.nonfinite = NonfiniteGradWatch.attach(self)  # counts skipped NaN/Inf gradient elements

    # -- construction ------------------------------------------------------------------------

    def _init_named(
        self,
        optimizer_name: str,
        num_states: int,
        params: Iterable[Any],
        hyper: dict[str, Any],
        static_given: dict[str, Any],
        args: Any,
        is_paged: bool,
        paging: PagingConfig | Mapping[str, Any] | None,
        numerics: str = "fast",
        cuda_graph: bool = True,
        update_in_backward: bool = False,
    ) -> None:
        """Shared constructor of Optimizer2State/Optimizer1State: resolve the update kind, the
        8-bit settings (``args`` replaces them, as in bitsandbytes) and the group defaults."""
        self.kind = kind_for(optimizer_name)
        if self.kind.num_states != num_states:
            other = "Optimizer1State" if num_states == 2 else "Optimizer2State"
            raise ValueError(
                f"optimizer_name={optimizer_name!r} is a {self.kind.num_states}-state update; use {other}"
            )
        self.optimizer_name = self.kind.name
        self.betas_len = 3 if self.kind.state1_moments == 2 else 2
        static = _static_settings(args, static_given)
        self.args = MockArgs(static)
        defaults = {**hyper, "betas": validation.parse_betas(hyper["betas"]), **static}
        validation.check_hyperparameters(defaults, self.betas_len)
        Optimizer8bit.__init__(
            self, params, defaults, static["optim_bits"], is_paged, paging=paging, numerics=numerics,
            cuda_graph=cuda_graph, update_in_backward=update_in_backward,
        )

    def _make_state_store(self) -> StateStore:
        """The store for this optimizer's state; the pager replaces this for paged optimizers."""
        if self.paging is not None:
            from ..paging import make_state_store

            return make_state_store(self.paging)
        return DeviceStateStore()

    @property
    def numerics(self) -> str:
        """``"fast"`` or ``"strict"`` (see the class docstring); setting it re-plans."""
        return self._numerics

    @numerics.setter
    def numerics(self, value: str) -> None:
        self._numerics = check_numerics(value)
        self.invalidate_plan()

    @property
    def pager(self) -> StateStore:
        """Where the state lives: a :class:`~pagedopt.paging.Pager` for paged optimizers
        (``opt.pager.stats()``), the unpaged store otherwise."""
        return self.state_store

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "betas" in param_group:
            param_group = dict(param_group)
            param_group["betas"] = validation.parse_betas(param_group["betas"])
        super().add_param_group(param_group)
        self.invalidate_plan()
        group = self.param_groups[-1]
        where = f"param group {len(self.param_groups) - 1}"
        for p in group["params"]:
            validation.check_param(p, where)
        try:
            validation.check_hyperparameters(group, self.betas_len)
            if "paging" in group:
                check_paging_value(group["paging"], where)
        except ValueError:
            self.param_groups.pop()
            raise
        self._check_group(group)
        self._hook_new_group(group)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """Optimizer-specific group checks (subclasses)."""

    # -- per-parameter settings --------------------------------------------------------------

    def _overrides_for(self, p: torch.Tensor) -> dict[str, Any]:
        """Overrides of ``p``, resolved once and cached (see :meth:`_sync_overrides`)."""
        found = self._overrides.get(p)
        if found is None:
            found = self._resolve_overrides(p)
            self._overrides[p] = found
        return found

    def _resolve_overrides(self, p: torch.Tensor) -> dict[str, Any]:
        found = self.mng.overrides_for(p)  # keys and values already checked by the manager
        if found:
            unknown = sorted(set(found) - set(self.defaults) - {"paging"})
            if unknown:
                raise ValueError(
                    f"GlobalOptimManager override of parameter {self._name_of(p)!r}: "
                    f"{', '.join(map(repr, unknown))} is not a setting of {type(self).__name__} "
                    f"(its settings: {', '.join(sorted(self.defaults))}, paging)"
                )
            try:
                validation.check_hyperparameters(found, self.betas_len)
            except ValueError as e:
                raise ValueError(f"GlobalOptimManager override of parameter {self._name_of(p)!r}: {e}") from None
        return found

    def _sync_overrides(self) -> None:
        """Re-resolve cached overrides once after the GlobalOptimManager changed. Settings that
        shape a parameter's existing state keep their values (with a warning)."""
        if self._overrides_generation == self.mng.generation:
            return
        self._overrides_generation = self.mng.generation
        missing = object()
        for p, old in list(self._overrides.items()):
            new = self._resolve_overrides(p)
            if self.state.get(p):
                for key in STATE_SHAPING_SETTINGS:
                    if new.get(key, missing) == old.get(key, missing):
                        continue
                    if (id(p), key) not in self._late_override_warned:
                        self._late_override_warned.add((id(p), key))
                        warnings.warn(
                            f"GlobalOptimManager: the override {key}={new.get(key, '<removed>')!r} for parameter "
                            f"{self._name_of(p)!r} came after {type(self).__name__} created its state, and "
                            f"{key} shapes the state; the parameter keeps its current state. Set such overrides "
                            "before the first step() (hyperparameters such as lr apply at the next step).",
                            stacklevel=4,
                        )
                    if key in old:
                        new[key] = old[key]
                    else:
                        new.pop(key, None)
            self._overrides[p] = new

    def _name_of(self, p: torch.Tensor) -> str:
        for gindex, group in enumerate(self.param_groups):
            for pindex, q in enumerate(group["params"]):
                if q is p:
                    return self._param_name(group, gindex, pindex)
        return f"<tensor of shape {tuple(p.shape)}>"

    def _settings(self, group: Mapping[str, Any], p: torch.Tensor) -> Mapping[str, Any]:
        overrides = self._overrides_for(p)
        return {**group, **overrides} if overrides else group

    def get_config(self, gindex: int, pindex: int, group: Mapping[str, Any]) -> dict[str, Any]:
        """bitsandbytes-compatible view of one parameter's resolved settings."""
        self._sync_overrides()
        return dict(self._settings(group, group["params"][pindex]))

    def _param_name(self, group: Mapping[str, Any], gindex: int, pindex: int) -> str:
        names = group.get("param_names")
        if names is not None and pindex < len(names):
            return str(names[pindex])
        return f"group{gindex}.param{pindex}"

    # -- state dict --------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any], move_to_device: bool = True) -> None:
        """Load a pagedopt or bitsandbytes (nested or flat) state dict; training continues.

        Tensors keep their dtype (fp32 state stays fp32 for fp16/bf16 parameters). 8-bit
        state stored with a map other than pagedopt's is re-quantized (bitsandbytes' 1-state
        RMSprop/Adagrad use the signed map for their non-negative state); bitsandbytes'
        tensor-wise ``max1``/``max2`` become ``absmax1``/``absmax2``. Everything is validated
        first, and torch.optim's load-state-dict hooks run (:mod:`pagedopt.optim.state_checks`).
        """
        from .state_checks import finish_load, prepare_load

        state_dict = deepcopy(prepare_load(self, state_dict))
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has {len(groups)}"
            )
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"loaded state dict's parameter group {i} has {len(sg['params'])} parameters, "
                    f"the optimizer's has {len(g['params'])}"
                )
        id_map = dict(
            zip(chain.from_iterable(g["params"] for g in saved_groups), chain.from_iterable(g["params"] for g in groups))
        )
        new_groups = [self._merge_loaded_group(g, sg) for g, sg in zip(groups, saved_groups)]
        group_of = {p: g for g in new_groups for p in g["params"]}
        for p in list(self.state):
            self.state_store.forget(p)
        self._overrides.clear()
        new_state: defaultdict = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key not in id_map:
                new_state[key] = value
                continue
            p = id_map[key]
            new_state[p] = self._import_param_state(p, value, group_of[p], move_to_device)
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        self.invalidate_plan()
        finish_load(self)

def _static_settings(args: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """The six 8-bit settings from bitsandbytes' ``args`` object, falling back to ``given``."""
    if args is None:
        return dict(given)
    if isinstance(args, Mapping):
        args = MockArgs(args)
    return {k: getattr(args, k, given[k]) for k in validation.STATIC_KEYS}


class Optimizer2State(Optimizer8bit):
    """Base of the two-state optimizers (Adam, AdamW, LAMB, AdEMAMix) - bitsandbytes'
    ``Optimizer2State``.

    Args:
        optimizer_name: ``"adam"`` (L2 weight decay, as ``torch.optim.Adam``), ``"adamw"``,
            ``"lamb"`` or ``"ademamix"``. (bitsandbytes' ``"adam"`` decays decoupled; pagedopt
            follows torch - use ``"adamw"`` for decoupled decay.)
        params: parameters or parameter groups.
        lr: learning rate.
        betas: EMA rates (three for AdEMAMix: fast, second moment, slow).
        eps: added to the denominator.
        weight_decay: weight decay.
        optim_bits: 8 or 32 bits of state.
        args: bitsandbytes-style object (or dict) whose attributes replace ``optim_bits``,
            ``min_8bit_size``, ``percentile_clipping``, ``block_wise``, ``max_unorm`` and
            ``skip_zeros``.
        min_8bit_size: parameters with fewer elements keep 32-bit state.
        percentile_clipping: clip gradients at this percentile of the last 100 gradient
            norms (100 disables).
        block_wise: one absmax per 256 elements (``False``: one per tensor).
        max_unorm: trust ratio bound ``||update|| <= max_unorm * ||p||`` (0 disables).
        skip_zeros: leave elements whose gradient is exactly 0 unchanged.
        is_paged: page the state (see :class:`~pagedopt.PagingConfig`).
        alpha, t_alpha, t_beta3: AdEMAMix mixing coefficient and warm-up lengths.
        paging: a :class:`~pagedopt.PagingConfig`; implies ``is_paged``.
        numerics, cuda_graph, update_in_backward: see :class:`Optimizer8bit`.

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.randn(64, 64))
        >>> opt = pagedopt.optim.Optimizer2State("adam", [w], optim_bits=8, min_8bit_size=0)
        >>> w.grad = torch.randn(64, 64); opt.step()
        >>> opt.state[w]["absmax1"].shape
        torch.Size([16])
    """

    betas_len = 2

    def __init__(
        self,
        optimizer_name: str,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, ...] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        is_paged: bool = False,
        alpha: float = 0.0,
        t_alpha: int | None = None,
        t_beta3: int | None = None,
        *,
        paging: PagingConfig | Mapping[str, Any] | None = None,
        numerics: str = "fast",
        cuda_graph: bool = True,
        update_in_backward: bool = False,
        _extra_defaults: Mapping[str, Any] | None = None,
    ):
        self._init_named(
            optimizer_name, 2, params,
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha, t_alpha=t_alpha,
                 t_beta3=t_beta3, **(_extra_defaults or {})),
            dict(optim_bits=optim_bits, min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping,
                 block_wise=block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros),
            args, is_paged, paging, numerics, cuda_graph, update_in_backward,
        )


class Optimizer1State(Optimizer8bit):
    """Base of the one-state optimizers (SGD, LARS, Lion, RMSprop, Adagrad) - bitsandbytes'
    ``Optimizer1State``.

    Args:
        optimizer_name: ``"momentum"`` (SGD), ``"lars"``, ``"lion"``, ``"rmsprop"`` or ``"adagrad"``.
        betas: ``(momentum, dampening)`` for SGD/LARS, ``(beta1, beta2)`` for Lion,
            ``(alpha, momentum)`` for RMSprop, unused by Adagrad.
        (All other arguments as :class:`Optimizer2State`.)

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.ones(8))
        >>> opt = pagedopt.optim.Optimizer1State("lion", [w], lr=0.1, betas=(0.9, 0.99))
        >>> w.grad = torch.ones(8); opt.step()
        >>> w.detach()[:2]
        tensor([0.9000, 0.9000])
    """

    betas_len = 2

    def __init__(
        self,
        optimizer_name: str,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, ...] = (0.9, 0.0),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        is_paged: bool = False,
        *,
        paging: PagingConfig | Mapping[str, Any] | None = None,
        numerics: str = "fast",
        cuda_graph: bool = True,
        update_in_backward: bool = False,
        _extra_defaults: Mapping[str, Any] | None = None,
    ):
        self._init_named(
            optimizer_name, 1, params,
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **(_extra_defaults or {})),
            dict(optim_bits=optim_bits, min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping,
                 block_wise=block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros),
            args, is_paged, paging, numerics, cuda_graph, update_in_backward,
        )
