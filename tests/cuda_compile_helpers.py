"""Helpers shared by the no-GPU CUDA backend tests (test_cuda_compile_kernels.py,
test_cuda_compile_planning.py, test_cuda_compile_backend.py): the repository root and a
small update item on CPU tensors that stand in for device memory."""

from __future__ import annotations

from pathlib import Path

import torch

from pagedopt.functional.items import UpdateItem
from pagedopt.functional.kinds import kind_for
from pagedopt.functional.quantization import num_blocks
from pagedopt.functional.scalars import step_scalars

REPO = Path(__file__).resolve().parent.parent


def _item(kind_name: str, n: int, dtype=torch.float32, quantized=True, block_wise=True, offset=0):
    kind = kind_for(kind_name)
    storage = torch.zeros(n + offset + 8, dtype=dtype)
    param = storage[offset : offset + n]
    grad = torch.ones(n, dtype=dtype)
    k1 = kind.state1_moments
    sdtype = torch.uint8 if quantized else torch.float32
    shape = (k1, n) if k1 > 1 else (n,)
    s1 = torch.zeros(shape, dtype=sdtype)
    s2 = torch.zeros(n, dtype=sdtype) if kind.num_states == 2 else None
    a1 = a2 = None
    if quantized:
        blocks = num_blocks(n, block_wise)
        a1 = torch.zeros((k1, blocks) if k1 > 1 else (blocks,), dtype=torch.float32)
        a2 = torch.zeros(blocks, dtype=torch.float32) if kind.num_states == 2 else None
    scalars = step_scalars(kind, {"lr": 1e-3, "betas": (0.9, 0.999, 0.9999), "eps": 1e-8, "weight_decay": 0.01}, 3)
    return kind, UpdateItem(param, grad, s1, s2, a1, a2, scalars, block_wise=block_wise)
