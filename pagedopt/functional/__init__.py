"""pagedopt's functional API - bitsandbytes 0.49's ``bitsandbytes.functional`` names for 8-bit
optimizers: blockwise quantization, the dynamic map, percentile clipping and the fused
update entry points.

The submodules are the implementation: :mod:`.qmap` (maps), :mod:`.quantization` (the
optimizers' requantization rules), :mod:`.clipping`, :mod:`.dispatch` (backend choice),
:mod:`.reference` (the pure-torch oracle); :mod:`.blockwise` and :mod:`.updates` give them
bitsandbytes' signatures.

Example:
    >>> import torch
    >>> import pagedopt.functional as F
    >>> x = torch.randn(4096)
    >>> codes, state = F.quantize_blockwise(x, blocksize=256)
    >>> bool((F.dequantize_blockwise(codes, state) - x).abs().max() < 0.05 * x.abs().max())
    True
"""

from .blockwise import (
    QuantState, create_dynamic_map, create_linear_map, dequantize_blockwise, quantize_blockwise,
)
from .updates import (
    optimizer_update_8bit, optimizer_update_8bit_blockwise, optimizer_update_32bit, percentile_clipping,
)

__all__ = [
    "QuantState", "create_dynamic_map", "create_linear_map", "quantize_blockwise", "dequantize_blockwise",
    "percentile_clipping", "optimizer_update_32bit", "optimizer_update_8bit", "optimizer_update_8bit_blockwise",
]
