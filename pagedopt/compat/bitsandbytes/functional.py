"""``bitsandbytes.functional``'s 8-bit optimizer functions (see :mod:`pagedopt.functional`).

Example:
    >>> import torch
    >>> from pagedopt.compat.bitsandbytes import functional as F
    >>> codes, state = F.quantize_blockwise(torch.randn(300), blocksize=256)
    >>> F.dequantize_blockwise(codes, state).shape
    torch.Size([300])
"""

from ...functional import (  # noqa: F401
    QuantState, create_dynamic_map, create_linear_map, dequantize_blockwise, optimizer_update_8bit,
    optimizer_update_8bit_blockwise, optimizer_update_32bit, percentile_clipping, quantize_blockwise,
)
from ...functional import __all__  # noqa: F401
