"""Preemption in a job of several ranks: every rank stops after the same step.

The stop flag is all-reduced once per step (:meth:`pagedopt.train.resume.Checkpointer.stop_requested`).
Here 2 gloo ranks run a loop of one stop check and one collective "step" while a preemption
signal reaches rank 1 at a random moment, many times over: in such a tight loop most signals
land while a collective runs, the window of the hang CI found (rank 1 re-read its own flag
after the all-reduce, left the loop alone, and its peer waited in the next step's all-gather).
The two collectives differ in size, so a rank that leaves the loop alone makes gloo fail at
once instead of hanging.
"""

from __future__ import annotations

import os
import random
import signal
import threading

import pytest
import torch
import torch.distributed as dist

from dist_helpers import spawn
from pagedopt.distributed import DistributedRun
from pagedopt.train import TrainConfig
from pagedopt.train.preemption import PreemptionGuard
from pagedopt.train.resume import Checkpointer

TRIALS = 150


def _steps_until_stopped(rank: int, world_size: int, workdir: str, trials: int, seed: int) -> list[int]:
    runtime = DistributedRun("ddp", rank=rank, world_size=world_size)
    rng = random.Random(seed)
    steps_per_trial = []
    for _ in range(trials):
        with PreemptionGuard() as guard:
            checkpoints = Checkpointer(TrainConfig(), runtime)
            timer = None
            if rank == 1:
                timer = threading.Timer(rng.uniform(0.0, 0.02), os.kill, (os.getpid(), signal.SIGUSR1))
                timer.start()
            steps = 0
            while not checkpoints.stop_requested(guard):
                dist.all_reduce(torch.ones(4))  # the step's own collective (16 bytes; the flag is 8)
                steps += 1
            if timer is not None:
                timer.join()  # (it fired: only its signal can stop the loop)
        steps_per_trial.append(steps)
    return steps_per_trial


@pytest.mark.distributed
def test_ranks_stop_after_the_same_step_wherever_the_signal_lands(tmp_path):
    rank0, rank1 = spawn(_steps_until_stopped, 2, tmp_path, TRIALS, 1234)
    assert rank0 == rank1
    assert len(set(rank0)) > 5, rank0  # the signals landed at many different points of the loop
