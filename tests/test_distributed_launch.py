"""The distributed runtime (process group, wrapping, teardown) and real ``torchrun`` jobs.

``torchrun --nproc-per-node 2 -m pagedopt.distributed.demo --distributed fsdp`` trains and
saves a DCP checkpoint; a DDP job and a single process resume from it (another layout of the
optimizer state) and keep training.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pagedopt
from pagedopt.distributed import init_distributed, is_sharded
from pagedopt.distributed.runtime import _modules_to_shard

ROOT = Path(__file__).resolve().parents[1]
DONE = re.compile(r"^done steps=(\d+) loss=([0-9.]+) world_size=(\d+) mode=(\w+) state_bytes=(\d+)$", re.M)
STEP = re.compile(r"^step=(\d+) loss=([0-9.]+)$", re.M)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


TEARDOWN_ABORT = "terminate called without an active exception"


def _run(args: list[str], timeout: int = 240) -> str:
    proc = subprocess.run(
        args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0 and DONE.search(proc.stdout) and TEARDOWN_ABORT in proc.stderr:
        # gloo aborting a rank at interpreter exit *after* the job finished and printed its
        # result: the torch race in docs/distributed.md, "Exiting" (seen once in CI before
        # DistributedRun.close() let gloo's threads settle). Not training: run the job once more
        # rather than fail on it, and still fail if it happens twice or the job did not finish.
        proc = subprocess.run(
            args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
        )
    command = " ".join(args)
    assert proc.returncode == 0, f"{command} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _torchrun(nproc: int, *demo_args: str) -> str:
    return _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "pagedopt.distributed.demo", "--device", "cpu", "--log-every", "2", *demo_args]
    )


@pytest.mark.distributed
def test_torchrun_fsdp_then_resume_under_ddp_and_one_process(tmp_path):
    out = _torchrun(2, "--distributed", "fsdp", "--steps", "8", "--checkpoint-dir", str(tmp_path))
    done = DONE.search(out)
    assert done, out
    assert done.group(3, 4) == ("2", "fsdp")
    losses = [float(m.group(2)) for m in STEP.finditer(out)]
    assert len(losses) == 4 and losses[-1] < losses[0], out  # printed once (rank 0), falling
    assert int(done.group(5)) > 0
    checkpoint = tmp_path / "step-8"
    assert (checkpoint / ".metadata").is_file()

    out = _torchrun(2, "--distributed", "ddp", "--steps", "12", "--resume", str(checkpoint))
    assert "resumed from" in out and "at step 8" in out, out
    resumed = [float(m.group(2)) for m in STEP.finditer(out)]
    assert DONE.search(out).group(3, 4) == ("2", "ddp")
    assert max(resumed) < losses[0], "training restarted from scratch instead of resuming"

    out = _run([sys.executable, "-m", "pagedopt.distributed.demo", "--device", "cpu", "--steps", "12",
                "--log-every", "2", "--resume", str(checkpoint)])
    one = [float(m.group(2)) for m in STEP.finditer(out)]
    assert DONE.search(out).group(3, 4) == ("1", "none")
    assert max(one) < losses[0]


def test_none_mode_is_a_plain_single_process():
    with init_distributed("none", device="cpu") as run:
        assert (run.rank, run.world_size, run.local_rank, run.is_main) == (0, 1, 0, True)
        assert run.backend is None and not torch.distributed.is_initialized()
        model = run.wrap(torch.nn.Linear(4, 4))
        assert isinstance(model, torch.nn.Linear)
        assert run.mean(torch.tensor(3.0)) == 3.0 and run.sum(2) == 2.0
        assert run.metrics_port(9460) == 9460
        assert run.data_seed(5) != init_distributed("none", device="cpu").data_seed(6)


@pytest.mark.distributed
def test_fsdp_without_torchrun_is_a_world_of_one(capsys):
    """No torchrun variables: a one-process group through a private file store; the model's
    parameters become DTensors, an 8-bit optimizer steps on them, teardown destroys the group."""
    assert not torch.distributed.is_initialized()
    with init_distributed("fsdp", device="cpu") as run:
        assert torch.distributed.is_initialized() and run.owns_process_group
        assert (run.world_size, run.backend) == (1, "gloo")
        store_dir = run.store_dir
        assert store_dir and os.path.isdir(store_dir)
        model = run.wrap(torch.nn.Sequential(torch.nn.Linear(256, 32), torch.nn.Linear(32, 2)))
        assert all(is_sharded(p) for p in model.parameters())
        opt = pagedopt.AdamW8bit(model.parameters(), min_8bit_size=1024, percentile_clipping=90)
        model(torch.randn(4, 256)).sum().backward()
        opt.step()
        assert opt.state[model[0].weight]["state1"].dtype == torch.uint8
        assert not is_sharded(opt.state[model[0].weight]["state1"])  # kernels got local tensors
        run.print("hello from rank 0")
    assert not torch.distributed.is_initialized() and not os.path.exists(store_dir)
    captured = capsys.readouterr()
    assert "hello from rank 0" in captured.out and "world of 1" in captured.err


@pytest.mark.distributed
def test_teardown_lets_gloo_threads_settle_after_destroying_the_group(monkeypatch):
    """close() releases the interpreter lock after destroy_process_group, so a gloo worker
    thread freeing a backward-time collective is not ended by interpreter shutdown (the abort
    in docs/distributed.md, "Exiting"); a run that owns no group does not pause."""
    from pagedopt.distributed import runtime

    calls: list[tuple[str, bool]] = []
    monkeypatch.setattr(runtime, "settle_collective_threads",
                        lambda: calls.append(("settle", torch.distributed.is_initialized())))
    with init_distributed("none", device="cpu"):
        pass
    assert calls == []
    with init_distributed("fsdp", device="cpu") as run:
        model = run.wrap(torch.nn.Sequential(torch.nn.Linear(8, 8)))
        model(torch.randn(2, 8)).sum().backward()  # a collective started inside backward
    assert calls == [("settle", False)]  # once, after the group was destroyed


@pytest.mark.distributed
def test_an_optimizer_planning_in_a_process_group_settles_gloo_threads_at_exit(monkeypatch, tmp_path):
    """A user's own script (no DistributedRun) is covered too: the first plan built while a
    process group is initialized registers the settle for interpreter exit, once; planning
    without a group registers nothing."""
    import atexit

    from pagedopt.distributed import exit_guard

    registered: list = []
    monkeypatch.setattr(exit_guard, "_registered", False)
    monkeypatch.setattr(atexit, "register", registered.append)
    p = torch.nn.Parameter(torch.ones(8))
    p.grad = torch.ones(8)
    pagedopt.AdamW8bit([p]).step()
    assert registered == []
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for _ in range(2):
            opt = pagedopt.AdamW8bit([p])
            opt.step()
            opt.step()
    finally:
        dist.destroy_process_group()
    assert registered == [exit_guard.settle_collective_threads]


def test_bad_arguments_are_named(monkeypatch):
    with pytest.raises(ValueError, match="distributed mode 'zero'"):
        init_distributed("zero")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            init_distributed("none", device="cuda")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but --distributed is 'none'"):
        init_distributed("none", device="cpu")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="LOCAL_RANK='x'"):
        init_distributed("none", device="cpu")


def test_blocks_to_shard():
    """By default the items of every ModuleList are sharded on their own (one all-gather each);
    classes or a predicate choose others; anything else is rejected by name."""
    from pagedopt.distributed.demo import Block, TinyLM

    model = TinyLM(dim=8, depth=3)
    assert _modules_to_shard(model, None) == list(model.blocks)
    assert _modules_to_shard(model, [torch.nn.LayerNorm]) == [b.norm for b in model.blocks] + [model.norm]
    assert _modules_to_shard(model, lambda m: isinstance(m, Block)) == list(model.blocks)
    with pytest.raises(TypeError, match="shard: expected nn.Module classes"):
        _modules_to_shard(model, [int])
