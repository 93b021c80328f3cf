"""The step: build the plan when it is stale, run its prepared launches, then the per-item passes.

``opt.step()`` does, per step:

1. collect the gradients (one list comprehension) and check the plan is still valid
   (:meth:`~pagedopt.optim.plan.StepPlan.still_valid`); if not, build it again
   (:meth:`StepMixin._build_plan`: check gradients, create missing state, group parameters);
2. each launch group: check the gradients in bulk, advance the step count, compute the step
   scalars once from the live param group, run its prepared launch;
3. the remaining parameters: the batched per-item passes (:mod:`pagedopt.optim.passes`).

With a telemetry sink attached the launches still run: the sink's per-parameter rows for
launched parameters carry what they have (name, group, size, precision; their gradient norms
the sink measures itself, in one batched pass), and only on the steps where the sink samples
the quantization error does every parameter take the per-item passes (the probe watches the
update of each sampled parameter). A subclass that overrides ``update_step`` or ``init_state`` takes
bitsandbytes' per-parameter loop instead (:mod:`pagedopt.optim.hooks`).

The step runs outside TorchDynamo (``torch._dynamo.disable``): it calls native code through
ctypes and keeps host-side step counts, so ``torch.compile`` of a training step that calls
``opt.step()`` (or of ``opt.step`` itself) graph-breaks around it and runs it eagerly, with
the same results as without compilation.

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(64, 64)
    >>> opt = pagedopt.AdamW8bit(model.parameters(), min_8bit_size=1024)
    >>> model(torch.randn(2, 64)).sum().backward(); opt.step()
    >>> opt.plan_builds, int(opt.state[model.weight]["step"])
    (1, 1)
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import replace
from operator import attrgetter, methodcaller
from typing import Any, Iterator

import torch

from ..distributed.exit_guard import settle_at_exit
from ..functional.dispatch import backend_for
from ..functional.scalars import step_scalars
from ..telemetry.sink import NULL_SINK, StatsSink
from . import validation
from .launch_clipping import clip_before_launch, with_scale_buffer
from .launch_prepare import needs_prepare, prepare_before_launch, with_prepare_buffers
from .memory import precision_of
from .passes import Work
from .plan import LaunchGroup, PlanEntry, StepPlan, flat_params, group_signatures, overrides_key
from .state_io import QUANT_STATE_KEY, local_tensor

_shape = attrgetter("shape")
_dtype = attrgetter("dtype")
_layout = attrgetter("layout")
_device = attrgetter("device")
_data_ptr = methodcaller("data_ptr")
_is_contiguous = methodcaller("is_contiguous")


def _planner(device: torch.device):
    """A factory ``(kind, items) -> launch`` when the backend serving ``device`` supports
    prepared launches (the native CPU kernels, the CUDA kernels), else None."""
    backend = backend_for(device)
    if backend.name == "cpu":
        from ..backends import cpu_plan

        def make(kind, items):
            return cpu_plan.CpuLaunch(backend.lib, kind, items)

        def make_prepare(kind, items, want_norms):
            return cpu_plan.CpuPrepareLaunch(backend.lib, kind, items, want_norms)

        make.plannable = cpu_plan.plannable
        make.prepare = make_prepare  # (trust ratios, tensor-wise state: pagedopt.optim.launch_prepare)
        make.graphs = False
        return make
    if backend.name == "cuda":
        from ..backends import cuda_prepared

        def make_cuda(kind, items, use_graph=False):
            return cuda_prepared.CudaLaunch(backend, kind, items, use_graph=use_graph)

        def make_cuda_prepare(kind, items, want_norms):
            return cuda_prepared.CudaPrepareLaunch(backend, kind, items, want_norms)

        make_cuda.plannable = cuda_prepared.plannable
        make_cuda.prepare = make_cuda_prepare
        make_cuda.graphs = True
        return make_cuda
    return None


class StepMixin:
    """Plan building and the step (mixed into :class:`~pagedopt.optim.Optimizer8bit`)."""

    _plan: StepPlan | None = None
    _plan_generation: int = 0
    plan_builds: int = 0  # how many times a step plan was built (tests and telemetry)
    # False: every parameter takes the per-item passes (the reference path of the plan tests).
    prepared_launches: bool = True

    def invalidate_plan(self) -> None:
        """Make the next step rebuild its plan (called by everything that reshapes it)."""
        self._plan_generation += 1
        self._plan = None

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_impl()
        return loss

    @torch._dynamo.disable
    def _step_impl(self) -> None:
        with _collection_paused():
            self._step_body()

    def _step_body(self) -> None:
        started = time.perf_counter()
        sink = self.sink
        self._quant_probe = self._telemetry_begin(sink) if sink is not NULL_SINK else None
        with self.nonfinite.tallied(self):  # the update kernels count NaN/Inf gradient elements
            launched: list[LaunchGroup] = []
            if self._uses_hook_path():
                works = self._hook_step()
            else:
                works = self._planned_step(not self.prepared_launches, launched)
        self.steps_taken += 1
        if sink is not NULL_SINK:
            sink.on_step(self, self._step_report(works, started, launched))
        self._quant_probe = None

    def _telemetry_begin(self, sink: StatsSink) -> Any:
        """Optional sink hooks (see :mod:`pagedopt.telemetry.sink`): the step starts, and the
        sink may return a probe that watches this step's update for quantization error."""
        begin = getattr(sink, "on_step_begin", None)
        if begin is not None:
            begin(self)
        ask = getattr(sink, "quant_error_probe", None)
        return ask(self, self.steps_taken + 1) if ask is not None else None

    # -- planning ----------------------------------------------------------------------------

    def _plan_key(self) -> tuple[Any, ...]:
        # (the watch's mode: prepared CUDA launches hold its device counter only in "skip" mode)
        return (self._plan_generation, self.mng.generation, id(self.state_store), self.numerics, self.cuda_graph,
                self.nonfinite.mode)

    def _current_plan(self, params: list[torch.Tensor], grads: list[Any]) -> StepPlan:
        plan = self._plan
        if plan is None or not plan.still_valid(self._plan_key(), self.param_groups, params, grads, self.state):
            plan = self._plan = self._build_plan(params, grads)
        return plan

    def _build_plan(self, params: list[torch.Tensor], grads: list[Any]) -> StepPlan:
        """Check gradients, create missing state and group the parameters (see
        :mod:`pagedopt.optim.plan`)."""
        self._sync_overrides()
        self.plan_builds += 1
        settle_at_exit()  # (in a process group: no abort at exit, see pagedopt.distributed.exit_guard)
        entries: list[PlanEntry] = []
        position = 0
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                grad = grads[position]
                if grad is not None:
                    name = self._param_name(group, gindex, pindex)
                    validation.check_grad(p, grad, name)
                    state = self.state[p]
                    if QUANT_STATE_KEY in state:
                        # Written in the state-dict layout straight into ``self.state`` (torch's
                        # ZeroRedundancyOptimizer.load_state_dict does this): import it now.
                        state = self.state[p] = self._import_param_state(p, state, group, True)
                    if len(state) == 0:
                        self.init_state(group, p, gindex, pindex)
                    else:
                        validation.check_state_shape(local_tensor(p), state, self.kind.state1_moments, name)
                    entries.append(PlanEntry(p, local_tensor(p), position, gindex, pindex, name, self.state[p]))
                position += 1
        plan = StepPlan(
            params=list(params),
            has_grad=[g is not None for g in grads],
            param_ptrs=[e.key.data_ptr() for e in entries],
            state_dicts=[e.state for e in entries],
            state_tensors=[],
            generation=self._plan_key(),
            group_signatures=group_signatures(self.param_groups),
            entries=entries,
        )
        self._group_launches(plan, grads)
        plan.freeze()
        return plan

    def _group_launches(self, plan: StepPlan, grads: list[Any]) -> None:
        """Split the entries into prepared launch groups and per-item entries."""
        buckets: dict[tuple, tuple[Any, list[tuple[PlanEntry, Any]]]] = {}
        # (a state store without moves(), e.g. one written before it existed: assume it moves)
        moves = getattr(self.state_store, "moves", _always_moves)
        for e in plan.entries:
            if moves(e.key):  # paged state: the pager moves it between chunks of its visits
                plan.per_item.append(e)
                continue
            group = self.param_groups[e.gindex]
            cfg = self._settings(group, e.key)
            make = _planner(e.param.device)  # (DTensors: their local shards, e.param)
            work = self._work_for(e, grads[e.position], cfg, advance=False)
            # The launch copies non-contiguous gradients at each step (_launchable_grads): the
            # plan must not depend on this step's gradient strides, which may differ by rank.
            work.grad = work.grad.contiguous()
            percentile, max_unorm = int(cfg["percentile_clipping"]), float(cfg["max_unorm"])
            if percentile < 100:  # (a stand-in for the scale the launch will point at)
                work.gnorm_scale = torch.ones((), dtype=torch.float32, device=e.param.device)
            item = work.item(self.kind, step=e.state["step"] + 1) if make is not None else None
            prepare = item is not None and needs_prepare(item.quantized, item.block_wise, max_unorm)
            if prepare and getattr(make, "prepare", None) is None:
                plan.per_item.append(e)  # (no prepared prepare pass on this backend)
                continue
            if prepare:  # (stand-ins for the buffers the launch will point at)
                item = with_prepare_buffers(self.kind, [item], e.param.device, max_unorm)[1][0]
            if make is None or not make.plannable(item):
                plan.per_item.append(e)
                continue
            overrides = self._overrides_for(e.key)
            key = (e.gindex, overrides_key(overrides), e.state["step"], e.param.device, bool(cfg["skip_zeros"]),
                   percentile, max_unorm if prepare else None)
            buckets.setdefault(key, (make, []))[1].append((e, item))
        for (gindex, _, _, device, skip_zeros, percentile, max_unorm), (make, pairs) in buckets.items():
            plan.launch_groups.append(self._launch_group(make, gindex, skip_zeros, percentile, max_unorm, device, pairs))
        for lg in plan.launch_groups:
            lg.freeze()

    def _launch_group(self, make: Any, gindex: int, skip_zeros: bool, percentile: int, max_unorm: float | None,
                      device: torch.device, pairs: list[tuple[PlanEntry, Any]]) -> LaunchGroup:
        """One launch group: its update launch, and the buffers and prepare launch it reads
        from when it clips (``percentile < 100``) or needs the prepare pass (``max_unorm`` not
        None: trust ratios when > 0, tensor-wise state)."""
        group_entries = [e for e, _ in pairs]
        items = [item for _, item in pairs]
        scales = bufs = None
        if percentile < 100:  # the launch reads each scale from a buffer written every step
            scales, items = with_scale_buffer(items, device)
        if max_unorm is not None:  # ... and each trust ratio / new tensor-wise scale from another
            bufs, items = with_prepare_buffers(self.kind, items, device, max_unorm)
            if bufs.trust_scales is not None:
                bufs.unorm_vecs = [e.state["unorm_vec"] for e in group_entries]
        launch = make(self.kind, items, use_graph=True) if self.cuda_graph and make.graphs else make(self.kind, items)
        lg = LaunchGroup(gindex, self._overrides_for(group_entries[0].key), skip_zeros, group_entries, launch)
        lg.clip_percentile, lg.clip_scales = percentile, scales
        if bufs is not None:
            lg.prepare_buffers = bufs
            lg.prepare_launch = make.prepare(self.kind, items, bufs.trust_scales is not None)
        lg.precisions = [precision_of(e.state, item.block_wise) for e, item in pairs]  # telemetry rows
        # What the launch points at, for quantization-error sampling, without the gradients:
        # the plan must not keep the first step's gradients alive (the probe puts each
        # step's own in).
        lg.items = [replace(item, grad=None) for item in items]
        return lg

    # -- execution ---------------------------------------------------------------------------

    def _planned_step(self, per_item_only: bool = False, launched: list[LaunchGroup] | None = None) -> list[Work]:
        """Run the step; returns the per-item works and appends the launch groups that ran
        to ``launched``."""
        params = flat_params(self.param_groups)
        grads = [p.grad for p in params]
        plan = self._current_plan(params, grads)
        entries = plan.per_item
        if per_item_only:
            entries = entries + [e for lg in plan.launch_groups for e in lg.entries]
        else:
            stale: list[PlanEntry] = []
            for lg in plan.launch_groups:
                if not self._run_launch(lg, grads):
                    stale.extend(lg.entries)
                elif launched is not None:
                    launched.append(lg)
            if stale:  # parameters changed under the plan: per item now, a new plan next step
                entries = entries + stale
                self.invalidate_plan()
        works = [self._work_for(e, grads[e.position], None, advance=True) for e in entries]
        self._run_per_item(works)
        return works

    def _work_for(self, e: PlanEntry, grad: torch.Tensor, cfg: Any, advance: bool) -> Work:
        group = self.param_groups[e.gindex]
        if advance:
            validation.check_grad(e.key, grad, e.name)
            validation.check_state_shape(local_tensor(e.key), e.state, self.kind.state1_moments, e.name)
            e.state["step"] += 1
        settings = cfg if cfg is not None else self._settings(group, e.key)
        return Work(
            key=e.key, param=local_tensor(e.key), grad=local_tensor(grad), group_index=e.gindex, name=e.name,
            hp=settings, cfg=settings, state=e.state, numerics=self.numerics,
        )

    def _run_launch(self, lg: LaunchGroup, grads: list[Any]) -> bool:
        """Run one prepared launch over this step's gradients of its parameters; False (nothing
        done) when its parameters changed under the plan (see :meth:`_launchable_grads`)."""
        positions = lg.positions
        gl = [grads[i] for i in positions]
        if lg.sharded:  # the launch reads this rank's shard of DTensor gradients
            gl = list(map(local_tensor, gl))
        gl = self._launchable_grads(lg, gl)
        if gl is None:
            return False
        ptrs = list(map(_data_ptr, gl))
        if ptrs == lg.last_ptrs:
            ptrs_arg = None
        else:
            ptrs_arg = lg.last_ptrs = ptrs
        states = lg.state_list
        step = states[0]["step"] + 1
        for s in states:
            s["step"] = step
        lg.last_clip = clip_before_launch(lg, gl, step) if lg.clip_scales is not None else None
        group = self.param_groups[lg.gindex]
        hp = {**group, **lg.overrides} if lg.overrides else group
        scalars = step_scalars(self.kind, hp, step, skip_zeros=lg.skip_zeros)
        lg.last_trust = prepare_before_launch(lg, ptrs_arg, scalars) if lg.prepare_launch is not None else None
        probe = self._quant_probe
        if probe is None:
            lg.launch.run(ptrs_arg, scalars)
            return True
        # A quantization-error sampling step keeps the launch (a sink on one rank alone must
        # not change which collectives this rank runs): the probe reads the launch's items,
        # with this step's gradients and scalars, before and after it.
        items = [replace(item, grad=g, scalars=scalars) for item, g in zip(lg.items, gl)]
        probe.before(self.kind, [(e.name, e.gindex, e.key) for e in lg.entries], items)
        lg.launch.run(ptrs_arg, scalars)
        probe.after()
        return True

    def _launchable_grads(self, lg: LaunchGroup, gl: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Bulk checks of a launch group's gradients: dense, with the shapes, dtypes and devices
        the plan recorded for the parameters. Non-contiguous gradients are replaced by
        contiguous copies (kept in ``lg.grad_copies`` until the next step, for kernels still
        reading them), never handed to the per-item path: under FSDP that would run other
        collectives (clipping norms, trust ratios) on this rank than on the others.

        When the check fails it raises (naming the parameter) what the per-item path would
        raise; None when nothing is wrong but the parameters changed under the plan without a
        new pointer (``p.data = p.data.view(torch.bfloat16)`` on an fp16 parameter, with a
        gradient to match: the plan's validity check compares pointers, not dtypes)."""
        if (list(map(_layout, gl)).count(torch.strided) == len(gl)
                and list(map(_shape, gl)) == lg.shapes
                and list(map(_dtype, gl)) == lg.dtypes
                and list(map(_device, gl)) == lg.devices):
            if all(map(_is_contiguous, gl)):
                lg.grad_copies = None
                return gl
            lg.grad_copies = [g.contiguous() for g in gl]  # (contiguous ones are returned as they are)
            return lg.grad_copies
        moments = self.kind.state1_moments
        for e, g in zip(lg.entries, gl):
            param = local_tensor(e.key)
            validation.check_grad(param, g, e.name)  # (local shards for DTensors: gl is local)
            validation.check_state_shape(param, e.state, moments, e.name)
        return None


@contextlib.contextmanager
def _collection_paused() -> Iterator[None]:
    """No cyclic garbage collection while the step runs (unless the caller turned it off).

    The per-item passes and the prepare passes create a few small objects per tensor, alive
    for the whole step: a young-generation collection during the step would promote them, and
    enough promotions make CPython scan every tracked object of the process (~330,000 with
    torch imported, ~100 ms) every few steps - pauses the mean step time shows
    (benchmarks/bench_gc_pauses.py). With collection paused they are freed by reference
    counting at the end of the step, never promoted. The step creates no reference cycles, so
    nothing waits for a collection."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _always_moves(param: torch.Tensor) -> bool:
    return True
