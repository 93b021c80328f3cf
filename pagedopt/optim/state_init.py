"""State creation: the zeroed (8-bit or 32-bit) state of a parameter, placed by the store.

Mixed into :class:`~pagedopt.optim.Optimizer8bit`; ``init_state(group, p, gindex, pindex)``
keeps bitsandbytes 0.49's name and arguments, so a subclass may override it (see
:mod:`pagedopt.optim.hooks`).

Example:
    >>> import torch, pagedopt
    >>> w = torch.nn.Parameter(torch.randn(4096))
    >>> opt = pagedopt.AdamW8bit([w])
    >>> opt.init_state(opt.param_groups[0], w, 0, 0)
    >>> opt.state[w]["state1"].dtype, opt.state[w]["absmax1"].shape
    (torch.uint8, torch.Size([16]))
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..functional.qmap import dynamic_map
from ..functional.quantization import num_blocks, quantize
from .placement import BASE, RoutingStateStore
from .state_io import local_tensor


class StateInitMixin:
    """Creating state (mixed into :class:`Optimizer8bit`)."""

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

