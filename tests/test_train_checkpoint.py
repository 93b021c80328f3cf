"""Checkpoints of the main job: atomic, periodic, resumable bit-exactly, safe to load, and
faults tested for real (SIGTERM at random times and mid-step, kill -9 during a save, a full
file system).

Bit-exact tier: on the CPU with one thread, a run stopped at step k and resumed must end with
the same losses, validation loss, parameters and optimizer state as the uninterrupted run -
equality, no tolerance: every input of every later step (weights, 8-bit codes and absmax,
clipping history, scheduler, data position, RNG) is restored exactly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pagedopt.cli import main as cli_main
from pagedopt.fileio import TEMP_PREFIX, AtomicWriteError
from pagedopt.train import Callback, TrainConfig, TrainConfigError, train
from pagedopt.train import loop as train_loop
from pagedopt.train.preemption import PreemptionGuard
from pagedopt.train.resume import Checkpointer
from train_helpers import REPO_ROOT, read_until
from pagedopt.train.checkpoint import (
    MARKER, CheckpointError, checkpoint_path, list_checkpoints, newest_checkpoint, resolve_resume,
)

TINY = dict(model_size="tiny", seq_len=32, batch_size=4, max_corpus_bytes=200_000, eval_batches=1,
            progress="off", threads=1)
TINY_FLAGS = ["--model-size", "tiny", "--seq-len", "32", "--batch-size", "4", "--max-corpus-bytes", "200000",
              "--eval-batches", "1", "--threads", "1", "--log-every", "1", "--progress", "lines"]


class SignalAt(Callback):
    """Sends ``sig`` to this process after step ``step`` (the handler only sets a flag)."""

    def __init__(self, step: int, sig: int = signal.SIGTERM) -> None:
        self.step, self.sig = step, sig

    def on_step_end(self, run, info):
        if info.step == self.step:
            os.kill(os.getpid(), self.sig)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tree(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def _assert_same_final_state(ckpt_a: Path, ckpt_b: Path) -> None:
    a, b = _load(ckpt_a), _load(ckpt_b)
    assert a["step"] == b["step"]
    _assert_same_tree(a["model"], b["model"], "model")
    _assert_same_tree(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer.state")
    _assert_same_tree(a["history"]["train_losses"], b["history"]["train_losses"], "losses")


@pytest.mark.parametrize("optimizer", ["AdamW8bit", "PagedAdamW8bit"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_preempted_run_resumes_bit_exact(tmp_path, optimizer, sig):
    steps = 7
    full = train(TrainConfig(steps=steps, optimizer=optimizer, checkpoint_dir=str(tmp_path / "full"), **TINY))
    cut = train(TrainConfig(steps=steps, optimizer=optimizer, checkpoint_dir=str(tmp_path / "cut"),
                            checkpoint_every=2, **TINY), [SignalAt(3, sig)])
    assert cut.preempted and cut.steps_completed == 3 and cut.checkpoint.endswith("step-00000003.pt")
    assert [c.step for c in list_checkpoints(tmp_path / "cut")] == [2, 3]
    resumed = train(TrainConfig(steps=steps, optimizer=optimizer, checkpoint_dir=str(tmp_path / "cut"),
                                resume="latest", **TINY))
    assert resumed.resumed_from_step == 3 and resumed.steps_completed == steps and not resumed.interrupted
    assert resumed.train_losses == full.train_losses
    assert resumed.final_val_loss == full.final_val_loss and resumed.initial_val_loss == full.initial_val_loss
    _assert_same_final_state(Path(full.checkpoint), Path(resumed.checkpoint))


def test_signal_inside_optimizer_step_never_saves_a_torn_step(tmp_path):
    """The issue's torn checkpoint: SIGTERM inside optimizer.step() saved step 7 with step 8's
    optimizer state. Now the flag waits for the step to finish."""
    calls = {"n": 0}

    def inside_step(optimizer, args, kwargs):  # runs within optimizer.step(), before the update
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(inside_step)
    try:
        cut = train(TrainConfig(steps=6, checkpoint_dir=str(tmp_path), **TINY))
    finally:
        handle.remove()
    assert cut.preempted and cut.steps_completed == 4
    saved = _load(Path(cut.checkpoint))
    assert saved["step"] == 4
    steps = {s["step"] for s in saved["optimizer"]["state"].values()}
    assert steps == {4}, steps  # every parameter's state has seen exactly the saved steps


class _TwoRankStandIn:
    """The all-reduce of a two-rank run, seen from one rank: ``sum`` adds the peer's flag, and
    ``land_signal_during`` says in which call this rank's own preemption signal arrives, after
    the flag was read and before the all-reduce returns (what a real signal does while the
    rank waits in gloo)."""

    world_size, mode = 2, "ddp"

    def __init__(self, guard: PreemptionGuard, peer_flags: list[float], land_signal_during: int | None) -> None:
        self.guard, self.peer_flags, self.land_signal_during = guard, list(peer_flags), land_signal_during
        self.calls = 0

    def sum(self, value: float) -> float:
        self.calls += 1
        if self.calls == self.land_signal_during:
            self.guard._handle(signal.SIGUSR1, None)
        return value + self.peer_flags.pop(0)


def test_ranks_agree_to_stop_even_when_a_signal_lands_inside_the_all_reduce():
    """The CI hang: rank 1's signal arrived while its stop flag was being all-reduced (sum 0);
    it then re-read its own flag, left the loop, and waited in the post-loop all-reduce while
    rank 0 went on into the next step's FSDP all-gather. Now the answer is the all-reduced
    flag alone: both ranks go on, and both stop at the next check."""
    with PreemptionGuard() as guard:
        runtime = _TwoRankStandIn(guard, peer_flags=[0.0, 0.0], land_signal_during=1)
        checkpoints = Checkpointer(TrainConfig(**TINY), runtime)
        assert checkpoints.stop_requested(guard) is False  # what the peer also got: sum 0
        assert guard.requested  # remembered, for the next check
        assert checkpoints.stop_requested(guard) is True  # sum 1 on every rank
        assert runtime.calls == 2


def test_a_signal_on_the_peer_stops_this_rank_too():
    with PreemptionGuard() as guard:
        checkpoints = Checkpointer(TrainConfig(**TINY), _TwoRankStandIn(guard, [0.0, 1.0], None))
        assert checkpoints.stop_requested(guard) is False and not guard.requested
        assert checkpoints.stop_requested(guard) is True
        assert guard.requested and guard.signal_name == "signal on another rank"


def test_second_ctrl_c_outside_a_save_aborts_without_writing(tmp_path):
    class TwoInterrupts(Callback):
        def on_step_end(self, run, info):
            if info.step == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(steps=5, checkpoint_dir=str(tmp_path), **TINY), [TwoInterrupts()])
    assert list_checkpoints(tmp_path) == []


def test_signals_during_the_save_are_held_off(tmp_path, monkeypatch):
    from pagedopt.train import checkpoint as ckpt_module

    real = ckpt_module.atomic_save

    def save_and_get_signalled(obj, path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # would abort outside a save
        os.kill(os.getpid(), signal.SIGTERM)
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module, "atomic_save", save_and_get_signalled)
    cut = train(TrainConfig(steps=5, checkpoint_dir=str(tmp_path), **TINY), [SignalAt(2)])
    assert cut.preempted and Path(cut.checkpoint).is_file()


def test_periodic_checkpoints_keep_the_newest_and_skip_incomplete_ones(tmp_path):
    (tmp_path / "step-00000001").mkdir()  # a DCP directory a killed run left without its marker
    (tmp_path / f"{TEMP_PREFIX}step-00000002.pt.abc").write_bytes(b"torn")
    result = train(TrainConfig(steps=5, checkpoint_dir=str(tmp_path), checkpoint_every=1, keep=2, **TINY))
    assert [c.step for c in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004.pt", "step-00000005.pt"]
    assert newest_checkpoint(tmp_path).path == Path(result.checkpoint)


def test_interval_checkpoints(tmp_path):
    class Slow(Callback):
        def on_step_end(self, run, info):
            time.sleep(0.3)

    train(TrainConfig(steps=4, checkpoint_dir=str(tmp_path), checkpoint_interval=0.5, keep=10, **TINY), [Slow()])
    steps = [c.step for c in list_checkpoints(tmp_path)]
    assert 2 <= len(steps) <= 4 and steps[-1] == 4, steps


def test_resume_latest_without_checkpoints_starts_afresh_and_bad_resumes_are_clear(tmp_path):
    fresh = train(TrainConfig(steps=2, checkpoint_dir=str(tmp_path / "new"), resume="latest", **TINY))
    assert fresh.resumed_from_step == 0 and fresh.steps_completed == 2
    with pytest.raises(CheckpointError, match="does not exist"):
        train(TrainConfig(steps=2, resume=str(tmp_path / "missing.pt"), **TINY))
    with pytest.raises(CheckpointError, match=r"another model or optimizer: d_model=64 \(this run: 96\)"):
        train(TrainConfig(steps=3, resume=str(tmp_path / "new"), **{**TINY, "d_model": 96}))
    export = tmp_path / "export.pt"
    train(TrainConfig(steps=1, save_path=str(export), **TINY))
    with pytest.raises(CheckpointError, match="not a pagedopt training checkpoint"):
        train(TrainConfig(steps=2, resume=str(export), **TINY))
    with pytest.raises(TrainConfigError, match="needs checkpoint_dir"):
        TrainConfig(resume="latest")
    with pytest.raises(TrainConfigError, match="keep=0"):
        TrainConfig(checkpoint_dir="x", keep=0)


class _Evil:
    def __reduce__(self):
        return (os.getpid, ())


def test_checkpoint_files_that_would_run_code_are_refused(tmp_path):
    path = checkpoint_path(tmp_path, 3, sharded=False)
    with open(path, "wb") as f:
        torch.save({"format": "pagedopt-train-checkpoint", "version": 1, "evil": _Evil()}, f)
    with pytest.raises(CheckpointError, match="not a weights-only torch file"):
        train(TrainConfig(steps=4, checkpoint_dir=str(tmp_path), resume="latest", **TINY))


def test_dcp_metadata_is_read_by_a_restricted_unpickler(tmp_path):
    import pagedopt
    from pagedopt.distributed import load_checkpoint, save_checkpoint
    from pagedopt.distributed.checkpoint import UntrustedCheckpointError

    model = torch.nn.Linear(64, 64)
    opt = pagedopt.AdamW8bit(model.parameters(), min_8bit_size=1024)
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ok", model, opt, extra={"step": 1})
    assert load_checkpoint(tmp_path / "ok", model, opt) == {"step": 1}  # DCP's own metadata passes
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UntrustedCheckpointError, match="refers to posix.getpid"):
        load_checkpoint(tmp_path / "evil", model, opt)


def test_json_failure_never_costs_the_checkpoint(tmp_path, monkeypatch, capsys):
    def disk_full(path, text):
        raise AtomicWriteError(Path(path), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    monkeypatch.setattr(train_loop, "atomic_write_text", disk_full)
    save, summary = tmp_path / "model.pt", tmp_path / "run.json"
    rc = cli_main(["train", "--steps", "2", *TINY_FLAGS, "--progress", "off", "--save", str(save), "--json", str(summary)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 74
    assert err == [f"pagedopt train: error: cannot write {summary}: [Errno 28] No space left on device (ENOSPC)"]
    assert set(_load(save)) >= {"model", "optimizer", "step"} and not summary.exists()


# -- faults in real processes ---------------------------------------------------------------------


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pagedopt", "train", *args], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}, **kwargs)




def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


STEPS = 8


def _reference_run(tmp_path_factory, steps: int) -> Path:
    d = tmp_path_factory.mktemp("reference")
    rc, out, err = _finish(_cli(["--steps", str(steps), *TINY_FLAGS, "--checkpoint-dir", str(d)]))
    assert rc == 0, err[-3000:]
    return checkpoint_path(d, steps, sharded=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run's final checkpoint."""
    return _reference_run(tmp_path_factory, STEPS)


