"""State dict I/O: saving (``state_dict``) and converting a loaded parameter state into this
optimizer's layout.

:meth:`Optimizer8bit.load_state_dict <pagedopt.optim.Optimizer8bit.load_state_dict>` (in
:mod:`pagedopt.optim.optimizer`) checks the groups and maps saved indices to parameters; the
conversions it needs per parameter live here, as a mixin of the optimizer class: nested
bitsandbytes quantization state, tensor-wise ``max1``/``max2``, 8-bit <-> 32-bit precision,
other quantization maps and other block layouts.

Example:
    >>> import torch, pagedopt
    >>> w = torch.nn.Parameter(torch.randn(4096))
    >>> opt = pagedopt.AdamW8bit([w]); w.grad = torch.randn(4096); opt.step()
    >>> sd = opt.state_dict(); other = pagedopt.AdamW32bit([w]); other.load_state_dict(sd)
    >>> other.state[w]["state1"].dtype   # decoded to this optimizer's 32-bit state
    torch.float32
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Mapping

import torch

from ..distributed import sharding
from ..functional.qmap import dynamic_map, is_canonical_map
from ..functional.quantization import dequantize, num_blocks, quantize
from ..shards import local_tensor  # noqa: F401  (re-exported: optimizer code imports it from here)
from . import validation
from .manager import STATE_SHAPING_SETTINGS

QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
# State entries that are not per-parameter-dtype floats: never cast on load.
NON_CASTABLE_KEYS = frozenset(
    {"qmap1", "qmap2", "max1", "max2", "new_max1", "new_max2", "state1", "state2",
     "gnorm_vec", "absmax1", "absmax2", "unorm_vec"}
)
STATE_TENSOR_KEYS = ("state1", "state2", "absmax1", "absmax2", "gnorm_vec", "unorm_vec")


class StateImportMixin:
    """``state_dict()`` and the per-parameter conversions of loaded state (mixed into
    :class:`Optimizer8bit`, whose ``load_state_dict`` calls them)."""

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
