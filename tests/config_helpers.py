"""Helpers shared by the config-file tests (test_config_files.py, test_config_overrides.py,
test_config_cli.py): a small model with qualified parameter names, one training step, and
writing a dedented config file."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch


class Net(torch.nn.Module):
    """Names: emb.weight, blocks.{0,1}.attn.{weight,bias}, blocks.{0,1}.norm.{weight,bias},
    head.weight, head.bias."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(512, 32)  # 16384 elements
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"attn": torch.nn.Linear(32, 160), "norm": torch.nn.LayerNorm(32)}) for _ in range(2)
        )
        self.head = torch.nn.Linear(32, 512)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for block in self.blocks:
            x = block["norm"](x + block["attn"](x)[..., :32])
        return self.head(x)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    model(torch.randint(0, 512, (4, 8), generator=g)).pow(2).mean().backward()
    opt.step()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path
