"""Block-wise and tensor-wise 8-bit quantization with the dynamic maps (pure torch).

This module is the reference for the quantization rules every backend implements:

* **Blocks.** The flattened tensor is cut into blocks of ``BLOCK_SIZE`` (256) elements; the
  last block may be partial. Each block has one float32 scale, ``absmax`` (the bitsandbytes
  name). ``block_wise=False`` means a single block spanning the whole tensor.
* **Scale.** Unsigned map: ``absmax = max(x)``. Signed map: the map has no -1.0 (its lowest
  code is -0.99297), so a block whose largest magnitude is negative would lose 0.7% on that
  element at *every* requantization - a bias that compounds through the EMA (bitsandbytes has
  it). pagedopt scales negative values by ``NEGATIVE_WEIGHT = 1 / 0.99297`` when taking the
  maximum, so the negative extreme lands exactly on the lowest code and the positive extreme
  on 1.0: ``absmax = max(max(x, 0), max(-x) * NEGATIVE_WEIGHT)``. Dequantization is unchanged
  (``qmap[code] * absmax``), so state dicts stay compatible with bitsandbytes.
* **Normalization.** ``x * inv_absmax`` in float32, with ``inv_absmax = f32(1 / absmax)``
  computed once per block (the kernels multiply instead of dividing every element). A block
  whose absmax is 0 (or NaN) normalizes to 0. The reciprocal is used only when it is a normal
  float32, i.e. for ``2**-126 <= absmax <= 2**126``; blocks with a subnormal absmax (whose
  reciprocal may overflow) or a huge/infinite one (whose reciprocal would be subnormal and lose
  bits) divide, ``x / absmax``, as before. In the reciprocal range ``|x * inv_absmax| <= 1``
  for ``|x| <= absmax`` (``f32(a * f32(1 / a)) <= 1`` holds for every such float32 ``a``; the
  test suite checks all of them); the code search would clamp larger values anyway.
* **Code search.** ``code = #{thresholds < x}`` over :func:`~pagedopt.functional.qmap.decision_thresholds`
  (values above 1 get the top code, values below the lowest code the bottom one).
* **No collapse, no sign flip.** A nonzero value never gets the zero code and never a code
  of the opposite sign: a positive value that rounds to 0 (or below) takes the smallest
  positive code, a negative one the largest negative code. The paper's rule is about first
  moments; pagedopt applies it to second moments too, because a second moment that collapses
  to 0 turns ``m / (sqrt(v) + eps)`` into ``m / eps`` - a spike of up to 1e8 x.
* **Dequantization.** ``qmap[code] * absmax`` in float32.

Example:
    >>> import torch
    >>> from pagedopt.functional.quantization import quantize, dequantize
    >>> x = torch.randn(1000)
    >>> codes, absmax = quantize(x, signed=True)
    >>> codes.dtype, absmax.shape
    (torch.uint8, torch.Size([4]))
    >>> bool((dequantize(codes, absmax, signed=True) - x).abs().max() < 0.1)
    True
"""

from __future__ import annotations

import torch

from .qmap import SIGNED_ZERO_CODE, decision_thresholds, dynamic_map
from .scalars import f32

BLOCK_SIZE = 256
# absmax range in which blocks normalize with the float32 reciprocal (it is a normal float there)
RECIPROCAL_MIN = 2.0**-126
RECIPROCAL_MAX = 2.0**126
# float32(1 / |lowest signed code|): weight of negative values in the signed block scale.
NEGATIVE_WEIGHT = f32(1.0 / -float(dynamic_map(True)[0]))


def num_blocks(numel: int, block_wise: bool = True) -> int:
    """Number of absmax entries for a tensor of ``numel`` elements (0 elements -> 0 blocks)."""
    if not block_wise:
        return 1
    return (numel + BLOCK_SIZE - 1) // BLOCK_SIZE


def _as_blocks(flat: torch.Tensor, block_wise: bool) -> tuple[torch.Tensor, int]:
    """View ``flat`` as [blocks, block_len] after zero padding; returns (blocks, pad)."""
    n = flat.numel()
    if not block_wise:
        return flat.reshape(1, n), 0
    pad = (-n) % BLOCK_SIZE
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, BLOCK_SIZE), pad


