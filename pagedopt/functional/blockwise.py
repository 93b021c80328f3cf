"""bitsandbytes' blockwise quantization functions: ``quantize_blockwise``,
``dequantize_blockwise``, ``create_dynamic_map``, ``create_linear_map`` and ``QuantState``.

Arguments, defaults and return values follow bitsandbytes 0.49 (``blocksize`` defaults to
4096 there too; the optimizers use 256). The rule is bitsandbytes': ``absmax`` is the
largest magnitude of each block, each element gets the code of ``code`` nearest to
``x / absmax`` (clamped to [-1, 1]). The optimizers' own requantization
(:mod:`pagedopt.functional.quantization`) adds two guards this public function does not
apply - a nonzero value never gets the zero code or a code of the other sign, and negative
extremes land on the lowest signed code - so codes equal bitsandbytes' except at exact ties.

Example:
    >>> import torch
    >>> from pagedopt.functional import quantize_blockwise, dequantize_blockwise
    >>> x = torch.randn(1000)
    >>> codes, state = quantize_blockwise(x, blocksize=256)
    >>> codes.dtype, codes.shape, state.absmax.shape, state.blocksize
    (torch.uint8, torch.Size([1000]), torch.Size([4]), 256)
    >>> y = dequantize_blockwise(codes, state)
    >>> y.dtype, bool((y - x).abs().max() <= 0.1 * x.abs().max())
    (torch.float32, True)
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from .qmap import dynamic_map

Tensor = torch.Tensor


class QuantState:
    """What :func:`quantize_blockwise` returns and :func:`dequantize_blockwise` accepts -
    bitsandbytes' ``QuantState`` fields for 8-bit blockwise quantization.

    Attributes: ``absmax`` (float32 per block, or its 8-bit codes when ``nested``), ``code``
    (the 256-entry map), ``blocksize``, ``dtype`` (of the quantized input), ``shape``,
    ``quant_type``, ``offset`` and ``state2`` (the absmax's own state when ``nested``).

    Example:
        >>> import torch
        >>> from pagedopt.functional import quantize_blockwise
        >>> _, state = quantize_blockwise(torch.randn(8192), nested=True)
        >>> state.nested, state.state2.blocksize, state.absmax.dtype
        (True, 4096, torch.uint8)
    """

    def __init__(
        self,
        absmax: Tensor,
        shape: Any = None,
        code: Optional[Tensor] = None,
        blocksize: Optional[int] = None,
        quant_type: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        offset: Optional[Tensor] = None,
        state2: Optional["QuantState"] = None,
    ):
        self.absmax = absmax
        self.shape = shape
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    def __getitem__(self, idx: int) -> Any:
        """bitsandbytes' old list form: ``[absmax, shape, dtype, blocksize, nested part, quant_type]``."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    def to(self, device: torch.device | str) -> "QuantState":
        """Move the tensors to ``device`` in place (as bitsandbytes does); returns ``self``."""
        self.code = self.code.to(device) if self.code is not None else None
        self.absmax = self.absmax.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        def same(a: Any, b: Any) -> bool:
            if isinstance(a, Tensor) or isinstance(b, Tensor):
                return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b.to(a.device))
            return a == b
        return all(same(getattr(self, k), getattr(other, k)) for k in
                   ("absmax", "shape", "code", "dtype", "blocksize", "quant_type", "offset", "state2"))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"QuantState(blocksize={self.blocksize}, dtype={self.dtype}, absmax={tuple(self.absmax.shape)}, "
                f"nested={self.nested})")


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """The dynamic ("dynamic tree") quantization map, sorted - bitsandbytes'
    ``create_dynamic_map``.

    With the defaults it is the map pagedopt's 8-bit optimizers use
    (:func:`pagedopt.functional.qmap.dynamic_map`). Level ``i`` of ``max_exponent_bits``
    holds the midpoints of ``linspace(0.1, 1, k + 1)`` times ``10**(i - max_exponent_bits + 1)``
    with ``k = 2**(i + total_bits - 1 - max_exponent_bits)`` values per sign (twice that when
    unsigned); spare bits add ``2**(total_bits - 1 - max_exponent_bits) - 1`` values at the
    last level; then 0 and 1.0, and zeros pad the map to 256 entries.

    Example:
        >>> from pagedopt.functional import create_dynamic_map
        >>> m = create_dynamic_map(signed=False)
        >>> m.shape, float(m[0]), float(m[-1])
        (torch.Size([256]), 0.0, 1.0)
    """
    for name, value in (("max_exponent_bits", max_exponent_bits), ("total_bits", total_bits)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"create_dynamic_map: {name} must be a positive int, got {value!r}")
    if not 1 <= max_exponent_bits <= total_bits - 1 or total_bits > 8:
        raise ValueError(
            f"create_dynamic_map: need 1 <= max_exponent_bits <= total_bits - 1 and total_bits <= 8, "
            f"got max_exponent_bits={max_exponent_bits}, total_bits={total_bits}"
        )
    if (max_exponent_bits, total_bits) == (7, 8):
        return dynamic_map(bool(signed))
    return _general_dynamic_map(bool(signed), max_exponent_bits, total_bits).clone()


