"""Helpers for the multi-process torch.distributed tests (gloo on CPU).

:func:`spawn` starts ``world_size`` processes with ``torch.multiprocessing.spawn``; each joins
a gloo process group through a file store in the test's temporary directory (no TCP port to
collide with other test runs), runs ``fn(rank, world_size, workdir, *args)`` and saves its
return value, which :func:`spawn` returns as a list (one entry per rank).

Every process, the parent's reference runs included (:func:`single_thread`), computes with
one intra-op thread, so a matmul gives bit-identical results in the workers and in the parent.

Example::

    results = spawn(train_fsdp, 2, tmp_path, "AdamW8bit")
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pagedopt
from pagedopt.distributed import settle_collective_threads

STEPS = 20
LOSS_SCALE = 1.0
BATCH = 8


def _entry(rank: int, fn: Callable, world_size: int, workdir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/pg-store", rank=rank, world_size=world_size
    )
    try:
        result = fn(rank, world_size, workdir, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        settle_collective_threads()  # a torch/gloo exit race: docs/distributed.md, "Exiting"
    torch.save(result, os.path.join(workdir, f"result-rank{rank}.pt"))


def spawn(fn: Callable, world_size: int, workdir: Path, *args: Any) -> list[Any]:
    """Run ``fn`` on ``world_size`` gloo ranks; returns each rank's result."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in workdir.glob("pg-store*"):
        stale.unlink()
    mp.spawn(_entry, args=(fn, world_size, str(workdir), args), nprocs=world_size, join=True)
    return [
        torch.load(workdir / f"result-rank{r}.pt", weights_only=False) for r in range(world_size)
    ]


@contextlib.contextmanager
def single_thread():
    """Compute with one intra-op thread (as the workers do), restoring the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TinyNet(torch.nn.Module):
    """Three layers whose weights cover the sharding cases on 2 and 3 ranks.

    * ``l1.weight`` [33, 256]: rows of 256 elements, 33 rows split unevenly (17/16, 11/11/11):
      8-bit state whose blocks stay global blocks (exact checkpoint layout).
    * ``l2.weight`` [129, 33]: 4257 >= min_8bit_size (4096) elements, but every shard is
      smaller (65 x 33 = 2145 on 2 ranks); shards of a size that is not a multiple of 256,
      uneven: 8-bit state on blocks that differ from the single-process blocks.
    * ``l3.weight`` [1, 129]: one row, so every rank but the first holds an empty shard.
    * biases: 32-bit state (below ``min_8bit_size``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(256, 33)
        self.l2 = torch.nn.Linear(33, 129)
        self.l3 = torch.nn.Linear(129, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def batch(step: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The same full batch on every rank (so data-parallel gradients equal the single-process
    ones bit for bit: the average of equal values is exact)."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    x = torch.randn(BATCH, 256, generator=g)
    y = torch.randn(BATCH, 1, generator=g)
    return x, y


def train_steps(model: torch.nn.Module, opt: Any, first: int, last: int) -> list[float]:
    """Steps ``first..last-1`` of the fixed data stream; returns the losses."""
    losses = []
    for step in range(first, last):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        (loss * LOSS_SCALE).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def make_optimizer(name: str, params: Any, **kwargs: Any) -> Any:
    return getattr(pagedopt, name)(params, **kwargs)


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters as full (gathered) float32 CPU tensors, by name."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name.replace("module.", "")] = t.float().cpu().clone()
    return out
