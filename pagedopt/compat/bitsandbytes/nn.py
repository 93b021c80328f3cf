"""``bitsandbytes.nn``'s optimizer-related layers: ``StableEmbedding`` and ``Embedding``.

Example:
    >>> import torch
    >>> import pagedopt
    >>> from pagedopt.compat.bitsandbytes import nn
    >>> emb = nn.Embedding(10, 4)
    >>> pagedopt.GlobalOptimManager.get_instance().overrides_for(emb.weight)
    {'optim_bits': 32}
"""

from __future__ import annotations

import torch

from ...nn import StableEmbedding
from ...optim.manager import GlobalOptimManager

__all__ = ["StableEmbedding", "Embedding"]


class Embedding(torch.nn.Embedding):
    """``torch.nn.Embedding`` with Xavier-uniform initialisation whose weight keeps 32-bit
    optimizer state under 8-bit optimizers (bitsandbytes' ``nn.Embedding``; unlike
    :class:`StableEmbedding` it has no LayerNorm).

    Example:
        >>> import torch
        >>> from pagedopt.compat.bitsandbytes.nn import Embedding
        >>> Embedding(10, 4, padding_idx=0)(torch.tensor([0, 3])).shape
        torch.Size([2, 4])
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: torch.Tensor | None = None, device=None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                         sparse, _weight, device=device)
        GlobalOptimManager.get_instance().register_module_override(self, "weight", {"optim_bits": 32})

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()
