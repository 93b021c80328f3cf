"""Update in backward: each parameter is updated as soon as its gradient is ready, and its
gradient is freed right after (opt-in, ``update_in_backward=True``).

With ``opt.update_in_backward = True`` (or the constructor argument / config key) the
optimizer registers a post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``)
on every trainable parameter. When backward has accumulated a parameter's gradient, the hook
creates the parameter's state if needed, updates the parameter exactly as ``step()`` would
(the same kernels: in strict numerics the parameters are bit-identical to the ordinary
step) and sets ``p.grad = None``. Peak memory drops by about the size of the gradients, since
they are never all alive at once; paged state is paged in parameter by parameter while the
rest of backward runs.

* ``opt.step()`` is still called once per step: it updates any parameter whose gradient did
  not come through backward (set by hand), and is otherwise nearly free.
* **Gradient accumulation**: wrap every micro-batch's backward except the last in
  ``with opt.accumulating():`` - the hooks then leave the gradients to accumulate, and the
  last backward (outside the context) applies the update. ``zero_grad()`` is not needed.
* **Frozen parameters** (``requires_grad=False`` when the mode is turned on) get no hook;
  if unfrozen later they are updated by ``step()`` as usual. Turn the mode off and on again
  to hook them.
* **Clipping**: a global gradient norm is unknown until backward ends, so
  ``torch.nn.utils.clip_grad_norm_`` cannot be used; percentile clipping works (each
  parameter clips against the history of its own earlier gradient norms), and so do trust
  ratios (LAMB/LARS), which are per parameter.
* DTensor (FSDP2) parameters are not supported in this mode (their norms need collectives
  across all parameters); enabling it with one raises ``ValueError``.
* **No loss scaling** (fp16 ``GradScaler``): the hooks would apply the scaled gradient
  before ``scaler.unscale_()``; use bf16 autocast. (Not detectable from the gradient.)
* **One process only.** In a data-parallel job the hook would apply this rank's own gradient
  before DDP averages it (DDP's all-reduce runs after the hook), so the ranks would silently
  drift apart, and DDP would then hand ``step()`` the averaged gradient to apply a second
  time. Enabling the mode while a process group of more than one rank is initialized raises
  ``RuntimeError``, and so does the first hook of a backward that runs in one (before any
  parameter is touched).

Example:
    >>> import torch, pagedopt
    >>> model = torch.nn.Linear(64, 64)
    >>> opt = pagedopt.AdamW8bit(model.parameters(), min_8bit_size=0, update_in_backward=True)
    >>> model(torch.randn(4, 64)).sum().backward()     # updates happen here
    >>> model.weight.grad is None, int(opt.state[model.weight]["step"])
    (True, 1)
    >>> opt.step()   # nothing left to do
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .state_io import QUANT_STATE_KEY


class BackwardUpdateMixin:
    """The update-in-backward mode (mixed into :class:`~pagedopt.optim.Optimizer8bit`)."""

    _backward_handles: list[Any] | None = None
    _accumulating_depth: int = 0
    backward_updates: int = 0  # parameters updated by the hooks (for tests and telemetry)

    @property
    def update_in_backward(self) -> bool:
        """Whether parameters are updated in backward (see :mod:`pagedopt.optim.backward_update`)."""
        return self._backward_handles is not None

    @update_in_backward.setter
    def update_in_backward(self, enabled: bool) -> None:
        if bool(enabled) == self.update_in_backward:
            return
        if not enabled:
            for handle in self._backward_handles or []:
                handle.remove()
            self._backward_handles = None
            return
        _check_one_process()
        handles = []
        for group in self.param_groups:
            for p in group["params"]:
                if callable(getattr(p, "to_local", None)):
                    for h in handles:
                        h.remove()
                    raise ValueError(
                        "update_in_backward does not support DTensor (FSDP2) parameters; "
                        "use the ordinary step (update_in_backward=False)"
                    )
                if p.requires_grad:
                    handles.append(p.register_post_accumulate_grad_hook(self._backward_hook))
        self._backward_handles = handles

    def _hook_new_group(self, group: dict[str, Any]) -> None:
        """Called by add_param_group: hook the new group's parameters too."""
        if self._backward_handles is None:
            return
        for p in group["params"]:
            if p.requires_grad:
                self._backward_handles.append(p.register_post_accumulate_grad_hook(self._backward_hook))

    @contextmanager
    def accumulating(self) -> Iterator[None]:
        """Gradients accumulate instead of being applied in backward (all micro-batches but
        the last; see the module docstring). A no-op when update_in_backward is off."""
        self._accumulating_depth += 1
        try:
            yield
        finally:
            self._accumulating_depth -= 1

    @torch.no_grad()
    def _backward_hook(self, p: torch.Tensor) -> None:
        if self._accumulating_depth or p.grad is None:
            return
        _check_one_process()  # (a group created after the mode was turned on)
        where = self._position_of(p)
        if where is None:  # no longer in this optimizer's groups
            return
        gindex, pindex = where
        group = self.param_groups[gindex]
        state = self.state[p]
        if QUANT_STATE_KEY in state:
            state = self.state[p] = self._import_param_state(p, state, group, True)
        if len(state) == 0:
            self.init_state(group, p, gindex, pindex)
        self.prefetch_state(p)
        self._hook_works = []
        with self.nonfinite.tallied(self):
            self.update_step(group, p, gindex, pindex)
        self._hook_works = []
        p.grad = None
        self.backward_updates += 1
        self._prefetch_ahead(p)

    def _prefetch_ahead(self, p: torch.Tensor) -> None:
        """Paged state: page in the state of the parameters backward reaches next (those
        registered just before ``p``; ``prefetch_depth`` of them) while it computes them."""
        prefetch = getattr(self.state_store, "prefetch", None)
        if not self.is_paged or not callable(prefetch):
            return
        _, table, flat = self._positions_table()
        index = table[p][2]
        depth = max(1, int(getattr(self.paging, "prefetch_depth", 1) or 1))
        ahead = [q for q in reversed(flat[max(0, index - depth):index]) if self.state.get(q)]
        if ahead:
            prefetch(ahead)

    def _position_of(self, p: torch.Tensor) -> tuple[int, int] | None:
        found = self._positions_table()[1].get(p)
        return found[:2] if found is not None else None

    def _positions_table(self) -> tuple[Any, dict[torch.Tensor, tuple[int, int, int]], list[torch.Tensor]]:
        positions = getattr(self, "_positions", None)
        key = tuple(len(g["params"]) for g in self.param_groups)
        if positions is None or positions[0] != key:
            flat = [q for g in self.param_groups for q in g["params"]]
            table: dict[torch.Tensor, tuple[int, int, int]] = {}
            for gi, g in enumerate(self.param_groups):
                for pi, q in enumerate(g["params"]):
                    table[q] = (gi, pi, len(table))
            positions = self._positions = (key, table, flat)
        return positions


def _check_one_process() -> None:
    """Refuse a multi-rank job (see the module docstring: DDP averages after the hook)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"update_in_backward runs in one process only, and this one is rank {dist.get_rank()} of "
            f"{dist.get_world_size()}: each rank would apply its own gradient before data-parallel "
            "averaging (DDP all-reduces after the hook), so the ranks would drift apart. Use the "
            "ordinary step (update_in_backward=False)"
        )
