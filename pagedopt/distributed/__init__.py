"""pagedopt on torch.distributed: FSDP2 (DTensor) state, DDP, ZeRO, resharding checkpoints.

pagedopt optimizers work unchanged under ``DistributedDataParallel``,
``torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=pagedopt.AdamW8bit, ...)``
and FSDP2's ``fully_shard``. Under FSDP2 each rank updates its shards with shard-local
state; precision, clipping norms, trust ratios and tensor-wise scales stay global
(:mod:`~pagedopt.distributed.sharding`), and checkpoints reshard through DCP
(:mod:`~pagedopt.distributed.checkpoint`). For training scripts,
:mod:`~pagedopt.distributed.runtime` turns the torchrun environment into a process group
and wraps the model.

Example (run with ``torchrun --nproc-per-node 2 script.py``; on one process it runs as a
world of one)::

    import torch, pagedopt
    from pagedopt.distributed import init_distributed, save_checkpoint

    with init_distributed("fsdp") as run:
        model = run.wrap(MyTransformer())              # fully_shard blocks + root
        opt = pagedopt.AdamW8bit(model.parameters(), lr=1e-3, percentile_clipping=95)
        for step, (x, y) in enumerate(batches(seed=run.data_seed(0))):
            loss = model(x, y); loss.backward(); opt.step(); opt.zero_grad()
            if step % 50 == 0:
                run.print(f"step={step} loss={run.mean(loss):.4f}")
        save_checkpoint("ckpt/final", model, opt, extra={"step": step})
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .exit_guard import settle_collective_threads
from .runtime import MODES, DistributedRun, init_distributed, launched_by_torchrun
from .sharding import all_reduce_over_shards, is_sharded, requantization_bound

__all__ = [
    "MODES", "DistributedRun", "init_distributed", "launched_by_torchrun", "settle_collective_threads",
    "save_checkpoint", "load_checkpoint",
    "all_reduce_over_shards", "is_sharded", "requantization_bound",
]
