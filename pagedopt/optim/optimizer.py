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

import time
import warnings
from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass
from itertools import chain
from typing import Any, Iterable, Mapping

import torch

from ..distributed import sharding
from ..functional import dispatch
from ..functional.clipping import percentile_clip, trust_ratios
from ..functional.items import UpdateItem
from ..functional.kinds import UpdateKind, kind_for
from ..functional.qmap import dynamic_map, is_canonical_map
from ..functional.quantization import dequantize, num_blocks, quantize
from ..functional.scalars import step_scalars
from ..paging.config import PagingConfig
from ..paging.store import DeviceStateStore, StateStore
from ..telemetry.sink import NULL_SINK, ParamStepReport, StatsSink, StepReport
from . import validation
from .manager import STATE_SHAPING_SETTINGS, GlobalOptimManager, check_paging_value
from .memory import MemoryReport, MemoryRow, precision_of
from .placement import BASE, RoutingStateStore

QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
# State entries that are not per-parameter-dtype floats: never cast on load.
NON_CASTABLE_KEYS = frozenset(
    {"qmap1", "qmap2", "max1", "max2", "new_max1", "new_max2", "state1", "state2",
     "gnorm_vec", "absmax1", "absmax2", "unorm_vec"}
)
STATE_TENSOR_KEYS = ("state1", "state2", "absmax1", "absmax2", "gnorm_vec", "unorm_vec")


class MockArgs:
    """bitsandbytes' ``args`` container: attributes from a dict."""

    def __init__(self, initial_data: Mapping[str, Any]):
        for key, value in initial_data.items():
            setattr(self, key, value)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The shard-local tensor of a DTensor; the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


@dataclass
class _Work:
    """One parameter's part of the current step (built fresh every step)."""

    key: torch.Tensor  # the parameter object (state key)
    param: torch.Tensor  # the tensor the kernels update (shard-local under FSDP2)
    grad: torch.Tensor
    group_index: int
    name: str
    hp: Mapping[str, Any]
    cfg: Mapping[str, Any]
    state: dict[str, Any]
    gnorm_scale: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    clip_threshold: torch.Tensor | None = None
    update_scale: torch.Tensor | None = None
    new_absmax1: torch.Tensor | None = None
    new_absmax2: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.state["state1"].dtype == torch.uint8

    @property
    def needs_prepare(self) -> bool:
        return self.cfg["max_unorm"] > 0.0 or (self.quantized and not self.cfg["block_wise"])

    def item(self, kind: UpdateKind) -> UpdateItem:
        s = self.state
        return UpdateItem(
            param=self.param,
            grad=self.grad,
            state1=s["state1"],
            state2=s.get("state2"),
            absmax1=s.get("absmax1"),
            absmax2=s.get("absmax2"),
            scalars=step_scalars(kind, self.hp, s["step"], skip_zeros=self.cfg["skip_zeros"]),
            block_wise=self.cfg["block_wise"],
            gnorm_scale=self.gnorm_scale,
            update_scale=self.update_scale,
            new_absmax1=self.new_absmax1,
            new_absmax2=self.new_absmax2,
        )


