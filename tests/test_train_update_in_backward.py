"""`pagedopt train --update-in-backward`: the same run as the ordinary step, bit for bit (CPU
kernels are strict numerics), and the settings it cannot work with are refused up front."""

from __future__ import annotations

import pytest
import torch

from pagedopt.cli import build_parser
from pagedopt.commands.train import config_from_args
from pagedopt.train import TrainConfig, train
from pagedopt.train.config import TrainConfigError

SMALL = dict(steps=6, model_size="tiny", seq_len=16, batch_size=2, max_corpus_bytes=50_000, eval_batches=1,
             progress="off", max_grad_norm=0.0, percentile_clipping=95)


@pytest.mark.parametrize("optimizer", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit"])
def test_update_in_backward_matches_the_ordinary_step(optimizer):
    models = {}

    class Keep:
        def __init__(self, tag):
            self.tag = tag

        def on_train_start(self, run):
            pass

        def on_train_end(self, run, result):
            models[self.tag] = [p.detach().clone() for p in run.model.parameters()]
            models[self.tag + "-backward-updates"] = run.optimizer.backward_updates

        def __getattr__(self, name):  # every other callback hook: nothing to do
            return lambda *args, **kwargs: None

    plain = train(TrainConfig(optimizer=optimizer, **SMALL), [Keep("plain")])
    inback = train(TrainConfig(optimizer=optimizer, update_in_backward=True, **SMALL), [Keep("inback")])
    assert models["plain-backward-updates"] == 0
    assert models["inback-backward-updates"] == SMALL["steps"] * len(models["inback"])  # every update ran in backward
    assert plain.train_losses == inback.train_losses
    assert all(torch.equal(a, b) for a, b in zip(models["plain"], models["inback"]))


def test_flag_parses_into_the_config():
    args = build_parser().parse_args(["train", "--update-in-backward", "--max-grad-norm", "0"])
    config = config_from_args(args)
    assert config.update_in_backward is True and config.max_grad_norm == 0.0


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(max_grad_norm=1.0), "max_grad_norm"),
        (dict(max_grad_norm=0.0, optimizer="torch-adamw"), "pagedopt optimizer"),
        (dict(max_grad_norm=0.0, distributed="fsdp"), "FSDP2"),
        (dict(max_grad_norm=0.0, distributed="ddp"), "DDP averages"),
    ],
)
def test_incompatible_settings_are_refused(settings, words):
    with pytest.raises(TrainConfigError, match=words):
        TrainConfig(update_in_backward=True, **settings)
