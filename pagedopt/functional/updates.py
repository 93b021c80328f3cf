"""bitsandbytes' fused optimizer entry points over pagedopt's backends:
``optimizer_update_32bit``, ``optimizer_update_8bit_blockwise``, ``optimizer_update_8bit``
(tensor-wise scales) and ``percentile_clipping``.

Arguments follow bitsandbytes 0.49. Each call builds one :class:`~.items.UpdateItem` and
runs it through :mod:`~.dispatch` (the native CPU/CUDA kernel, else the reference), so it
updates ``p`` and the states in place exactly as the optimizers do. ``gnorm_scale`` may be a
float or a 0-d tensor (what :func:`percentile_clipping` returns; no host sync).

Numerics are pagedopt's: ``"adam"`` adds weight decay to the gradient as ``torch.optim.Adam``
(bitsandbytes decays decoupled - pass ``"adamw"`` for that); 8-bit RMSprop/Adagrad states
use the *unsigned* map (bitsandbytes uses the signed one); a NaN/Inf gradient element leaves
its parameter and states unchanged; the trust ratio is 1 when ``||p|| == 0``.

Example:
    >>> import torch
    >>> from pagedopt.functional import create_dynamic_map, optimizer_update_8bit_blockwise
    >>> p, g = torch.zeros(300), torch.ones(300)
    >>> m, v = torch.zeros(300, dtype=torch.uint8) + 127, torch.zeros(300, dtype=torch.uint8)
    >>> a1, a2 = torch.zeros(2), torch.zeros(2)
    >>> optimizer_update_8bit_blockwise("adamw", g, p, m, v, 0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-3,
    ...     create_dynamic_map(True), create_dynamic_map(False), a1, a2)
    >>> round(float(p[0]), 6), [round(a, 6) for a in a1.tolist()]
    (-0.001, [0.1, 0.1])
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import dispatch
from .clipping import percentile_clip, trust_ratios
from .items import UpdateItem
from .kinds import UpdateKind, kind_for
from .qmap import is_canonical_map
from .quantization import num_blocks
from .scalars import step_scalars

Tensor = torch.Tensor
Scale = Union[float, Tensor]


def percentile_clipping(grad: Tensor, gnorm_vec: Tensor, step: int, percentile: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    """Record ``||grad||**2`` in the 100-entry history ``gnorm_vec`` (all of it at ``step``
    1, else entry ``step % 100``) and return ``(current_norm, clip_value, gnorm_scale)`` as
    0-d float32 tensors on the gradient's device; ``gnorm_scale = clip_value / current_norm``
    when the norm exceeds the ``percentile``-th smallest of the history, else 1 - bitsandbytes'
    ``percentile_clipping`` (which returns a float 1.0 instead of a tensor when it does not
    clip). Non-finite gradient elements do not count.

    Example:
        >>> import torch
        >>> from pagedopt.functional import percentile_clipping
        >>> hist = torch.zeros(100)
        >>> for step in range(1, 5):
        ...     norm, clip, scale = percentile_clipping(torch.full((4,), float(step)), hist, step, 5)
        >>> float(norm), float(clip), round(float(scale), 4)
        (8.0, 2.0, 0.25)
    """
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"percentile_clipping: step must be an int >= 1 (1-based, as the optimizers count), got {step!r}")
    if not isinstance(percentile, int) or not 0 <= percentile < 100:
        raise ValueError(f"percentile_clipping: percentile must be an int in [0, 100), got {percentile!r}")
    if gnorm_vec.numel() != 100 or gnorm_vec.dtype != torch.float32:
        raise ValueError(f"percentile_clipping: gnorm_vec must be float32 with 100 entries, got {gnorm_vec.dtype} {tuple(gnorm_vec.shape)}")
    (norm_sq,) = dispatch.grad_norm_sq([grad])
    result = percentile_clip([norm_sq], [gnorm_vec], [step], [percentile])
    return result.norms[0], result.thresholds[0], result.scales[0]


def _scale_tensor(value: Optional[Scale], device: torch.device) -> Optional[Tensor]:
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value.detach().reshape(()).to(device=device, dtype=torch.float32)
    if float(value) == 1.0:
        return None
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def _hyper(kind: UpdateKind, beta1: float, beta2: float, beta3: float, alpha: float, eps: float,
           weight_decay: float, lr: float) -> dict:
    betas = (beta1, beta2, beta3) if kind.state1_moments == 2 else (beta1, beta2)
    return {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "alpha": alpha}


def _check_states(kind: UpdateKind, p: Tensor, g: Tensor, state1: Tensor, state2: Optional[Tensor]) -> None:
    if g.shape != p.shape:
        raise ValueError(f"g has shape {tuple(g.shape)}, p has {tuple(p.shape)}; they must match")
    want1 = (kind.state1_moments, *p.shape) if kind.state1_moments > 1 else tuple(p.shape)
    if tuple(state1.shape) != want1 and state1.numel() != kind.state1_moments * p.numel():
        raise ValueError(f"state1 has shape {tuple(state1.shape)}; {kind.name} needs {want1}")
    if kind.num_states == 2 and (state2 is None or state2.numel() != p.numel()):
        raise ValueError(f"{kind.name} keeps two states: state2 must be a tensor of {p.numel()} elements")
    if kind.num_states == 1 and state2 is not None:
        raise ValueError(f"{kind.name} keeps one state: pass state2=None")


def _check_qmap(name: str, qmap: Optional[Tensor], signed: bool, kind: UpdateKind) -> None:
    if qmap is None:
        raise ValueError(f"{name} is required for 8-bit {kind.name} state")
    if not is_canonical_map(qmap, signed):
        which = "signed" if signed else "unsigned"
        raise ValueError(
            f"{name} is not the {which} dynamic map that pagedopt's {kind.name} kernels use for this state; "
            f"pass create_dynamic_map(signed={signed}) (re-encode existing codes with dequantize_blockwise/"
            "quantize_blockwise)"
        )


def _trust_ratio(kind: UpdateKind, item: UpdateItem, max_unorm: float, unorm_vec: Optional[Tensor]) -> None:
    if max_unorm <= 0.0:
        return
    (result,) = dispatch.prepare(kind, [item], want_norms=True)
    if unorm_vec is not None:
        unorm_vec.reshape(-1)[:1].copy_(result.unorm_sq.reshape(1))
    item.update_scale = trust_ratios([result.unorm_sq], [result.pnorm_sq], [max_unorm])[0]


def optimizer_update_32bit(
    optimizer_name: str,
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    beta1: float,
    eps: float,
    step: int,
    lr: float,
    state2: Optional[Tensor] = None,
    beta2: float = 0.0,
    beta3: float = 0.0,
    alpha: float = 0.0,
    weight_decay: float = 0.0,
    gnorm_scale: Scale = 1.0,
    unorm_vec: Optional[Tensor] = None,
    max_unorm: float = 0.0,
    skip_zeros: bool = False,
) -> None:
    """One in-place update of ``p`` and its float32 states at 1-based ``step`` - bitsandbytes'
    ``optimizer_update_32bit``. ``optimizer_name``: ``adam``, ``adamw``, ``ademamix``,
    ``lamb``, ``momentum``, ``lars``, ``lion``, ``rmsprop``, ``adagrad``. With ``max_unorm >
    0`` the update is scaled to ``||update|| <= max_unorm * ||p||`` (``unorm_vec[0]`` receives
    ``||update||**2``).

    Example:
        >>> import torch
        >>> from pagedopt.functional import optimizer_update_32bit
        >>> p, g, buf = torch.ones(3), torch.ones(3), torch.zeros(3)
        >>> optimizer_update_32bit("momentum", g, p, buf, 0.9, 0.0, 1, 0.1)
        >>> p, buf
        (tensor([0.9000, 0.9000, 0.9000]), tensor([1., 1., 1.]))
    """
    kind = kind_for(optimizer_name)
    _check_states(kind, p, g, state1, state2)
    if state1.dtype != torch.float32 or (state2 is not None and state2.dtype != torch.float32):
        raise ValueError("optimizer_update_32bit needs float32 state1/state2 (use optimizer_update_8bit_blockwise for uint8)")
    scalars = step_scalars(kind, _hyper(kind, beta1, beta2, beta3, alpha, eps, weight_decay, lr), step,
                           skip_zeros=skip_zeros)
    item = UpdateItem(p, g, state1, state2, None, None, scalars, gnorm_scale=_scale_tensor(gnorm_scale, p.device))
    with torch.no_grad():
        _trust_ratio(kind, item, max_unorm, unorm_vec)
        dispatch.update(kind, [item])


def optimizer_update_8bit_blockwise(
    optimizer_name: str,
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    state2: Optional[Tensor],
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    step: int,
    lr: float,
    qmap1: Tensor,
    qmap2: Optional[Tensor],
    absmax1: Tensor,
    absmax2: Optional[Tensor],
    weight_decay: float = 0.0,
    gnorm_scale: Scale = 1.0,
    skip_zeros: bool = False,
) -> None:
    """One in-place update with 8-bit states in blocks of 256 (``absmax1``/``absmax2``: one
    float32 scale per block; AdEMAMix ``state1``/``absmax1`` stack two moments) -
    bitsandbytes' ``optimizer_update_8bit_blockwise``. The states are dequantized, updated
    and requantized against their new block maxima in one pass. See the module docstring
    for the maps and the example."""
    kind = kind_for(optimizer_name)
    _check_states(kind, p, g, state1, state2)
    _check_8bit(kind, p, state1, state2, qmap1, qmap2, absmax1, absmax2, block_wise=True)
    scalars = step_scalars(kind, _hyper(kind, beta1, beta2, beta3, alpha, eps, weight_decay, lr), step,
                           skip_zeros=skip_zeros)
    item = UpdateItem(p, g, state1, state2, absmax1, absmax2, scalars, block_wise=True,
                      gnorm_scale=_scale_tensor(gnorm_scale, p.device))
    with torch.no_grad():
        dispatch.update(kind, [item])


def optimizer_update_8bit(
    optimizer_name: str,
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    state2: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    lr: float,
    qmap1: Tensor,
    qmap2: Optional[Tensor],
    max1: Tensor,
    max2: Optional[Tensor],
    new_max1: Tensor,
    new_max2: Optional[Tensor],
    weight_decay: float = 0.0,
    gnorm_scale: Scale = 1.0,
    unorm_vec: Optional[Tensor] = None,
    max_unorm: float = 0.0,
) -> None:
    """One in-place update with tensor-wise 8-bit states (one scale per tensor; LAMB/LARS's
    default) - bitsandbytes' ``optimizer_update_8bit``. The codes are decoded with ``max1``
    and re-encoded with the new maxima, written to ``new_max1``/``new_max2``; as in
    bitsandbytes the caller swaps ``max`` and ``new_max`` before the next step.

    Example:
        >>> import torch
        >>> from pagedopt.functional import create_dynamic_map, optimizer_update_8bit
        >>> p, g = torch.zeros(4), torch.tensor([1.0, -2.0, 0.5, 0.0])
        >>> buf, mx, new_mx = torch.full((4,), 127, dtype=torch.uint8), torch.zeros(1), torch.zeros(1)
        >>> optimizer_update_8bit("lion", g, p, buf, None, 0.9, 0.99, 0.0, 1, 0.1,
        ...     create_dynamic_map(True), None, mx, None, new_mx, None)
        >>> p, mx  # new_mx: max |m| (negative values weighted, see quantization)
        (tensor([-0.1000,  0.1000, -0.1000,  0.0000]), tensor([0.]))
        >>> round(float(new_mx), 4)
        0.0201
    """
    kind = kind_for(optimizer_name)
    if kind.state1_moments > 1:
        raise ValueError(f"optimizer_update_8bit does not support {kind.name}; use optimizer_update_8bit_blockwise")
    _check_states(kind, p, g, state1, state2)
    _check_8bit(kind, p, state1, state2, qmap1, qmap2, max1, max2, block_wise=False)
    scalars = step_scalars(kind, _hyper(kind, beta1, beta2, 0.0, 0.0, eps, weight_decay, lr), step)
    old = [max1.clone()] + ([max2.clone()] if kind.num_states == 2 else [])
    item = UpdateItem(p, g, state1, state2, max1, max2 if kind.num_states == 2 else None, scalars,
                      block_wise=False, gnorm_scale=_scale_tensor(gnorm_scale, p.device))
    with torch.no_grad():
        (prepared,) = dispatch.prepare(kind, [item], want_norms=max_unorm > 0.0)
        item.new_absmax1, item.new_absmax2 = prepared.max1, prepared.max2
        if max_unorm > 0.0:
            if unorm_vec is not None:
                unorm_vec.reshape(-1)[:1].copy_(prepared.unorm_sq.reshape(1))
            item.update_scale = trust_ratios([prepared.unorm_sq], [prepared.pnorm_sq], [max_unorm])[0]
        dispatch.update(kind, [item])
        # the kernels store the new maxima in place of the old ones; bitsandbytes keeps both
        new_max1.copy_(max1.reshape(new_max1.shape))
        max1.copy_(old[0])
        if kind.num_states == 2:
            new_max2.copy_(max2.reshape(new_max2.shape))
            max2.copy_(old[1])


def _check_8bit(kind: UpdateKind, p: Tensor, state1: Tensor, state2: Optional[Tensor], qmap1: Tensor,
                qmap2: Optional[Tensor], absmax1: Tensor, absmax2: Optional[Tensor], block_wise: bool) -> None:
    if state1.dtype != torch.uint8 or (state2 is not None and state2.dtype != torch.uint8):
        raise ValueError("8-bit updates need uint8 state1/state2 (use optimizer_update_32bit for float32 state)")
    _check_qmap("qmap1", qmap1, kind.state_signed[0], kind)
    blocks = num_blocks(p.numel(), block_wise) * kind.state1_moments
    names = ("absmax1", "absmax2") if block_wise else ("max1", "max2")
    if absmax1 is None or absmax1.numel() != blocks or absmax1.dtype != torch.float32:
        raise ValueError(f"{names[0]} must be float32 with {blocks} entries for {p.numel()} elements, "
                         f"got {None if absmax1 is None else (absmax1.dtype, tuple(absmax1.shape))}")
    if kind.num_states == 2:
        _check_qmap("qmap2", qmap2, kind.state_signed[1], kind)
        want = num_blocks(p.numel(), block_wise)
        if absmax2 is None or absmax2.numel() != want or absmax2.dtype != torch.float32:
            raise ValueError(f"{names[1]} must be float32 with {want} entries for {p.numel()} elements")
