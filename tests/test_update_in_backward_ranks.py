"""Update in backward in a multi-rank job is refused, never silently wrong.

Under DDP the post-accumulate-grad hook runs before DDP's all-reduce: each rank would apply
its own gradient, the replicas would drift apart, and ``step()`` would then apply DDP's
averaged gradient a second time (seen before the guard: replicas different after 3 steps,
step count 6). See pagedopt/optim/backward_update.py.
"""

from __future__ import annotations

import pytest
import torch

import pagedopt
from pagedopt.optim import backward_update
from dist_helpers import batch, make_model, spawn


def _refusals_under_ddp(rank: int, world_size: int, workdir: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    model = make_model()
    ddp = DistributedDataParallel(model)
    before = [p.detach().clone() for p in model.parameters()]
    out = {}
    for how in ("constructor", "setter"):
        try:
            if how == "constructor":
                pagedopt.AdamW8bit(model.parameters(), min_8bit_size=0, update_in_backward=True)
            else:
                pagedopt.AdamW8bit(model.parameters(), min_8bit_size=0).update_in_backward = True
            out[how] = None
        except RuntimeError as e:
            out[how] = str(e)
    # The mode turned on before the job became multi-rank (the check skipped to get there):
    # the first hook of the backward refuses, before any parameter changes.
    opt = pagedopt.AdamW8bit(model.parameters(), min_8bit_size=0)
    check = backward_update._check_one_process
    backward_update._check_one_process = lambda: None
    try:
        opt.update_in_backward = True
    finally:
        backward_update._check_one_process = check
    x, y = batch(0, seed=1 + rank)
    try:
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        out["hook"] = None
    except RuntimeError as e:
        out["hook"] = str(e)
    out["unchanged"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    out["updates"] = opt.backward_updates
    return out


@pytest.mark.distributed
def test_ddp_job_refuses_update_in_backward_before_touching_a_parameter(tmp_path):
    for result in spawn(_refusals_under_ddp, 2, tmp_path):
        for how in ("constructor", "setter", "hook"):
            assert result[how] is not None, how
            assert "update_in_backward" in result[how] and "of 2" in result[how], result[how]
        assert result["unchanged"] and result["updates"] == 0


@pytest.mark.distributed
def test_a_process_group_of_one_still_updates_in_backward(tmp_path):
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(8, 8)
        opt = pagedopt.AdamW8bit(model.parameters(), min_8bit_size=0, update_in_backward=True)
        before = model.weight.detach().clone()
        model(torch.randn(2, 8)).sum().backward()
    finally:
        dist.destroy_process_group()
    assert opt.backward_updates == 2 and model.weight.grad is None
    assert not torch.equal(before, model.weight)