# Long enough that a signal sent within 0.2 s of step 3 lands while training on a quiet machine
# (the tiny model takes ~15 ms a step); once the run is over, signals act as usual again.
RANDOM_SIGNAL_STEPS = 40


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory) -> Path:
    return _reference_run(tmp_path_factory, RANDOM_SIGNAL_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_sigterm_at_random_times_then_resume_ends_like_the_uninterrupted_run(tmp_path, long_reference, trial):
    rng = random.Random(trial)
    d = tmp_path / "ckpt"
    proc = _cli(["--steps", str(RANDOM_SIGNAL_STEPS), *TINY_FLAGS, "--checkpoint-dir", str(d), "--checkpoint-every", "3"])
    read_until(proc, rf"^step {1 + trial}/", timeout=180)
    time.sleep(rng.uniform(0.0, 0.2))  # anywhere: inside a step, between steps, in a save
    proc.send_signal(signal.SIGTERM)
    rc, out, err = _finish(proc)
    assert rc == 0, err[-3000:]
    m = re.search(r"^pagedopt train: preempted at step (\d+), checkpoint at (.+)$", out, re.M)
    assert m, out[-3000:]
    assert Path(m.group(2)) == checkpoint_path(d, int(m.group(1)), sharded=False) and Path(m.group(2)).is_file()
    rc, out, err = _finish(_cli(["--steps", str(RANDOM_SIGNAL_STEPS), *TINY_FLAGS, "--checkpoint-dir", str(d), "--resume"]))
    assert rc == 0, err[-3000:]
    assert f"(resumed at step {m.group(1)})" in out
    _assert_same_final_state(long_reference, checkpoint_path(d, RANDOM_SIGNAL_STEPS, sharded=False))


@pytest.mark.slow
def test_kill_9_during_a_save_keeps_the_previous_checkpoint_and_resume_recovers(tmp_path, reference):
    d = tmp_path / "ckpt"
    # The second save writes half of its bytes, says so, and hangs: then it gets SIGKILL.
    script = (
        "import sys, time, pagedopt.train.checkpoint as c\n"
        "from pagedopt.fileio import atomic_write\n"
        "import io, torch\n"
        "real = c.atomic_save\n"
        "calls = []\n"
        "def slow(obj, path, *a, **k):\n"
        "    calls.append(path)\n"
        "    if len(calls) < 2:\n"
        "        return real(obj, path, *a, **k)\n"
        "    buf = io.BytesIO(); torch.save(obj, buf)\n"
        "    with atomic_write(path) as f:\n"
        "        f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()\n"
        "        print('SAVING', path, flush=True); time.sleep(600)\n"
        "c.atomic_save = slow\n"
        "from pagedopt.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, "train", "--steps", str(STEPS), *TINY_FLAGS,
                             "--checkpoint-dir", str(d), "--checkpoint-every", "2"], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    read_until(proc, r"^SAVING ", timeout=180)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert [c.step for c in list_checkpoints(d)] == [2]
    assert any(p.name.startswith(TEMP_PREFIX) for p in d.iterdir())  # the torn temporary, never renamed
    assert _load(checkpoint_path(d, 2, sharded=False))["step"] == 2
    rc, out, err = _finish(_cli(["--steps", str(STEPS), *TINY_FLAGS, "--checkpoint-dir", str(d), "--resume"]))
    assert rc == 0, err[-3000:]
    assert not any(p.name.startswith(TEMP_PREFIX) for p in d.iterdir())
    _assert_same_final_state(reference, checkpoint_path(d, STEPS, sharded=False))


@contextlib.contextmanager
def _small_filesystem(path: Path, size_bytes: int):
    """A tmpfs of ``size_bytes`` at ``path`` when this process may mount one (root), else
    ``None`` (the caller falls back to RLIMIT_FSIZE)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield False
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.slow
def test_full_filesystem_keeps_the_previous_checkpoint_exits_74_and_resume_recovers(tmp_path, reference):
    size = reference.stat().st_size
    d = tmp_path / "small"
    with _small_filesystem(d, int(size * 1.5)) as mounted:
        if mounted:
            proc = _cli(["--steps", str(STEPS), *TINY_FLAGS, "--checkpoint-dir", str(d), "--checkpoint-every", "2"])
            expected_errno = "[Errno 28] No space left on device (ENOSPC)"
            survivors = [2]
        else:  # no tmpfs: a file-size limit below the checkpoint size (EFBIG on the first save)
            limit = size // 2
            proc = _cli(["--steps", str(STEPS), *TINY_FLAGS, "--checkpoint-dir", str(d), "--checkpoint-every", "2"],
                        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
            expected_errno = "[Errno 27] File too large (EFBIG)"
            survivors = []
        rc, out, err = _finish(proc)
        assert rc == 74, err[-3000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"pagedopt train: error: cannot write {d}/step-0000000")
        assert lines[0].endswith(expected_errno), lines
        assert [c.step for c in list_checkpoints(d)] == survivors
        assert not any(p.name.startswith(TEMP_PREFIX) for p in d.iterdir())
        resume = ["--resume", str(checkpoint_path(d, 2, sharded=False))] if survivors else []
        rc, out, err = _finish(_cli(["--steps", str(STEPS), *TINY_FLAGS, "--checkpoint-dir", str(tmp_path / "big"),
                                     *resume]))
    assert rc == 0, err[-3000:]
    _assert_same_final_state(reference, checkpoint_path(tmp_path / "big", STEPS, sharded=False))


# -- FSDP2 through torch.distributed.checkpoint ----------------------------------------------------


@pytest.mark.distributed
def test_fsdp_world_of_one_resumes_bit_exact_through_dcp(tmp_path):
    cfg = dict(TINY, distributed="fsdp", optimizer="PagedAdamW8bit")
    full = train(TrainConfig(steps=5, **cfg))
    cut = train(TrainConfig(steps=5, checkpoint_dir=str(tmp_path), **cfg), [SignalAt(2)])
    assert cut.preempted and (Path(cut.checkpoint) / MARKER).is_file() and (Path(cut.checkpoint) / ".metadata").is_file()
    info = resolve_resume("latest", str(tmp_path))
    assert info.sharded and info.step == 2
    resumed = train(TrainConfig(steps=5, checkpoint_dir=str(tmp_path), resume="latest", **cfg))
    assert resumed.resumed_from_step == 2
    assert resumed.train_losses == full.train_losses and resumed.final_val_loss == full.final_val_loss


def _torchrun(nproc: int, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "pagedopt", "train", *args],
        cwd=REPO_ROOT, env={**env, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_fsdp_two_ranks_preempted_by_sigterm_resume_bit_exact(tmp_path):
    """2 gloo ranks under FSDP2: a preemption signal reaches one worker (SIGUSR1, as
    deploy/torchrun/launch.sh forwards it; torchrun itself answers SIGTERM by killing its
    workers after 30 s and exiting 1), the ranks agree on a step, write one DCP checkpoint and
    exit 0; the resumed job ends with the uninterrupted one's losses exactly."""
    flags = ["--distributed", "fsdp", "--steps", "6", *TINY_FLAGS, "--device", "cpu"]
    rc, full_out, err = _finish(_torchrun(2, *flags, "--json", str(tmp_path / "full.json")))
    assert rc == 0, err[-3000:]
    d = tmp_path / "ckpt"
    proc = _torchrun(2, *flags, "--checkpoint-dir", str(d))
    read_until(proc, r"^step 2/", timeout=180)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGUSR1)  # one rank only: the other learns it from the step's all-reduce
    rc, out, err = _finish(proc)
    assert rc == 0, err[-3000:]
    assert re.search(r"^pagedopt train: preempted at step \d, checkpoint at ", out, re.M), out
    rc, out, err = _finish(_torchrun(2, *flags, "--checkpoint-dir", str(d), "--resume",
                                     "--json", str(tmp_path / "resumed.json")))
    assert rc == 0, err[-3000:]
    full = json.loads((tmp_path / "full.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["resumed_from_step"] > 0
    assert resumed["train_losses"] == full["train_losses"] and resumed["final_val_loss"] == full["final_val_loss"]
