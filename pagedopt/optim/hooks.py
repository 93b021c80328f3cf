"""bitsandbytes 0.49's subclassing hooks, and the per-parameter step that calls them.

bitsandbytes documents writing a custom 8-bit optimizer as subclassing ``Optimizer2State``
(or ``Optimizer1State``) and overriding ``update_step``; its ``step()`` is a loop over
parameters that calls these methods, with these meanings (bitsandbytes 0.49.0,
``bitsandbytes/optim/optimizer.py``):

==================================================  =============================================
``check_overrides()``                                resolve :class:`~pagedopt.GlobalOptimManager`
                                                     overrides (once, before the first step)
``to_gpu()``                                         move existing state to the parameters' devices
                                                     (once, before the first step; paged state stays)
``fill_qmap()``                                      fill ``name2qmap["dynamic"]``/``["udynamic"]``
``get_config(gindex, pindex, group)``                one parameter's resolved settings (dict)
``init_state(group, p, gindex, pindex)``             create ``state[p]`` (first step with a gradient)
``get_state_buffer(p, dtype=torch.float32)``         a zeroed buffer shaped like ``p``
``prefetch_state(p)``                                page ``p``'s state in before its update (paged)
``update_step(group, p, gindex, pindex)``            update one parameter (advances ``state["step"]``)
==================================================  =============================================

pagedopt's built-in optimizers do not run that loop: their step is planned
(:mod:`pagedopt.optim.plan`). A subclass that overrides ``update_step`` or ``init_state``
gets the per-parameter loop instead, so its code runs for each parameter exactly as on
bitsandbytes; it may call ``super().update_step(...)`` for the built-in update of a
parameter. One difference: ``get_state_buffer`` of a paged optimizer returns ordinary
(unpaged) memory - pagedopt pages the ``state1``/``state2`` entries that ``init_state``
creates.

Example:
    >>> import torch, pagedopt
    >>> class SignSGD(pagedopt.optim.Optimizer1State):
    ...     def __init__(self, params, lr=0.1):
    ...         super().__init__("momentum", params, lr=lr, betas=(0.0, 0.0), optim_bits=32)
    ...     def update_step(self, group, p, gindex, pindex):
    ...         self.state[p]["step"] += 1
    ...         p.data.add_(p.grad.sign(), alpha=-self.get_config(gindex, pindex, group)["lr"])
    >>> w = torch.nn.Parameter(torch.ones(3)); opt = SignSGD([w])
    >>> w.grad = torch.tensor([1.0, -2.0, 0.0]); opt.step(); w.detach()
    tensor([0.9000, 1.1000, 1.0000])
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from . import validation
from .passes import Work
from .state_io import QUANT_STATE_KEY, local_tensor
from .state_init import StateInitMixin


class HooksMixin:
    """The hook methods (mixed into :class:`~pagedopt.optim.Optimizer8bit`)."""

    initialized: bool = False  # bitsandbytes' flag: check_overrides()/to_gpu() have run

    def check_overrides(self) -> None:
        """Resolve the GlobalOptimManager overrides of every parameter (bitsandbytes runs this
        once before the first step; pagedopt also re-resolves when the manager changes)."""
        self._sync_overrides()
        for group in self.param_groups:
            for p in group["params"]:
                self._overrides_for(p)

    def to_gpu(self) -> None:
        """Move existing unpaged state tensors to their parameter's device."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                device = local_tensor(p).device
                for key, value in list(state.items()):
                    if not isinstance(value, torch.Tensor) or value.device == device:
                        continue
                    if self.is_paged and key in ("state1", "state2"):
                        continue  # the pager decides where paged state lives
                    state[key] = value.to(device)

    def fill_qmap(self) -> None:
        """``name2qmap["dynamic"]`` (signed) and ``["udynamic"]`` (unsigned) quantization maps."""
        self._qmap(True, torch.device("cpu"))
        self._qmap(False, torch.device("cpu"))

    def get_state_buffer(self, p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A zeroed buffer shaped like ``p`` (its shard under FSDP2) on ``p``'s device."""
        return torch.zeros_like(local_tensor(p), dtype=dtype)

    def prefetch_state(self, p: torch.Tensor) -> None:
        """Page ``p``'s state in (paged optimizers; a no-op otherwise)."""
        prefetch = getattr(self.state_store, "prefetch", None)
        if self.is_paged and callable(prefetch) and self.state.get(p):
            prefetch([p])

    @torch.no_grad()
    def update_step(self, group: Mapping[str, Any], p: torch.Tensor, gindex: int, pindex: int) -> None:
        """Update one parameter with the built-in algorithm (advances ``state["step"]``)."""
        name = self._param_name(group, gindex, pindex)
        validation.check_grad(p, p.grad, name)
        state = self.state[p]
        validation.check_state_shape(local_tensor(p), state, self.kind.state1_moments, name)
        state["step"] += 1
        settings = self._settings(group, p)
        work = Work(
            key=p, param=local_tensor(p), grad=local_tensor(p.grad), group_index=gindex, name=name,
            hp=settings, cfg=settings, state=state, numerics=self.numerics,
        )
        self._run_per_item([work])
        works = getattr(self, "_hook_works", None)
        if works is not None:  # inside step(): reported to the telemetry sink
            works.append(work)

    # -- the per-parameter step --------------------------------------------------------------

    def _uses_hook_path(self) -> bool:
        """True for subclasses that override ``update_step`` or ``init_state``."""
        cls = type(self)
        found = cls.__dict__.get("_pagedopt_hook_path")
        if found is None:
            found = (cls.update_step is not HooksMixin.update_step
                     or cls.init_state is not StateInitMixin.init_state)
            setattr(cls, "_pagedopt_hook_path", found)
        return found

    def _hook_step(self) -> list[Work]:
        """bitsandbytes' step loop over parameters, calling the (overridable) hooks."""
        self._hook_works: list[Work] = []
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        self._sync_overrides()
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if QUANT_STATE_KEY in state:
                    self.state[p] = self._import_param_state(p, state, group, True)
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
        return self._hook_works