@functools.lru_cache(maxsize=None)
def _general_dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int) -> Tensor:
    fraction_bits = total_bits - 1 - max_exponent_bits

    def level(i: int, count: int) -> list[float]:
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32)
        mids = (10.0 ** (i - max_exponent_bits + 1)) * ((edges[:-1] + edges[1:]) / 2.0)
        return mids.tolist() + ((-mids).tolist() if signed else [])

    values: list[float] = []
    for i in range(max_exponent_bits):
        values += level(i, 2 ** (i + fraction_bits + (0 if signed else 1)))
    spare = 2**fraction_bits - 1
    if spare > 0:
        values += level(max_exponent_bits - 1, spare)
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> Tensor:
    """``2**total_bits`` evenly spaced values over [-1, 1] (``signed``) or [0, 1] - bitsandbytes'
    ``create_linear_map``. A signed map with ``add_zero`` (or fewer than 8 bits) has one value
    less so that 0 is one of them; a map shorter than 256 gets zeros in its middle.

    Example:
        >>> from pagedopt.functional import create_linear_map
        >>> m = create_linear_map(signed=True, total_bits=2)
        >>> m.shape, m[:2].tolist(), m[-2:].tolist()
        (torch.Size([256]), [-1.0, 0.0], [0.0, 1.0])
    """
    count = 2**total_bits
    if signed and (add_zero or total_bits < 8):
        count -= 1
    values = torch.linspace(-1.0 if signed else 0.0, 1.0, count)
    gap = 256 - values.numel()
    if gap <= 0:
        return values
    half = values.numel() // 2
    return torch.cat([values[:half], values.new_zeros(gap), values[half:]])


def _check_blocksize(blocksize: Any) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int (bitsandbytes uses 64..4096), got {blocksize!r}")
    return blocksize


def _blocks(flat: Tensor, blocksize: int) -> Tensor:
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, blocksize)


def _nearest_codes(scaled: Tensor, code: Tensor) -> Tensor:
    """Index of the entry of ``code`` nearest to each value (the lowest index among equal
    entries), by binary search over the sorted map's midpoints."""
    sorted_code, order = torch.sort(code.float(), stable=True)
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2.0
    position = torch.searchsorted(mids, scaled.contiguous(), right=False)
    # a run of equal entries: move to its first element (the lowest original index)
    first = torch.searchsorted(sorted_code, sorted_code, right=False)
    return order[first[position]]


