"""The guarded step in a job of several ranks: an out-of-memory error recovers memory and
propagates, never a retry on one rank alone (its collectives would pair with the wrong ones
of the other ranks: FSDP's all-gathers, DDP's bucket all-reduces, clipping norms).

Two gloo ranks; rank 0 runs out of memory, in the body of a guarded step and inside a
guarded ``optimizer.step()``, while rank 1 steps normally. Each rank then joins the same
final all-reduce, which would hang or abort had rank 0 re-run a step's collectives.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import pagedopt
from dist_helpers import spawn
from pagedopt.paging import MemoryController, PagingConfig

pytestmark = pytest.mark.distributed


def _guarded(rank: int, where: str) -> dict:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4096))
    opt = pagedopt.AdamW8bit([w], min_8bit_size=16, percentile_clipping=90,
                             paging=PagingConfig(backend="simulated", policy="offload", min_paged_numel=1))
    ctrl = MemoryController(opt)
    attempts, error = [], None

    def body():
        attempts.append(1)
        w.grad = torch.full_like(w, 0.01)
        if rank == 0 and where == "body":
            raise torch.OutOfMemoryError("injected in backward")
        if rank == 0 and where == "step":
            opt._update_chunk = _raise_oom
        opt.step()

    before = w.detach().clone()
    try:
        ctrl.run_step(body)
    except torch.OutOfMemoryError as exc:
        error = str(exc)
    flag = torch.tensor([1.0])
    dist.all_reduce(flag)  # both ranks arrive here: nobody is stuck in a retried collective
    return dict(attempts=len(attempts), error=error, recoveries=ctrl.oom_recoveries_total,
                phases=[r["phase"] for r in ctrl.recoveries], changed=not torch.equal(w.detach(), before),
                step=opt.state[w].get("step"), reduced=float(flag))


def _raise_oom(works):
    raise torch.OutOfMemoryError("injected in the optimizer step")


def _worker(rank: int, world_size: int, workdir: str) -> dict:
    return {where: _guarded(rank, where) for where in ("body", "step")}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn(_worker, 2, tmp_path_factory.mktemp("oom_guard"))


@pytest.mark.parametrize("where", ["body", "step"])
def test_oom_on_one_rank_recovers_and_propagates_without_a_retry(results, where):
    failed, healthy = results[0][where], results[1][where]
    assert failed["attempts"] == 1 and "injected" in failed["error"]
    assert failed["recoveries"] == 1 and failed["phases"] == ["multi-rank job (no retry)"]
    assert not failed["changed"]  # no half-applied update; the step counter is restored
    assert failed["step"] in (None, 0)
    assert healthy == dict(attempts=1, error=None, recoveries=0, phases=[], changed=True, step=1, reduced=2.0)
    assert failed["reduced"] == 2.0