class Optimizer8bit(torch.optim.Optimizer):
    """Base class of every pagedopt optimizer (bitsandbytes' ``Optimizer8bit``).

    Args:
        params: parameters or parameter groups (``named_parameters()`` works too and gives
            :meth:`memory_report` its names).
        defaults: default hyperparameters of the groups.
        optim_bits: 8 or 32 bits of optimizer state.
        is_paged: page the state between device and host memory.
        paging: a :class:`~pagedopt.PagingConfig` (or a dict of its fields); implies paging.

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

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        optim_bits: int = 32,
        is_paged: bool = False,
        *,
        paging: PagingConfig | Mapping[str, Any] | None = None,
    ):
        validation.check_static({"optim_bits": optim_bits})
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
        Optimizer8bit.__init__(self, params, defaults, static["optim_bits"], is_paged, paging=paging)

    def _make_state_store(self) -> StateStore:
        """The store for this optimizer's state; the pager replaces this for paged optimizers."""
        if self.paging is not None:
            from ..paging import make_state_store

            return make_state_store(self.paging)
        return DeviceStateStore()

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

    # -- state -------------------------------------------------------------------------------

    def _qmap(self, signed: bool, device: torch.device) -> torch.Tensor:
        key = (device, signed)
        if key not in self._qmaps:
            self._qmaps[key] = dynamic_map(signed, device)
            self.name2qmap["dynamic" if signed else "udynamic"] = self._qmaps[key]
        return self._qmaps[key]

    def _place_state(self, p: torch.Tensor, cfg: Mapping[str, Any]) -> None:
        """Per-parameter paging: route ``p``'s state to the store for ``cfg["paging"]``.
        A no-op until some parameter has a ``paging`` value (see :mod:`pagedopt.optim.placement`)."""
        if "paging" not in cfg and not isinstance(self.state_store, RoutingStateStore):
            return
        if not isinstance(self.state_store, RoutingStateStore):
            self.state_store = RoutingStateStore(self.state_store, self.paging)
        self.state_store.place(p, cfg.get("paging", BASE))

    def _uses_8bit(self, p: torch.Tensor, cfg: Mapping[str, Any]) -> bool:
        # numel of a DTensor is its global size: precision never depends on the shard.
        return cfg["optim_bits"] == 8 and p.numel() >= cfg["min_8bit_size"]

    @torch.no_grad()
    def init_state(self, group: Mapping[str, Any], p: torch.Tensor, gindex: int, pindex: int) -> None:
        """Create the state of ``p`` (zeros; 8-bit when ``optim_bits == 8`` and the
        parameter has at least ``min_8bit_size`` elements)."""
        kind = self.kind
        assert kind is not None, "Optimizer8bit subclasses must set kind"
        cfg = self._settings(group, p)
        self._place_state(p, cfg)
        local = local_tensor(p)
        quantized = self._uses_8bit(p, cfg)
        dtype = torch.uint8 if quantized else torch.float32
        state = self.state[p]
        state["step"] = 0
        for index in range(kind.num_states):
            key = f"state{index + 1}"
            moments = kind.state1_moments if index == 0 else 1
            shape = (moments, *local.shape) if moments > 1 else tuple(local.shape)
            state[key] = self.state_store.zeros(p, key, shape, dtype)
            if quantized:
                signed = kind.state_signed[index]
                state[f"qmap{index + 1}"] = self._qmap(signed, local.device)
                blocks = num_blocks(local.numel(), cfg["block_wise"])
                absmax_shape = (moments, blocks) if moments > 1 else (blocks,)
                state[f"absmax{index + 1}"] = torch.zeros(absmax_shape, dtype=torch.float32, device=local.device)
        initial = float(cfg.get("initial_accumulator_value", 0.0) or 0.0)
        if initial:
            self._fill_state1(state, initial, cfg)
        if cfg["percentile_clipping"] < 100:
            state["gnorm_vec"] = torch.zeros((100,), dtype=torch.float32, device=local.device)
        if cfg["max_unorm"] > 0.0:
            state["unorm_vec"] = torch.zeros((1,), dtype=torch.float32, device=local.device)

    def _fill_state1(self, state: dict[str, Any], value: float, cfg: Mapping[str, Any]) -> None:
        if state["state1"].dtype != torch.uint8:
            state["state1"].fill_(value)
            return
        full = torch.full(state["state1"].shape, value, dtype=torch.float32, device=state["state1"].device)
        codes, absmax = quantize(full, signed=self.kind.state_signed[0], block_wise=cfg["block_wise"])
        state["state1"].copy_(codes)
        state["absmax1"].copy_(absmax.reshape(state["absmax1"].shape))

    # -- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        started = time.perf_counter()
        sink = self.sink
        self._quant_probe = self._telemetry_begin(sink) if sink is not NULL_SINK else None
        works = self._collect_work()
        if works:
            self._percentile_clipping([w for w in works if w.cfg["percentile_clipping"] < 100])
            prepared = [w for w in works if w.needs_prepare]
            if prepared:
                self.state_store.visit(prepared, self._prepare_chunk)
                self._reduce_tensorwise_maxima(prepared)
                self._apply_trust_ratios([w for w in prepared if w.cfg["max_unorm"] > 0.0])
            self.state_store.visit(works, self._update_chunk)
        self.steps_taken += 1
        if sink is not NULL_SINK:
            sink.on_step(self, self._step_report(works, started))
        self._quant_probe = None
        return loss

    def _telemetry_begin(self, sink: StatsSink) -> Any:
        """Optional sink hooks (see :mod:`pagedopt.telemetry.sink`): the step starts, and the
        sink may return a probe that watches this step's update for quantization error."""
        begin = getattr(sink, "on_step_begin", None)
        if begin is not None:
            begin(self)
        ask = getattr(sink, "quant_error_probe", None)
        return ask(self, self.steps_taken + 1) if ask is not None else None

    def _collect_work(self) -> list[_Work]:
        self._sync_overrides()
        works = []
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = self._param_name(group, gindex, pindex)
                validation.check_grad(p, p.grad, name)
                state = self.state[p]
                if QUANT_STATE_KEY in state:
                    # Written in the state-dict layout straight into ``self.state`` (torch's
                    # ZeroRedundancyOptimizer.load_state_dict does this): import it now.
                    state = self.state[p] = self._import_param_state(p, state, group, True)
                if len(state) == 0:
                    self.init_state(group, p, gindex, pindex)
                state["step"] += 1
                settings = self._settings(group, p)
                works.append(
                    _Work(
                        key=p,
                        param=local_tensor(p),
                        grad=local_tensor(p.grad),
                        group_index=gindex,
                        name=name,
                        hp=settings,
                        cfg=settings,
                        state=state,
                    )
                )
        return works

    def _reduce_sums(self, what: str, works: list[_Work], values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Turn shard-local sums of DTensor (FSDP2) parameters into global ones.

        ``what`` is ``"grad_norm_sq"``, ``"update_norm_sq"`` or ``"param_norm_sq"``. Called once
        per kind of sum per step with every parameter's value, so one collective per process
        group serves all; plain (replicated) parameters pass through untouched.
        """
        return sharding.all_reduce_over_shards([w.key for w in works], values, "sum")

    def _reduce_maxima(self, works: list[_Work], values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensor-wise absmax over all shards of DTensor parameters (batched like the sums)."""
        return sharding.all_reduce_over_shards([w.key for w in works], values, "max")

    def _reduce_tensorwise_maxima(self, works: list[_Work]) -> None:
        """Make the prepare pass's tensor-wise maxima (both states) global, in one call for the
        whole step: outside the store's chunked visits, whose chunking may differ per rank."""
        pairs = [
            (w, attr)
            for attr in ("new_absmax1", "new_absmax2")
            for w in works
            if w.quantized and not w.cfg["block_wise"] and getattr(w, attr) is not None
        ]
        if not pairs:
            return
        maxima = self._reduce_maxima([w for w, _ in pairs], [getattr(w, attr) for w, attr in pairs])
        for (w, attr), m in zip(pairs, maxima):
            setattr(w, attr, m)

    def _percentile_clipping(self, works: list[_Work]) -> None:
        if not works:
            return
        norms_sq = dispatch.grad_norm_sq([w.grad for w in works])
        norms_sq = self._reduce_sums("grad_norm_sq", works, norms_sq)
        result = percentile_clip(
            norms_sq,
            [w.state["gnorm_vec"] for w in works],
            [w.state["step"] for w in works],
            [w.cfg["percentile_clipping"] for w in works],
        )
        for w, scale, norm, threshold in zip(works, result.scales, result.norms, result.thresholds):
            w.gnorm_scale, w.grad_norm, w.clip_threshold = scale, norm, threshold

    def _prepare_chunk(self, works: list[_Work]) -> None:
        want_norms = [w for w in works if w.cfg["max_unorm"] > 0.0]
        items = [w.item(self.kind) for w in works]
        results = dispatch.prepare(self.kind, items, want_norms=bool(want_norms))
        for w, r in zip(works, results):
            if w.quantized and not w.cfg["block_wise"]:
                w.new_absmax1, w.new_absmax2 = r.max1, r.max2
            w._prepared = r  # type: ignore[attr-defined]

    def _apply_trust_ratios(self, works: list[_Work]) -> None:
        if not works:
            return
        unorm = self._reduce_sums("update_norm_sq", works, [w._prepared.unorm_sq for w in works])
        pnorm = self._reduce_sums("param_norm_sq", works, [w._prepared.pnorm_sq for w in works])
        scales = trust_ratios(unorm, pnorm, [w.cfg["max_unorm"] for w in works])
        for w, scale, u in zip(works, scales, unorm):
            w.update_scale = scale
            w.state["unorm_vec"].copy_(u.reshape(1), non_blocking=True)

    def _update_chunk(self, works: list[_Work]) -> None:
        items = [w.item(self.kind) for w in works]
        probe = getattr(self, "_quant_probe", None)
        if probe is not None:
            probe.before(self.kind, [(w.name, w.group_index, w.key) for w in works], items)
        dispatch.update(self.kind, items)
        if probe is not None:
            probe.after()

    def _step_report(self, works: list[_Work], started: float) -> StepReport:
        report = StepReport(step=self.steps_taken, duration_seconds=time.perf_counter() - started)
        probe = getattr(self, "_quant_probe", None)
        if probe is not None:
            report.quant_errors = list(probe.samples)
        for w in works:
            report.params.append(
                ParamStepReport(
                    name=w.name,
                    group=w.group_index,
                    numel=w.key.numel(),
                    precision=precision_of(w.state, w.cfg["block_wise"]),
                    grad_norm=w.grad_norm,
                    clip_threshold=w.clip_threshold,
                    clip_scale=w.gnorm_scale,
                    update_scale=w.update_scale,
                    param=w.key,
                )
            )
        return report

    # -- memory ------------------------------------------------------------------------------

    def memory_report(self) -> MemoryReport:
        """One row per parameter: name, numel, state precision, state bytes, residency.

        Under FSDP2 each rank reports its own shards (numel and bytes of the local part)."""
        self._sync_overrides()
        rows = []
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                state = self.state.get(p)
                if not state:
                    continue
                tensors = [state[k] for k in STATE_TENSOR_KEYS if isinstance(state.get(k), torch.Tensor)]
                rows.append(
                    MemoryRow(
                        name=self._param_name(group, gindex, pindex),
                        numel=local_tensor(p).numel(),  # this rank's shard under FSDP2, like the bytes
                        precision=precision_of(state, self._settings(group, p)["block_wise"]),
                        state_bytes=sum(t.numel() * t.element_size() for t in tensors),
                        residency=self.state_store.residency(p, state),
                        state_elements=self.kind.num_states + self.kind.state1_moments - 1,
                    )
                )
        shared = sum(q.numel() * q.element_size() for q in self._qmaps.values())
        return MemoryReport(rows=rows, shared_bytes=shared)

    # -- state dict --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict with the quantization tensors of each parameter nested under
        ``"__bnb_optimizer_quant_state__"`` (the bitsandbytes >= 0.49 layout, which FSDP's
        gathering skips). DTensor (FSDP2) parameters instead get flat DTensor entries that
        DCP can reshard (see :mod:`pagedopt.distributed.sharding`)."""
        sync = getattr(self.state_store, "synchronize", None)
        if callable(sync):  # staged paging: page-out copies into pinned host memory may be in flight
            sync()
        sd = super().state_dict()
        sd["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in sd["state"].items()}
        # torch numbers parameters in param_groups order: index -> parameter.
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        for index, param_state in sd["state"].items():
            if not isinstance(param_state, dict):
                continue
            if isinstance(index, int) and index < len(params) and sharding.is_sharded(params[index]):
                # FSDP2: DTensors with the parameter's placements, flat keys (for DCP).
                p = params[index]
                block_wise = self._settings(group_of[p], p)["block_wise"]
                sd["state"][index] = sharding.checkpoint_state(
                    p, param_state, self.kind, block_wise, f"parameter {index}"
                )
                continue
            quant = {k: param_state.pop(k) for k in list(param_state) if k in self.non_castable_tensor_keys}
            if quant:
                param_state[QUANT_STATE_KEY] = quant
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], move_to_device: bool = True) -> None:
        """Load a pagedopt or bitsandbytes (nested or flat) state dict; training continues.

        Tensors keep their dtype (fp32 state stays fp32 for fp16/bf16 parameters). 8-bit
        state stored with a map other than pagedopt's is re-quantized (bitsandbytes' 1-state
        RMSprop/Adagrad use the signed map for their non-negative state); bitsandbytes'
        tensor-wise ``max1``/``max2`` become ``absmax1``/``absmax2``.
        """
        state_dict = deepcopy(state_dict)
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

    @staticmethod
    def _merge_loaded_group(group: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
        """Hyperparameters (lr, betas, ...) come from the checkpoint, as in torch; the settings
        that shape the state (optim_bits, block_wise, paging, ...) stay this optimizer's, and
        loaded state is converted to them (an ``AdamW8bit`` stays 8-bit whatever it loads)."""
        merged = dict(saved)
        merged["params"] = group["params"]
        if "betas" in merged:
            merged["betas"] = validation.parse_betas(merged["betas"])
        for k, v in group.items():
            if k in STATE_SHAPING_SETTINGS:
                merged[k] = v
            else:
                merged.setdefault(k, v)
        return merged

    def _import_param_state(
        self, p: torch.Tensor, value: Any, group: Mapping[str, Any], move_to_device: bool
    ) -> Any:
        if not isinstance(value, dict):
            return value
        value = dict(value)
        value.update(value.pop(QUANT_STATE_KEY, {}) or {})
        for old, new in (("max1", "absmax1"), ("max2", "absmax2")):
            if old in value and new not in value:
                value[new] = value.pop(old)
            value.pop(f"new_{old}", None)
        if isinstance(value.get("step"), torch.Tensor):
            value["step"] = int(value["step"].item())
        settings = self._settings(group, p)
        self._place_state(p, settings)
        if sharding.is_sharded(p):
            quantized = self._uses_8bit(p, settings)
            name = f"parameter of shape {tuple(p.shape)}"
            value = sharding.local_state(p, value, self.kind, settings["block_wise"], quantized, name)
        else:
            sharding.flatten_absmax(value, self.kind)  # [dim0, row/256] from a gathered FSDP2 state
            self._conform_precision(value, self._uses_8bit(p, settings), settings["block_wise"])
        self._reencode_8bit_state(value, settings["block_wise"])
        device = local_tensor(p).device
        for k, v in list(value.items()):
            if not isinstance(v, torch.Tensor):
                continue
            if k in ("qmap1", "qmap2"):
                value[k] = self._qmap(self.kind.state_signed[int(k[-1]) - 1], device)
            elif k in ("state1", "state2") and move_to_device:
                value[k] = self.state_store.adopt(p, k, v)
            elif move_to_device:
                value[k] = v.to(device)
        return value

    def _conform_precision(self, value: dict[str, Any], want_8bit: bool, block_wise: bool) -> None:
        """Give loaded state the precision this optimizer uses for the parameter: float32
        state (a 32-bit checkpoint, or an FSDP2 checkpoint whose 8-bit blocks did not line up
        with the shards and was saved dequantized) is quantized when the parameter gets 8-bit
        state here, and 8-bit state is decoded when it gets 32-bit state."""
        for index in (1, 2):
            tensor = value.get(f"state{index}")
            if not isinstance(tensor, torch.Tensor) or (tensor.dtype == torch.uint8) == want_8bit:
                continue
            signed = self.kind.state_signed[index - 1]
            moments = self.kind.state1_moments if index == 1 else 1
            if want_8bit:
                parts = [quantize(m.float(), signed=signed, block_wise=block_wise) for m in tensor.reshape(moments, -1)]
                value[f"state{index}"] = torch.stack([c for c, _ in parts]).reshape(tensor.shape)
                absmax = torch.stack([a for _, a in parts])
                value[f"absmax{index}"] = absmax if moments > 1 else absmax.reshape(-1)
                value[f"qmap{index}"] = dynamic_map(signed)
            else:
                absmax = value.pop(f"absmax{index}").reshape(moments, -1)
                saved_block_wise = absmax.shape[1] == num_blocks(tensor.numel() // moments, True)
                qmap = value.pop(f"qmap{index}", None)
                decoded = [dequantize(c, a, signed=signed, block_wise=saved_block_wise, qmap=qmap)
                           for c, a in zip(tensor.reshape(moments, -1), absmax)]
                value[f"state{index}"] = torch.stack(decoded).reshape(tensor.shape)

    def _reencode_8bit_state(self, value: dict[str, Any], block_wise: bool) -> None:
        """Re-encode 8-bit states saved with another quantization map (bitsandbytes' 1-state
        RMSprop/Adagrad use the signed map for a non-negative state) or another block layout
        (tensor-wise <-> block-wise) into this optimizer's. The error is at most half a code
        gap of the new map times the new absmax."""
        for index in (1, 2):
            codes, qmap, absmax = value.get(f"state{index}"), value.get(f"qmap{index}"), value.get(f"absmax{index}")
            if codes is None or absmax is None or codes.dtype != torch.uint8:
                continue
            signed = self.kind.state_signed[index - 1]
            moments = absmax.shape[0] if absmax.dim() == 2 else 1
            per_moment = codes.reshape(moments, -1)
            numel = per_moment.shape[1]
            saved_block_wise = absmax.reshape(moments, -1).shape[1] == num_blocks(numel, True)
            same_map = qmap is None or is_canonical_map(qmap, signed)
            if same_map and (saved_block_wise == block_wise or num_blocks(numel, True) == 1):
                continue
            new_codes, new_absmax = [], []
            for c, a in zip(per_moment, absmax.reshape(moments, -1)):
                values = dequantize(c, a, signed=signed, block_wise=saved_block_wise, qmap=qmap)
                q, m = quantize(values, signed=signed, block_wise=block_wise)
                new_codes.append(q)
                new_absmax.append(m)
            value[f"state{index}"] = torch.stack(new_codes).reshape(codes.shape)
            shape = (moments, -1) if absmax.dim() == 2 else (-1,)
            value[f"absmax{index}"] = torch.stack(new_absmax).reshape(shape)


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
        _extra_defaults: Mapping[str, Any] | None = None,
    ):
        self._init_named(
            optimizer_name, 2, params,
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha, t_alpha=t_alpha,
                 t_beta3=t_beta3, **(_extra_defaults or {})),
            dict(optim_bits=optim_bits, min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping,
                 block_wise=block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros),
            args, is_paged, paging,
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
        _extra_defaults: Mapping[str, Any] | None = None,
    ):
        self._init_named(
            optimizer_name, 1, params,
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **(_extra_defaults or {})),
            dict(optim_bits=optim_bits, min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping,
                 block_wise=block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros),
            args, is_paged, paging,
        )
