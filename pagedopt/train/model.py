"""A small decoder-only transformer language model (GPT-2 shape, pre-norm).

Token + learned position embeddings, ``layers`` pre-norm blocks (causal self-attention through
``torch.nn.functional.scaled_dot_product_attention``, then a GELU MLP), a final LayerNorm and
a linear head. The token embedding is a :class:`pagedopt.StableEmbedding` by default (the
8-bit optimizers paper's recommendation: its LayerNorm keeps embedding scales stable and its
weight keeps 32-bit optimizer state), or a plain ``nn.Embedding``.

Example:
    >>> import torch
    >>> from pagedopt.train.model import DecoderLM, ModelConfig
    >>> model = DecoderLM(ModelConfig(d_model=32, layers=2, heads=2, max_seq_len=16))
    >>> tokens = torch.randint(0, 256, (3, 16))
    >>> model(tokens).shape
    torch.Size([3, 16, 256])
    >>> import math  # at initialisation the loss is about ln(256): uniform over bytes
    >>> abs(model.loss(tokens, tokens).item() - math.log(256)) < 0.3
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import StableEmbedding


@dataclass(frozen=True)
class ModelConfig:
    """Shape of :class:`DecoderLM`.

    Args:
        vocab_size: token ids are ``0 .. vocab_size - 1`` (256: bytes).
        d_model: width of the residual stream.
        layers: transformer blocks.
        heads: attention heads (``d_model`` must be divisible by it).
        max_seq_len: longest input (size of the position embedding).
        mlp_ratio: MLP hidden width as a multiple of ``d_model``.
        stable_embedding: token embedding is a :class:`pagedopt.StableEmbedding`.
        tie_weights: the output head reuses the token embedding matrix.

    Example:
        >>> ModelConfig(d_model=64, heads=4).head_dim
        16
    """

    vocab_size: int = 256
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    max_seq_len: int = 128
    mlp_ratio: int = 4
    stable_embedding: bool = True
    tie_weights: bool = False

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection.

    Example:
        >>> attn = CausalSelfAttention(ModelConfig(d_model=32, heads=4))
        >>> attn(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        # (B, T, 3, H, D) -> three (B, H, T, D) tensors
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    """Position-wise feed-forward layer: ``down(gelu(up(x)))``.

    Example:
        >>> MLP(ModelConfig(d_model=32))(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``.

    Example:
        >>> Block(ModelConfig(d_model=32, heads=2))(torch.randn(1, 4, 32)).shape
        torch.Size([1, 4, 32])
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class DecoderLM(nn.Module):
    """Decoder-only transformer language model; ``forward(tokens)`` returns logits
    ``(batch, seq, vocab)``, :meth:`loss` the mean next-token cross-entropy (nats).

    Initialisation follows GPT-2: normal(0, 0.02) weights, zero biases, and the projections
    that write into the residual stream scaled by ``1/sqrt(2 * layers)`` so the stream's
    variance does not grow with depth.

    Example:
        >>> import torch
        >>> model = DecoderLM(ModelConfig(d_model=32, layers=1, heads=2, max_seq_len=8, tie_weights=True))
        >>> model.head.weight is model.token_embedding.weight
        True
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        embedding = StableEmbedding if cfg.stable_embedding else nn.Embedding
        self.token_embedding = embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_weights:
            self.head.weight = self.token_embedding.weight

    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.cfg.layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("attn.proj", "mlp.down")) else 0.02
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding) and not isinstance(module, StableEmbedding):
                # StableEmbedding keeps its own (Xavier-uniform) initialisation.
                nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        """Distinct parameter elements (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"input has {seq} tokens, more than max_seq_len={self.cfg.max_seq_len}")
        positions = torch.arange(seq, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(self, tokens, targets)


def lm_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats (float32 even under autocast). Takes the module
    to call so a compiled or data-parallel wrapper of :class:`DecoderLM` works too."""
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