def quantize_blockwise(
    A: Tensor,
    code: Optional[Tensor] = None,
    absmax: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[Tensor, QuantState]:
    """Quantize ``A`` (float32/16, bfloat16) in blocks of ``blocksize`` to uint8 codes of
    ``code`` (default: the signed dynamic map); returns ``(codes shaped like A, QuantState)``.

    ``absmax``/``out``: tensors to copy the scales / codes into (bitsandbytes' in-place
    form). ``nested=True`` quantizes the scales too, minus their mean (``state.offset``).

    Example:
        >>> import torch
        >>> from pagedopt.functional import quantize_blockwise
        >>> codes, state = quantize_blockwise(torch.tensor([0.5, -1.0, 0.0, 2.0]), blocksize=2)
        >>> state.absmax
        tensor([1., 2.])
        >>> state.code[codes.long()] * state.absmax.repeat_interleave(2)
        tensor([ 0.5008, -0.9930,  0.0000,  2.0000])
    """
    if not isinstance(A, Tensor) or not A.is_floating_point():
        raise ValueError(f"quantize_blockwise: A must be a float16/bfloat16/float32 tensor, got {getattr(A, 'dtype', type(A))}")
    blocksize = _check_blocksize(blocksize)
    if code is None:
        code = dynamic_map(True, A.device)
    flat = A.detach().reshape(-1).float()
    blocks = _blocks(flat, blocksize)
    scales = blocks.abs().amax(dim=1) if flat.numel() else flat.new_zeros(0)
    inverse = torch.where(scales > 0, 1.0 / torch.where(scales > 0, scales, 1.0), 0.0)
    scaled = torch.clamp(blocks * inverse[:, None], -1.0, 1.0).reshape(-1)[: flat.numel()]
    codes = _nearest_codes(scaled, code.to(A.device)).to(torch.uint8).reshape(A.shape)
    state_code = code.to(A.device, copy=True)
    if nested:
        offset = scales.mean()
        inner_codes, inner_state = quantize_blockwise(scales - offset, blocksize=blocksize, nested=False)
        state = QuantState(absmax=inner_codes, code=state_code, blocksize=blocksize, dtype=A.dtype,
                           offset=offset, state2=inner_state)
    else:
        state = QuantState(absmax=scales, code=state_code, blocksize=blocksize, dtype=A.dtype)
    if out is not None:
        codes = out.copy_(codes)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return codes, state


def dequantize_blockwise(
    A: Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[Tensor] = None,
    code: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> Tensor:
    """``code[A] * absmax`` per block of ``blocksize``, as ``quant_state.dtype`` (float32 when
    only ``absmax`` is given), shaped like ``A``.

    Pass the ``QuantState`` from :func:`quantize_blockwise`, or ``absmax`` (and optionally
    ``code`` and ``blocksize``) - which is how an 8-bit optimizer state is decoded:
    ``dequantize_blockwise(state["state1"], absmax=state["absmax1"], code=state["qmap1"],
    blocksize=256)``; a single scale covers the whole tensor (tensor-wise state, where
    bitsandbytes 0.49 names it ``max1``). ``nested`` is read from ``quant_state``.

    Example:
        >>> import torch
        >>> from pagedopt.functional import dequantize_blockwise, create_dynamic_map
        >>> codes = torch.tensor([255, 127, 0], dtype=torch.uint8)
        >>> dequantize_blockwise(codes, absmax=torch.tensor([2.0]), blocksize=256)
        tensor([ 2.0000,  0.0000, -1.9859])
    """
    if not isinstance(A, Tensor) or A.dtype != torch.uint8:
        raise ValueError(f"dequantize_blockwise: A must be a uint8 tensor of codes, got {getattr(A, 'dtype', type(A))}")
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state= or absmax=")
        quant_state = QuantState(absmax=absmax, code=code if code is not None else dynamic_map(True, A.device),
                                 blocksize=_check_blocksize(blocksize), dtype=torch.float32)
    scales = quant_state.absmax
    if quant_state.nested:
        scales = dequantize_blockwise(quant_state.absmax, quant_state.state2).float() + quant_state.offset
    size = _check_blocksize(quant_state.blocksize)
    n = A.numel()
    if scales.numel() == 1 and n > size:
        size = n  # one scale for the whole tensor: pagedopt's tensor-wise state (LAMB/LARS ``absmax1``)
    needed = -(-n // size) if n else 0
    if scales.numel() < needed:
        raise ValueError(
            f"dequantize_blockwise: absmax has {scales.numel()} entries, {n} codes in blocks of {size} need {needed}"
        )
    values = quant_state.code.float().to(A.device)[A.reshape(-1).long()]
    per_block = _blocks(values, size) * scales.float().to(A.device).reshape(-1)[:needed, None]
    result = per_block.reshape(-1)[:n].reshape(A.shape).to(quant_state.dtype or torch.float32)
    if out is not None:
        return out.copy_(result)
    return result
