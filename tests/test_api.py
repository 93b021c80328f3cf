"""The public API: bitsandbytes 0.49's class names, signatures and defaults."""

from __future__ import annotations

import inspect

import pytest
import torch

import pagedopt
from pagedopt.optim import ALGORITHMS, OPTIMIZER_NAMES, get_optimizer_class


def test_every_class_exists_in_both_namespaces():
    assert len(OPTIMIZER_NAMES) == 54
    for name in OPTIMIZER_NAMES:
        cls = getattr(pagedopt, name)
        assert cls is getattr(pagedopt.optim, name) is get_optimizer_class(name)
        assert issubclass(cls, pagedopt.Optimizer8bit) and issubclass(cls, torch.optim.Optimizer)
        assert cls.__doc__ and "Example" in cls.__doc__
    for name in ("Optimizer8bit", "Optimizer2State", "Optimizer1State", "GlobalOptimManager",
                 "StableEmbedding", "PagingConfig"):
        assert hasattr(pagedopt, name)


def test_covers_the_bitsandbytes_optimizer_names():
    bnb_optim = pytest.importorskip("bitsandbytes.optim")
    theirs = {n for n, obj in vars(bnb_optim).items() if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)}
    theirs -= {"Optimizer8bit", "Optimizer2State", "Optimizer1State", "PytorchLARS"}
    assert theirs <= set(OPTIMIZER_NAMES)


# bitsandbytes 0.49 defaults (reference-semantics notes): name -> {argument: default}
DEFAULTS = {
    "Adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, optim_bits=32,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False),
    "AdamW": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, min_8bit_size=4096,
                  percentile_clipping=100, block_wise=True),
    "Lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0, percentile_clipping=100, block_wise=True),
    "AdEMAMix": dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None, t_beta3=None, eps=1e-8,
                     weight_decay=1e-2, min_8bit_size=4096),
    "SGD": dict(momentum=0, dampening=0, weight_decay=0, nesterov=False, percentile_clipping=100, block_wise=True),
    "RMSprop": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False),
    "Adagrad": dict(lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10),
    "LAMB": dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False,
                 adam_w_mode=True, block_wise=False, max_unorm=1.0),
    "LARS": dict(momentum=0, dampening=0, weight_decay=0, nesterov=False, percentile_clipping=100, max_unorm=0.02),
}


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_signatures_and_defaults(algo):
    for fmt in ("{}", "{}8bit", "{}32bit", "Paged{}", "Paged{}8bit", "Paged{}32bit"):
        sig = inspect.signature(get_optimizer_class(fmt.format(algo)).__init__)
        names = list(sig.parameters)
        assert names[:2] == ["self", "params"]
        for arg, default in DEFAULTS[algo].items():
            if arg in ("optim_bits", "is_paged") and fmt != "{}":
                continue
            assert sig.parameters[arg].default == default, (fmt.format(algo), arg)
    if algo in ("SGD", "LARS"):
        assert inspect.signature(get_optimizer_class(algo).__init__).parameters["lr"].default is inspect.Parameter.empty


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_variants_pin_bits_and_paging(algo):
    extra = dict(lr=0.1, momentum=0.9) if algo in ("SGD", "LARS") else {}
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert get_optimizer_class(f"{algo}8bit")(p, **extra).optim_bits == 8
    assert get_optimizer_class(f"{algo}32bit")(p, **extra).optim_bits == 32
    paged = get_optimizer_class(f"Paged{algo}8bit")(p, **extra)
    assert paged.is_paged and paged.optim_bits == 8 and paged.paging is not None
    assert not get_optimizer_class(algo)(p, **extra).is_paged
    inspect.signature(get_optimizer_class(f"{algo}8bit")).bind(p, **extra)


def test_bitsandbytes_style_positional_call():
    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = pagedopt.Adam(p, 1e-2, (0.8, 0.9), 1e-6, 0.1, False, 8)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], opt.optim_bits) == (1e-2, (0.8, 0.9), 1e-6, 0.1, 8)


def test_unknown_optimizer_name_lists_choices():
    with pytest.raises(ValueError, match="unknown optimizer 'AdamW9bit'; expected one of Adam, Adam8bit"):
        get_optimizer_class("AdamW9bit")


def test_import_does_not_need_cuda(monkeypatch):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import pagedopt, torch; print(len(pagedopt.OPTIMIZER_NAMES))"],
        capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin",
                                             "PYTHONPATH": ":".join(sys.path)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "54"
