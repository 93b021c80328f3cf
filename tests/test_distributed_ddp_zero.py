"""DDP and ``torch.distributed.optim.ZeroRedundancyOptimizer`` with pagedopt optimizers.

Two gloo ranks, every rank on the whole batch: DDP's averaged gradient equals the
single-process gradient bit for bit, and parameters are not sharded (8-bit blocks are the
single-process blocks), so the tier is exact. ZeRO partitions whole parameters over the ranks;
each rank steps its pagedopt optimizer on its partition and broadcasts the result. Its state
dict is consolidated on rank 0, saved, and loaded into a fresh ZeRO optimizer, which
continues bit-identically.
"""

from __future__ import annotations

import os

import pytest
import torch

import pagedopt
from dist_helpers import STEPS, full_params, make_model, make_optimizer, single_thread, spawn, train_steps

pytestmark = pytest.mark.distributed

RUNS = {
    "adamw8bit": ("AdamW8bit", dict(lr=1e-2, percentile_clipping=90)),
    "lion8bit": ("Lion8bit", dict(lr=1e-3)),
}
HALF = STEPS // 2


def _ddp_worker(rank: int, world_size: int, workdir: str) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for run, (name, kwargs) in RUNS.items():
        model = DistributedDataParallel(make_model())
        train_steps(model, make_optimizer(name, model.parameters(), **kwargs), 0, STEPS)
        out[f"ddp-{run}"] = full_params(model)

        model = DistributedDataParallel(make_model())
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=getattr(pagedopt, name), **kwargs)
        owned = sum(p.numel() for g in zero.optim.param_groups for p in g["params"])
        train_steps(model, zero, 0, HALF)
        zero.consolidate_state_dict(to=0)
        path = os.path.join(workdir, f"zero-{run}.pt")
        if rank == 0:
            torch.save({"model": model.module.state_dict(), "optim": zero.state_dict()}, path)
        torch.distributed.barrier()

        # A fresh job: new model and ZeRO optimizer, restored from the consolidated file.
        saved = torch.load(path, weights_only=True)
        model = DistributedDataParallel(make_model(seed=123))
        model.module.load_state_dict(saved["model"])
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=getattr(pagedopt, name), **kwargs)
        zero.load_state_dict(saved["optim"])
        train_steps(model, zero, HALF, STEPS)
        out[f"zero-{run}"] = full_params(model)
        out[f"zero-{run}-owned"] = owned
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn(_ddp_worker, 2, tmp_path_factory.mktemp("ddp"))


def _single(run: str) -> dict:
    name, kwargs = RUNS[run]
    with single_thread():
        model = make_model()
        train_steps(model, make_optimizer(name, model.parameters(), **kwargs), 0, STEPS)
    return full_params(model)


@pytest.mark.parametrize("wrapper", ["ddp", "zero"])
@pytest.mark.parametrize("run", sorted(RUNS))
def test_matches_single_process(results, wrapper, run):
    """Tier: exact (same gradients, same blocks, element-wise math). For ZeRO this includes a
    consolidate -> torch.save -> load_state_dict round trip half-way."""
    ref = _single(run)
    for rank, result in enumerate(results):
        got = result[f"{wrapper}-{run}"]
        for key, value in ref.items():
            assert torch.equal(got[key], value), f"{wrapper} rank {rank}: {key} differs"


def test_zero_partitions_the_parameters(results):
    """Each rank's pagedopt optimizer holds only its partition (together: every parameter)."""
    total = sum(p.numel() for p in make_model().parameters())
    owned = [r["zero-adamw8bit-owned"] for r in results]
    assert all(0 < n < total for n in owned)
    assert sum(owned) == total
