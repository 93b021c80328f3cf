"""StableEmbedding: the 8-bit optimizers paper's embedding layer.

Dettmers et al. (2022), section 2.3: Xavier-uniform initialisation, a LayerNorm on the
embedding output (computed in float32), and 32-bit optimizer state for the embedding weight
even when the rest of the model uses 8-bit state - registered through
:class:`~pagedopt.GlobalOptimManager`, which holds the module weakly.

Example:
    >>> import torch, pagedopt
    >>> emb = pagedopt.StableEmbedding(1000, 64)
    >>> emb(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 64])
    >>> pagedopt.GlobalOptimManager.get_instance().overrides_for(emb.weight)
    {'optim_bits': 32}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .optim.manager import GlobalOptimManager


class StableEmbedding(torch.nn.Embedding):
    """``torch.nn.Embedding`` + LayerNorm, with 32-bit optimizer state for its weight.

    Takes the arguments of ``torch.nn.Embedding`` (``device``/``dtype`` included).

    Example:
        >>> import torch, pagedopt
        >>> emb = pagedopt.StableEmbedding(10, 4, padding_idx=0)
        >>> bool(emb(torch.tensor([0]))[0].abs().sum() == 0)
        True
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: torch.Tensor | None = None, device=None, dtype=None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                         sparse, _weight, device=device, dtype=dtype)
        self.norm = torch.nn.LayerNorm(embedding_dim, device=device)
        GlobalOptimManager.get_instance().register_module_override(self, "weight", {"optim_bits": 32})

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        emb = F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        # LayerNorm in float32 for stability; the output takes the weight's dtype again.
        out = self.norm(emb.float())
        if self.padding_idx is not None:
            out = out.masked_fill((input == self.padding_idx).unsqueeze(-1), 0.0)
        return out.to(self.weight.dtype)
