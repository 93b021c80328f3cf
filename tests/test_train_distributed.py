"""The main job under torch.distributed, ``pagedopt train --distributed``: DDP and FSDP2 as a
world of one, the FSDP checkpoint directory, ``torchrun`` runs on 2 gloo ranks (marked
``distributed``: metrics per rank, a resharding DCP checkpoint, output printed once), and a
multi-rank launch without ``--distributed``.

Tolerance tier: fp32 where a distributed run is compared with a single process (named in the
tests).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from pagedopt.cli import main as cli_main
from pagedopt.train import TrainConfig, train
from pagedopt.train.data import eval_batches, load_corpus
from pagedopt.train.model import DecoderLM, ModelConfig
from pagedopt.train.optimizers import build_optimizer

from train_helpers import REPO_ROOT, TINY_FLAGS, read_until, free_port, scrape, tiny


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_world_of_one_trains_like_a_single_process(mode):
    """Without torchrun, --distributed runs as a world of one: the wrapped (DDP) or sharded
    (FSDP2, DTensor parameters) model trains like the plain one. fp32 tier: the same
    arithmetic on the same values, except that FSDP2's DTensor gradient-norm reduction may
    sum in another order (~1e-7 relative); 1e-5 leaves room for float32 rounding over 4
    steps and is far below what a wiring mistake (wrong data, unsynced or unclipped
    gradients) does."""
    plain = train(tiny(steps=4))
    wrapped = train(tiny(steps=4, distributed=mode))
    assert (wrapped.world_size, wrapped.distributed) == (1, mode)
    assert wrapped.train_losses == pytest.approx(plain.train_losses, rel=1e-5)
    assert wrapped.final_val_loss == pytest.approx(plain.final_val_loss, rel=1e-5)
    assert wrapped.memory.bytes_by_precision["8bit-blockwise"] == plain.memory.bytes_by_precision["8bit-blockwise"]
    assert not torch.distributed.is_initialized()  # the world of one was torn down


@pytest.mark.distributed
def test_fsdp_save_path_must_be_a_directory_and_is_checked_before_training(tmp_path, capsys):
    a_file = tmp_path / "ckpt.pt"
    a_file.write_bytes(b"x")
    assert cli_main(["train", "--distributed", "fsdp", "--save", str(a_file), "--steps", "1", *TINY_FLAGS]) == 2
    captured = capsys.readouterr()
    assert f"--save {a_file}: is a file; a sharded (FSDP) checkpoint is a directory" in captured.err
    assert "eval step" not in captured.out and not torch.distributed.is_initialized()
    missing = tmp_path / "new" / "ckpt"
    assert cli_main(["train", "--distributed", "fsdp", "--save", str(missing), "--steps", "1", *TINY_FLAGS,
                     "--progress", "off"]) == 0
    assert (missing / ".metadata").is_file()


def _torchrun_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def _torchrun(nproc: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "pagedopt", "train", *args],
        cwd=REPO_ROOT, env=_torchrun_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


TORCHRUN_FLAGS = ["--steps", "5", "--model-size", "tiny", "--seq-len", "64", "--batch-size", "8",
                  "--max-corpus-bytes", "400000", "--eval-batches", "2", "--log-every", "1", "--device", "cpu"]


def _check_torchrun_output(out: str, mode: str) -> list[float]:
    """One header and one summary (rank 0 prints), finite falling losses; returns them."""
    assert out.count("pagedopt train: 5 steps on cpu x 2 ranks") == 1, out
    assert f"({mode}, gloo)" in out
    assert len(re.findall(r"^done: 5/5 steps", out, re.M)) == 1, out
    assert len(re.findall(r"^optimizer state \(AdamW8bit, all 2 ranks", out, re.M)) == 1, out
    losses = [float(m) for m in re.findall(r"^step \d+/5 loss=([0-9.]+)", out, re.M)]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses), out
    assert losses[-1] < losses[0] - 0.2, losses
    return losses


@pytest.mark.distributed
def test_torchrun_fsdp_metrics_per_rank_and_a_resharding_checkpoint(tmp_path):
    """2 ranks of FSDP2 on gloo: one metrics endpoint per rank (base + LOCAL_RANK), the job's
    state memory summed over ranks, and --save as a DCP directory that loads into one process
    and gives the run's final validation loss."""
    port = free_port(consecutive=2)
    summary_path, ckpt = tmp_path / "summary.json", tmp_path / "ckpt"
    # Each rank lingers 8 s after training on its own port: time to scrape both, then the job ends.
    proc = _torchrun(2, "--distributed", "fsdp", *TORCHRUN_FLAGS, "--metrics-port", str(port), "--linger", "8",
                     "--json", str(summary_path), "--save", str(ckpt))
    try:
        lines = read_until(proc, r"^serving the final metrics")
        ranks = {}
        for local_rank in (0, 1):
            deadline = time.monotonic() + 8
            while True:
                try:
                    samples = scrape(port + local_rank)
                    if samples.get(next((k for k in samples if k.startswith("pagedopt_training_active{")), ""), 1) == 0:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, f"rank {local_rank} never served its final metrics"
                time.sleep(0.2)
            steps_key = next(k for k in samples if k.startswith("pagedopt_steps_total{"))
            ranks[local_rank] = (re.search(r'rank="(\d+)"', steps_key).group(1), samples[steps_key])
        assert ranks == {0: ("0", 5.0), 1: ("1", 5.0)}
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    out = "".join(lines) + out
    _check_torchrun_output(out, "fsdp")
    assert "each holds its shards" in out
    summary = json.loads(summary_path.read_text())
    assert (summary["world_size"], summary["distributed"]) == (2, "fsdp")
    state = summary["optimizer_state"]
    assert sum(state["parameters_by_precision"].values()) == summary["num_parameters"]
    assert state["ranks"] == 2 and not state["replicated"]

    # The DCP checkpoint, loaded into a single process, holds the trained model.
    from pagedopt.distributed import load_checkpoint

    assert (ckpt / ".metadata").is_file()
    model = DecoderLM(ModelConfig(d_model=64, layers=2, heads=2, max_seq_len=64))
    opt = build_optimizer(model, TrainConfig(**summary["config"]))
    extra = load_checkpoint(ckpt, model, opt)
    assert extra["step"] == 5 and extra["config"]["distributed"] == "fsdp"
    # Rows of 64 elements: blocks of the shards are not blocks of the tensor, so DCP stored this
    # state dequantized (docs/distributed.md) and it loads as fp32 into an unsharded optimizer.
    assert opt.state[model.blocks[0].mlp.up.weight]["state1"].shape == (256, 64)
    corpus = load_corpus(max_bytes=400_000)
    batches = eval_batches(corpus.val, 8, 64, 2)
    with torch.no_grad():
        val = torch.stack([model.loss(x, y) for x, y in batches]).mean().item()
    # fp32 tier: the same weights evaluated unsharded in another process.
    assert val == pytest.approx(summary["final_val_loss"], rel=1e-5)


@pytest.mark.distributed
def test_torchrun_ddp_trains_and_prints_once():
    proc = _torchrun(2, "--distributed", "ddp", *TORCHRUN_FLAGS)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-4000:]
    _check_torchrun_output(out, "ddp")
    assert "a full replica on each" in out


def test_distributed_none_under_a_multi_rank_launch_is_a_clear_error(monkeypatch, capsys):
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    assert cli_main(["train", "--steps", "1", *TINY_FLAGS]) == 2
    assert "--distributed none: started by torchrun with WORLD_SIZE=2" in capsys.readouterr().err