def scale_weight(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """What the block scale is the maximum of: ``x`` (unsigned) or ``x >= 0 ? x : -x * NEGATIVE_WEIGHT``."""
    x = x.float()
    if not signed:
        return x.abs()
    return torch.where(x >= 0, x, -x * NEGATIVE_WEIGHT)


def block_absmax(x: torch.Tensor, signed: bool, block_wise: bool = True) -> torch.Tensor:
    """float32 scale per block of the flattened ``x`` (a maximum: exact, order independent)."""
    flat = x.reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(num_blocks(0, block_wise), dtype=torch.float32, device=x.device)
    blocks, _ = _as_blocks(scale_weight(flat, signed), block_wise)
    return blocks.amax(dim=1)


def expand_absmax(absmax: torch.Tensor, numel: int, block_wise: bool) -> torch.Tensor:
    """Per-element absmax for a flattened tensor of ``numel`` elements."""
    if not block_wise:
        return absmax.reshape(1).expand(numel)
    return absmax.repeat_interleave(BLOCK_SIZE)[:numel]


def codes_for(normalized: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 codes for float32 values already normalized to [-1, 1] (or [0, 1])."""
    thresholds = decision_thresholds(signed, normalized.device)
    codes = torch.searchsorted(thresholds, normalized.contiguous(), right=False)
    if signed:
        zero = SIGNED_ZERO_CODE
        codes = torch.where((normalized > 0) & (codes <= zero), zero + 1, codes)
        codes = torch.where((normalized < 0) & (codes >= zero), zero - 1, codes)
    else:
        codes = torch.where((normalized > 0) & (codes == 0), 1, codes)
    return codes.to(torch.uint8)


def uses_reciprocal(absmax: torch.Tensor) -> torch.Tensor:
    """Where a block normalizes by multiplying with ``f32(1 / absmax)``: its reciprocal is a
    normal float32 (``2**-126 <= absmax <= 2**126``). Elsewhere it divides (or gives 0)."""
    return (absmax >= RECIPROCAL_MIN) & (absmax <= RECIPROCAL_MAX)


def absmax_reciprocal(absmax: torch.Tensor) -> torch.Tensor:
    """``f32(1 / absmax)`` per block where :func:`uses_reciprocal`, else 0.

    Computed in float64 and rounded once, which equals the IEEE float32 division ``1.0f / a``
    the kernels perform: the exact ``1 / a`` of a float32 ``a`` is never within 2**-49
    (relative) of a float32 rounding boundary, far more than float64's 2**-53 error.
    """
    a = absmax.float()
    use = uses_reciprocal(a)
    inverse = (1.0 / torch.where(use, a, torch.ones_like(a)).double()).float()
    return torch.where(use, inverse, torch.zeros_like(a))


def normalize(x: torch.Tensor, absmax: torch.Tensor, block_wise: bool = True) -> torch.Tensor:
    """The flattened float32 ``x`` normalized by its block's scale (the module's rule)."""
    flat = x.reshape(-1).float()
    scale = expand_absmax(absmax.float(), flat.numel(), block_wise)
    inverse = expand_absmax(absmax_reciprocal(absmax), flat.numel(), block_wise)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    divided = torch.where(scale > 0, flat / safe, torch.zeros_like(flat))
    return torch.where(uses_reciprocal(scale), flat * inverse, divided)


def quantize_with_absmax(
    x: torch.Tensor, absmax: torch.Tensor, signed: bool, block_wise: bool = True
) -> torch.Tensor:
    """Codes of ``x`` (any shape) under the given per-block absmax; same shape as ``x``."""
    return codes_for(normalize(x, absmax, block_wise), signed).reshape(x.shape)


def quantize(
    x: torch.Tensor, signed: bool, block_wise: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to (uint8 codes shaped like ``x``, float32 absmax per block)."""
    absmax = block_absmax(x, signed, block_wise)
    return quantize_with_absmax(x, absmax, signed, block_wise), absmax


def dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    signed: bool | None = None,
    block_wise: bool = True,
    qmap: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 values ``qmap[codes] * absmax``, shaped like ``codes``.

    Pass ``qmap`` to decode with a stored map (e.g. a bitsandbytes state dict); otherwise
    the canonical map selected by ``signed`` is used.
    """
    if qmap is None:
        if signed is None:
            raise ValueError("dequantize needs either signed= or qmap=")
        qmap = dynamic_map(signed, codes.device)
    flat = qmap.float().to(codes.device)[codes.reshape(-1).long()]
    scale = expand_absmax(absmax.float().to(codes.device), flat.numel(), block_wise)
    return (flat * scale).reshape(codes.shape)
