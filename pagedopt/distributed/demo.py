"""A tiny data-parallel training job: the reference use of :mod:`pagedopt.distributed`.

It trains a small residual MLP language model (embedding, blocks in an ``nn.ModuleList``,
head) on a synthetic next-token task that is quick to learn, with any pagedopt optimizer,
under ``--distributed none|ddp|fsdp``, saving and resuming resharding DCP checkpoints. It is
what the launch scripts in ``deploy/`` can run before a real job, and what the tests start
under ``torchrun``; ``pagedopt train --distributed`` follows the same steps.

Example::

    torchrun --standalone --nproc-per-node 2 -m pagedopt.distributed.demo \\
        --distributed fsdp --steps 50 --checkpoint-dir /tmp/ckpt
    torchrun --standalone --nproc-per-node 3 -m pagedopt.distributed.demo \\
        --distributed fsdp --steps 80 --resume /tmp/ckpt/step-50

Rank 0 prints ``step=N loss=X`` lines and a last line
``done steps=N loss=X world_size=W mode=M state_bytes=B``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import torch

VOCAB = 64


class Block(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, 2 * dim)
        self.down = torch.nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class TinyLM(torch.nn.Module):
    """Embedding -> residual MLP blocks -> head; predicts ``(3 * token + 1) % VOCAB``."""

    def __init__(self, dim: int = 256, depth: int = 2) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, dim)
        self.blocks = torch.nn.ModuleList(Block(dim) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batch(generator: torch.Generator, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (size,), generator=generator)
    return tokens.to(device), ((3 * tokens + 1) % VOCAB).to(device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pagedopt.distributed.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--distributed", choices=("none", "ddp", "fsdp"), default="none")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (cuda:LOCAL_RANK under torchrun)")
    parser.add_argument("--optimizer", default="AdamW8bit", help="any pagedopt optimizer class name")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=30, help="train until this step")
    parser.add_argument("--batch", type=int, default=64, help="tokens per rank and step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--checkpoint-dir", help="save a DCP checkpoint here at the end (step-N/)")
    parser.add_argument("--resume", help="a checkpoint directory to continue from (any world size)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import pagedopt
    from pagedopt.distributed import init_distributed, load_checkpoint, save_checkpoint

    with init_distributed(args.distributed, device=args.device) as run:
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        model = run.wrap(TinyLM())
        optimizer = pagedopt.optim.get_optimizer_class(args.optimizer)(model.parameters(), lr=args.lr)
        start = 0
        if args.resume:
            start = int(load_checkpoint(args.resume, model, optimizer).get("step", 0))
            run.print(f"resumed from {args.resume} at step {start} (world_size={run.world_size})")
        generator = torch.Generator().manual_seed(run.data_seed(args.seed) + start)
        loss = torch.zeros(())
        for step in range(start + 1, args.steps + 1):
            tokens, targets = batch(generator, args.batch, run.device)
            loss = torch.nn.functional.cross_entropy(model(tokens), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % args.log_every == 0 or step == args.steps:
                run.print(f"step={step} loss={run.mean(loss.detach()):.4f}")
        final = run.mean(loss.detach())
        if args.checkpoint_dir:
            path = os.path.join(args.checkpoint_dir, f"step-{args.steps}")
            save_checkpoint(path, model, optimizer, extra={"step": args.steps})
            run.print(f"saved {path}")
        state_bytes = int(run.sum(optimizer.memory_report().total_bytes))
        run.print(
            f"done steps={args.steps} loss={final:.4f} world_size={run.world_size} "
            f"mode={run.mode} state_bytes={state_bytes}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
