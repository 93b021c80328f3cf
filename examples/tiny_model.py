"""A small transformer-shaped model for trying configs: ``pagedopt config check
examples/config.yaml --model examples/tiny_model.py:build``.

Example:
    >>> model = build()
    >>> sorted(name for name, _ in model.named_parameters())[:3]
    ['blocks.0.attn.in_proj_bias', 'blocks.0.attn.in_proj_weight', 'blocks.0.attn.out_proj.bias']
"""

import torch

import pagedopt


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 4096, dim: int = 128, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = pagedopt.StableEmbedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build() -> TinyLM:
    return TinyLM()
