"""``pagedopt train --memory-limit`` on the CPU (plan and peak printed, steps guarded) and the
main job's GPT-scale presets (checked on the meta device; only tiny models train in tests).

Tolerance tier: exact for parameter counts and for the guarded run (an OOM recovered inside
the job changes nothing: same losses as the run without it).
"""

from __future__ import annotations

import pytest
import torch

from pagedopt.cli import main as cli_main
from pagedopt.train import TrainConfig, TrainConfigError
from pagedopt.train.config import MODEL_PRESETS
from pagedopt.train.model import DecoderLM, ModelConfig
from train_helpers import TINY_FLAGS


def test_memory_limit_prints_plan_and_peak(tmp_path, capsys):
    config = tmp_path / "paged.yaml"
    config.write_text("optimizer: {name: AdamW8bit}\n"
                      "paging: {policy: budgeted, backend: simulated, simulated_capacity_bytes: 8MiB,\n"
                      "         device_budget_bytes: 64KiB, min_paged_numel: 4096}\n")
    code = cli_main(["train", "--steps", "3", *TINY_FLAGS, "--progress", "lines", "--memory-limit", "1GiB",
                     "--config", str(config)])
    out = capsys.readouterr().out
    assert code == 0
    assert "memory limit 1.00 GiB" in out and "PagedAdamW8bit" in out and "budgeted" in out
    assert "this run: AdamW8bit (fits by the estimate)" in out
    assert "memory: device peak" in out and "OOM recoveries 0" in out


def test_memory_limit_is_validated():
    with pytest.raises(TrainConfigError, match="memory_limit"):
        TrainConfig(memory_limit="lots")
    assert TrainConfig(memory_limit="24GiB").memory_limit == 24 * 2**30
    assert cli_main(["train", "--memory-limit", "0", *TINY_FLAGS]) == 2


@pytest.mark.parametrize("name,layers,d_model", [("gpt2-124m", 12, 768), ("gpt2-350m", 24, 1024),
                                                 ("gpt2-774m", 36, 1280), ("gpt-1.3b", 24, 2048)])
def test_main_job_presets_build_on_meta(name, layers, d_model):
    d, n, h = MODEL_PRESETS[name]
    assert (d, n) == (d_model, layers)
    with torch.device("meta"):
        model = DecoderLM(ModelConfig(vocab_size=256, d_model=d, layers=n, heads=h, max_seq_len=1024,
                                      stable_embedding=False, tie_weights=True))
    count = sum(p.numel() for p in model.parameters())
    body = 12 * n * d * d + 13 * n * d  # blocks: qkv, proj, mlp (weights + biases) and two LayerNorms
    assert count == body + (256 + 1024) * d + 2 * d
    assert TrainConfig(model_size=name).model_dims() == (d, n, h)


def test_oom_in_forward_retries_the_same_batch(tmp_path, monkeypatch):
    """The main job's guarded step: an OOM in forward at step 2 is recovered and the step runs
    again on the same batch - the run's losses and final parameters equal those of a run that
    never ran out of memory, and one recovery is counted."""
    from pagedopt.train import TrainConfig, train
    from pagedopt.train import loop

    config = tmp_path / "paged.yaml"
    config.write_text("optimizer: {name: AdamW8bit}\n"
                      "paging: {policy: budgeted, backend: simulated, simulated_capacity_bytes: 8MiB,\n"
                      "         device_budget_bytes: 64KiB, min_paged_numel: 4096}\n")

    def run(inject: bool):
        real = loop.lm_loss
        calls = []

        def lm_loss(model, x, y):
            calls.append(1)
            if inject and len(calls) == 2:
                raise torch.OutOfMemoryError("injected: out of memory in forward")
            return real(model, x, y)

        monkeypatch.setattr(loop, "lm_loss", lm_loss)
        cfg = TrainConfig(steps=3, model_size="tiny", seq_len=32, batch_size=4, max_corpus_bytes=200_000,
                          eval_batches=1, eval_every=0, progress="off", memory_limit="1GiB", threads=1,
                          config_file=str(config))
        result = train(cfg)
        monkeypatch.setattr(loop, "lm_loss", real)
        return result

    plain, recovered = run(False), run(True)
    assert recovered.to_dict()["memory_limit"]["oom_recoveries"] == 1
    assert plain.to_dict()["memory_limit"]["oom_recoveries"] == 0
    assert recovered.to_dict()["memory_limit"]["limit_bytes"] == 2**30
    assert recovered.train_losses == plain.train_losses and len(plain.train_losses) == 3
