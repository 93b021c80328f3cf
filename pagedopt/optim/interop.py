"""Optimizer state interchange with bitsandbytes 0.49 and 0.50.

**Into pagedopt** nothing is needed: ``optimizer.load_state_dict`` takes a bitsandbytes state
dict of either version (flat 0.49 keys or the 0.50 ``__bnb_optimizer_quant_state__`` nesting;
0.49's tensor-wise ``max1``/``new_max1``; 0.50's block-wise scales where pagedopt's LAMB/LARS
default to one scale per tensor; the signed map bitsandbytes uses for RMSprop/Adagrad) and
re-encodes what differs (:func:`normalize_param_state` is that first step).

**Out of pagedopt**, :func:`bitsandbytes_state_dict` writes what the same bitsandbytes class
loads and keeps training from:

* 0.49: flat keys; 8-bit states tensor-wise where the parameter is (``max1``, ``new_max1``,
  as 0.49 keeps them - LAMB8bit/LARS8bit by default), else block-wise ``absmax1``;
* 0.50: block-wise ``absmax1`` always (0.50 has no tensor-wise layout: a ``[1]`` scale fails
  with "output with shape [1] doesn't match the broadcast shape"), nested under
  ``__bnb_optimizer_quant_state__``;
* both: state1 of 1-state optimizers on bitsandbytes' signed map (pagedopt keeps the
  non-negative RMSprop/Adagrad state on the unsigned map); ``unorm_vec``/``gnorm_vec``
  present where the settings need them. Re-encoding costs at most half a code gap.

Example:
    >>> import torch, pagedopt
    >>> from pagedopt.optim.interop import bitsandbytes_state_dict
    >>> w = torch.nn.Parameter(torch.randn(5000))
    >>> opt = pagedopt.LAMB8bit([w])
    >>> w.grad = torch.randn(5000); opt.step()
    >>> sd = bitsandbytes_state_dict(opt, "0.50")
    >>> sd["state"][0]["__bnb_optimizer_quant_state__"]["absmax1"].shape  # per block for 0.50
    torch.Size([20])
    >>> sorted(k for k in bitsandbytes_state_dict(opt, "0.49")["state"][0] if "max" in k)
    ['max1', 'max2', 'new_max1', 'new_max2']
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..functional.qmap import dynamic_map, is_canonical_map
from ..functional.quantization import dequantize, num_blocks, quantize

QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
VERSIONS = ("0.49", "0.50")
# bitsandbytes' maps: state1 always "dynamic" (signed), state2 "udynamic" (unsigned)
BNB_SIGNED = {1: True, 2: False}


def normalize_param_state(value: Mapping[str, Any]) -> dict[str, Any]:
    """One parameter's state from any bitsandbytes/pagedopt layout as flat pagedopt keys:
    the 0.50 nesting undone, 0.49's ``max1``/``max2`` renamed ``absmax1``/``absmax2``,
    ``new_max*`` dropped (bitsandbytes' swap buffers), a tensor ``step`` made an int.

    Example:
        >>> import torch
        >>> from pagedopt.optim.interop import normalize_param_state
        >>> s = normalize_param_state({"step": torch.tensor(3.0), "max1": torch.ones(1), "new_max1": torch.ones(1)})
        >>> sorted(s), s["step"]
        (['absmax1', 'step'], 3)
    """
    out = dict(value)
    out.update(out.pop(QUANT_STATE_KEY, None) or {})
    for index in (1, 2):
        if f"max{index}" in out and f"absmax{index}" not in out:
            out[f"absmax{index}"] = out.pop(f"max{index}")
        out.pop(f"max{index}", None)
        out.pop(f"new_max{index}", None)
    if isinstance(out.get("step"), torch.Tensor):
        out["step"] = int(out["step"].item())
    return out


def _reencode(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor | None, signed_now: bool,
              moments: int, signed: bool, block_wise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes + scales of one 8-bit state re-encoded on the ``signed`` map and layout."""
    per_moment = codes.reshape(moments, -1)
    numel = per_moment.shape[1]
    scales = absmax.reshape(moments, -1)
    saved_block_wise = scales.shape[1] == num_blocks(numel, True)
    same_map = is_canonical_map(qmap, signed) if qmap is not None else signed_now == signed
    if same_map and (saved_block_wise == block_wise or num_blocks(numel, True) == 1):
        if saved_block_wise != block_wise:  # one block: the two layouts hold the same number
            scales = scales.reshape(moments, 1)
        return codes, scales
    decode_map = qmap if qmap is not None else dynamic_map(signed_now, codes.device)
    new_codes, new_scales = [], []
    for c, a in zip(per_moment, scales):
        values = dequantize(c, a, qmap=decode_map, block_wise=saved_block_wise)
        q, m = quantize(values, signed=signed, block_wise=block_wise)
        new_codes.append(q)
        new_scales.append(m)
    return torch.stack(new_codes).reshape(codes.shape), torch.stack(new_scales)


def _export_param(optimizer: Any, value: Mapping[str, Any], config: Mapping[str, Any], version: str) -> dict[str, Any]:
    kind = optimizer.kind
    state = normalize_param_state(value)
    for index in (1, 2):
        codes = state.get(f"state{index}")
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
            continue
        moments = kind.state1_moments if index == 1 else 1
        signed = BNB_SIGNED[index]
        block_wise = True if version == "0.50" else bool(config.get("block_wise", True))
        new_codes, scales = _reencode(codes, state.pop(f"absmax{index}"), state.get(f"qmap{index}"),
                                      kind.state_signed[index - 1], moments, signed, block_wise)
        state[f"state{index}"] = new_codes
        state[f"qmap{index}"] = dynamic_map(signed, codes.device)
        if block_wise:
            state[f"absmax{index}"] = scales if moments > 1 else scales.reshape(-1)
        else:
            state[f"max{index}"] = scales.reshape(1).clone()
            state[f"new_max{index}"] = torch.zeros(1, dtype=torch.float32, device=codes.device)
    device = next((v.device for v in state.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    if config.get("max_unorm", 0.0) > 0.0 and "unorm_vec" not in state:
        state["unorm_vec"] = torch.zeros(1, dtype=torch.float32, device=device)
    if version == "0.49" and config.get("percentile_clipping", 100) < 100 and "gnorm_vec" not in state:
        state["gnorm_vec"] = torch.zeros(100, dtype=torch.float32, device=device)
    if version == "0.50":
        nested = {k: state.pop(k) for k in list(state) if k != "step" and isinstance(state[k], torch.Tensor)}
        if nested:
            state[QUANT_STATE_KEY] = nested
    return state


def bitsandbytes_state_dict(optimizer: Any, version: str = "0.50") -> dict[str, Any]:
    """``optimizer``'s state dict in the layout bitsandbytes ``version`` (``"0.49"`` or
    ``"0.50"``) loads into the same class; see the module docstring for what changes.
    Parameters sharded with FSDP2 (DTensor) are not supported: gather first.

    Example:
        >>> import torch, pagedopt
        >>> w = torch.nn.Parameter(torch.randn(4096))
        >>> opt = pagedopt.RMSprop8bit([w])
        >>> w.grad = torch.randn(4096); opt.step()
        >>> sd = bitsandbytes_state_dict(opt, "0.49")
        >>> bool(sd["state"][0]["qmap1"].min() < 0)  # bitsandbytes' signed map for state1
        True
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS} (the bitsandbytes state layouts), got {version!r}")
    if getattr(optimizer, "kind", None) is None:
        raise ValueError(f"bitsandbytes_state_dict needs a pagedopt 8-bit optimizer, got {type(optimizer).__name__}")
    sd = optimizer.state_dict()
    index_of = {}
    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, _ in enumerate(group["params"]):
            index_of[len(index_of)] = (gindex, pindex, group)
    out_state = {}
    for key, value in sd["state"].items():
        if not isinstance(value, Mapping) or key not in index_of:
            out_state[key] = value
            continue
        if any(type(v).__name__ == "DTensor" for v in value.values()):
            raise ValueError(f"parameter {key} is sharded (DTensor state); gather the full state before exporting")
        gindex, pindex, group = index_of[key]
        out_state[key] = _export_param(optimizer, value, optimizer.get_config(gindex, pindex, group), version)
    groups = [{k: v for k, v in g.items() if k not in ("paging",)} for g in sd["param_groups"]]
    return {"state": out_state, "param_groups": groups}

